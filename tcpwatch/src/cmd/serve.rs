//! `tcpwatch serve`: Prometheus metrics over HTTP. Three parts: a reader thread drains the
//! rings and never waits for anything else; a model thread keeps the analysis and, when
//! scraped, reads the inventory, builds the snapshot and renders it (at most once a second,
//! cached); the HTTP endpoint (server::http, on tokio) answers clients. A scrape never stalls
//! event reading, a client never stalls another; batches the model thread cannot take in
//! time are dropped and counted. If any part fails the process exits non-zero, saying why.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::common::{EXIT_OK, POLL, note, thresholds, watch_options};
use super::signals;
use crate::cli::ServeArgs;
use crate::model::Loss;
use crate::model::event::Event;
use crate::model::snapshot::HookView;
use crate::model::system::SockRec;
use crate::server::http::{self, Limits, Render};
use crate::session::sampler::InventoryReader;
use crate::session::{Analysis, Batch, Collector, Reading};
use crate::source::host::monotonic_ns;

/// What the model thread is sent.
enum Up {
    Batch(Vec<Event>, Vec<SockRec>),
    /// Answer to a state request: what a snapshot needs from the collector.
    State {
        inventory: InventoryReader,
        hooks: Vec<HookView>,
        loss: Loss,
        events: u64,
    },
    /// A scrape waiting for the exposition.
    Want(oneshot::Sender<String>),
}

/// Events queued between the reader and the model thread at most (about 130 MB).
const QUEUE_EVENTS: usize = 1 << 20;

pub fn run(a: ServeArgs) -> anyhow::Result<i32> {
    // Signals first: every thread (and the runtime's) inherits the blocked mask.
    let stop = signals::install();
    let listener = std::net::TcpListener::bind(a.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?;
    listener.set_nonblocking(true)?;
    let mut opts = watch_options(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    opts.retention_ns = Some(a.retention_secs * 1_000_000_000);
    let session = crate::session::Session::start(opts)?;
    for s in session.collector().status() {
        note!("tcpwatch: {}", s.line());
    }
    let (src, analysis) = session.into_parts();
    // Bounded by events queued (QUEUE_EVENTS), not by batches; beyond that batches are
    // dropped and counted.
    let (up_tx, up_rx) = sync_channel::<Up>(4096);
    let queued = Arc::new(AtomicUsize::new(0));
    let (state_tx, state_rx) = sync_channel::<()>(4);
    let waker = src.waker();
    let reader = {
        let (stop, queued, up_tx) = (stop.clone(), queued.clone(), up_tx.clone());
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || read(src, &stop, &queued, &up_tx, &state_rx))
            .map_err(|e| anyhow::anyhow!("starting the reader thread: {e}"))?
    };
    let model = {
        let (stop, queued) = (stop.clone(), queued.clone());
        let max_listeners = a.max_listeners as usize;
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                keep_model(
                    analysis,
                    up_rx,
                    &state_tx,
                    &waker,
                    &stop,
                    &queued,
                    max_listeners,
                )
            })
            .map_err(|e| anyhow::anyhow!("starting the model thread: {e}"))?
    };
    note!(
        "tcpwatch: serving http://{}/metrics; Ctrl-C to stop",
        a.listen
    );
    let render: Render = Arc::new(move || {
        let (tx, rx) = oneshot::channel();
        up_tx.try_send(Up::Want(tx)).ok()?;
        Some(rx)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the HTTP runtime: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Why serving stopped, when it was not asked to: the process then exits non-zero.
    let failed: Option<String> = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let server = tokio::spawn(http::run(listener, render, Limits::default(), stop_rx));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let why = loop {
            tick.tick().await;
            if stop.load(Ordering::SeqCst) {
                break None;
            }
            if reader.is_finished() {
                break Some("the reader thread ended".to_string());
            }
            if model.is_finished() {
                break Some("the model thread ended".to_string());
            }
            if server.is_finished() {
                break Some(match server.await {
                    Ok(Err(e)) => format!("{e:#}"),
                    Ok(Ok(())) => "the HTTP endpoint ended".to_string(),
                    Err(e) => format!("the HTTP endpoint failed: {e}"),
                });
            }
        };
        let _ = stop_tx.send(true);
        anyhow::Ok(why)
    })?;
    stop.store(true, Ordering::SeqCst);
    let reader_panicked = reader.join().is_err();
    let model_result = model.join();
    match (failed, reader_panicked, model_result) {
        (_, true, _) => anyhow::bail!("the reader thread panicked; metrics stopped"),
        (_, _, Err(_)) => anyhow::bail!("the model thread panicked; metrics stopped"),
        (_, _, Ok(Some(why))) | (Some(why), _, _) => anyhow::bail!("{why}; metrics stopped"),
        _ => Ok(EXIT_OK),
    }
}

/// The reader thread: drains the rings, sends batches up, answers state requests.
fn read(
    mut src: Collector,
    stop: &AtomicBool,
    queued: &AtomicUsize,
    up_tx: &SyncSender<Up>,
    state_rx: &Receiver<()>,
) {
    let mut batch = Batch::default();
    let mut last_loss = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        batch.clear();
        src.poll(POLL, false, &mut batch);
        if !batch.is_empty() {
            let evs = std::mem::take(&mut batch.events);
            let samples = std::mem::take(&mut batch.listeners);
            let n = evs.len();
            if queued.load(Ordering::Relaxed) + n > QUEUE_EVENTS {
                src.count_channel_drop(n as u64);
            } else {
                queued.fetch_add(n, Ordering::Relaxed);
                match up_tx.try_send(Up::Batch(evs, samples)) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {
                        queued.fetch_sub(n, Ordering::Relaxed);
                        src.count_channel_drop(n as u64);
                    }
                    Err(_) => break,
                }
            }
        }
        if last_loss.elapsed() >= Duration::from_secs(1) {
            last_loss = Instant::now();
            let d = src.refresh_loss();
            for line in src.take_diagnostics() {
                note!("tcpwatch: {line}");
            }
            if d.total() > 0 {
                note!(
                    "tcpwatch: lost {} events; {} so far",
                    d.total(),
                    src.loss().total()
                );
            }
        }
        if state_rx.try_recv().is_ok() {
            src.refresh_loss();
            let st = Up::State {
                inventory: src.inventory_reader(),
                hooks: src.hooks(),
                loss: src.loss(),
                events: src.events_seen(),
            };
            if up_tx.send(st).is_err() {
                break;
            }
        }
    }
    note!(
        "tcpwatch: {} events, {} lost",
        src.events_seen(),
        src.loss().total()
    );
}

/// The model thread: applies batches and answers scrapes. Returns why it stopped when it was
/// not asked to.
fn keep_model(
    mut analysis: Analysis,
    up_rx: Receiver<Up>,
    state_tx: &SyncSender<()>,
    waker: &crate::ebpf::reader::Waker,
    stop: &AtomicBool,
    queued: &AtomicUsize,
    max_listeners: usize,
) -> Option<String> {
    let mut cache: Option<(Instant, String)> = None;
    let mut build_seconds = 0.0;
    let apply = |an: &mut Analysis, evs: Vec<Event>, samples: Vec<SockRec>| {
        queued.fetch_sub(evs.len(), Ordering::Relaxed);
        let now = monotonic_ns();
        an.apply(&evs);
        an.observe(&samples, now);
        an.tick(now);
    };
    let mut wants: Vec<oneshot::Sender<String>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match up_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Up::Batch(evs, samples)) => apply(&mut analysis, evs, samples),
            Ok(Up::Want(reply)) => wants.push(reply),
            Ok(Up::State { .. }) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return Some("the reader thread ended".into()),
        }
        for reply in std::mem::take(&mut wants) {
            if cache
                .as_ref()
                .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1))
            {
                let t = Instant::now();
                if state_tx.send(()).is_err() {
                    return Some("the reader thread ended".into());
                }
                // Not up to a whole poll interval later.
                waker.wake();
                // Events that arrive meanwhile still go into the analysis first.
                let (inv, hooks, loss, events) = loop {
                    match up_rx.recv_timeout(Duration::from_secs(5)) {
                        Ok(Up::Batch(evs, samples)) => apply(&mut analysis, evs, samples),
                        Ok(Up::Want(r)) => wants.push(r),
                        Ok(Up::State {
                            inventory,
                            hooks,
                            loss,
                            events,
                        }) => break (inventory, hooks, loss, events),
                        Err(_) => {
                            return Some("the reader thread did not answer within 5 s".into());
                        }
                    }
                };
                let (inventory, namespaces) = inv.read();
                let snap = analysis.snapshot(
                    monotonic_ns(),
                    Reading {
                        inventory: Some(&inventory),
                        namespaces,
                        loss,
                        hooks,
                    },
                );
                let text = crate::output::prometheus::render(
                    &snap,
                    &crate::output::prometheus::Extras {
                        events,
                        build_seconds,
                        max_listeners,
                    },
                );
                analysis.reset_peaks();
                build_seconds = t.elapsed().as_secs_f64();
                cache = Some((Instant::now(), text));
            }
            if let Some((_, text)) = &cache {
                let _ = reply.send(text.clone());
            }
        }
    }
    None
}
