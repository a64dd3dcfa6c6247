//! `tcpwatch serve`: Prometheus metrics over HTTP. A reader thread drains the rings and never
//! waits for anything else; the main thread keeps the analysis and, when scraped, reads the
//! inventory, builds the snapshot and renders it (at most once a second, cached), so a scrape
//! never stalls event reading. Batches the main thread cannot take in time are dropped and
//! counted, never silent.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, note, thresholds, watching};
use super::signals;
use crate::cli::ServeArgs;
use crate::model::Loss;
use crate::model::event::Event;
use crate::model::snapshot::HookView;
use crate::model::system::SockRec;
use crate::session::Reading;
use crate::session::sampler::InventoryReader;
use crate::source::host::monotonic_ns;

/// What the reader thread sends up.
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
    Want(SyncSender<String>),
}

/// Events queued between the reader and the main thread at most (about 130 MB).
const QUEUE_EVENTS: usize = 1 << 20;

pub fn run(a: ServeArgs) -> anyhow::Result<i32> {
    // Signals first: tiny_http starts threads, which must inherit the blocked mask.
    let stop = signals::install();
    let server = Arc::new(
        tiny_http::Server::http(a.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?,
    );
    let session = watching(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    for s in session.collector().status() {
        note!("tcpwatch: {}", s.line());
    }
    let (mut src, mut analysis) = session.into_parts();
    // Bounded by events queued (QUEUE_EVENTS), not by batches; beyond that batches are
    // dropped and counted.
    let (up_tx, up_rx) = sync_channel::<Up>(4096);
    let queued = Arc::new(AtomicUsize::new(0));
    let http = {
        let server = server.clone();
        let want_tx = up_tx.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || http_loop(&server, &want_tx))
            .map_err(|e| anyhow::anyhow!("starting the HTTP thread: {e}"))?
    };
    let (state_tx, state_rx) = sync_channel::<()>(4);
    let waker = src.waker();
    let rstop = stop.clone();
    let rqueued = queued.clone();
    let reader = std::thread::Builder::new()
        .name("reader".into())
        .spawn(move || {
            let mut batch = crate::session::Batch::default();
            let mut last_loss = Instant::now();
            while !rstop.load(Ordering::SeqCst) {
                batch.clear();
                src.poll(POLL, false, &mut batch);
                if !batch.is_empty() {
                    let evs = std::mem::take(&mut batch.events);
                    let samples = std::mem::take(&mut batch.listeners);
                    let n = evs.len();
                    if rqueued.load(Ordering::Relaxed) + n > QUEUE_EVENTS {
                        src.count_channel_drop(n as u64);
                    } else {
                        rqueued.fetch_add(n, Ordering::Relaxed);
                        match up_tx.try_send(Up::Batch(evs, samples)) {
                            Ok(()) => {}
                            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                                rqueued.fetch_sub(n, Ordering::Relaxed);
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
        })
        .map_err(|e| anyhow::anyhow!("starting the reader thread: {e}"))?;
    note!(
        "tcpwatch: serving http://{}/metrics; Ctrl-C to stop",
        a.listen
    );
    let mut cache: Option<(Instant, String)> = None;
    let mut build_seconds = 0.0;
    let apply = |an: &mut crate::session::Analysis, evs: Vec<Event>, samples: Vec<SockRec>| {
        queued.fetch_sub(evs.len(), Ordering::Relaxed);
        let now = monotonic_ns();
        an.apply(&evs);
        an.observe(&samples, now);
        an.tick(now);
    };
    let mut wants: Vec<SyncSender<String>> = Vec::new();
    // Set when serving cannot go on: the process then exits non-zero (a supervisor restarts it).
    let mut failed: Option<&str> = None;
    'main: while !stop.load(Ordering::SeqCst) {
        if reader.is_finished() {
            failed = Some("the reader thread ended");
            break;
        }
        match up_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Up::Batch(evs, samples)) => apply(&mut analysis, evs, samples),
            Ok(Up::Want(reply)) => wants.push(reply),
            Ok(Up::State { .. }) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        for reply in std::mem::take(&mut wants) {
            if cache
                .as_ref()
                .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1))
            {
                let t = Instant::now();
                if state_tx.send(()).is_err() {
                    failed = Some("the reader thread ended");
                    break 'main;
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
                            failed = Some("the reader thread did not answer within 5 s");
                            break 'main;
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
                        max_listeners: a.max_listeners as usize,
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
    stop.store(true, Ordering::SeqCst);
    drop(up_rx);
    let panicked = reader.join().is_err();
    server.unblock();
    let _ = http.join();
    match (failed, panicked) {
        (_, true) => anyhow::bail!("the reader thread panicked; metrics stopped"),
        (Some(why), _) => anyhow::bail!("{why}; metrics stopped"),
        _ => Ok(EXIT_OK),
    }
}

fn http_loop(server: &tiny_http::Server, want: &SyncSender<Up>) {
    use tiny_http::{Header, Response};
    let header =
        |v: &str| Header::from_bytes(&b"Content-Type"[..], v.as_bytes()).expect("static header");
    for rq in server.incoming_requests() {
        let path = rq.url().split('?').next().unwrap_or("").to_string();
        let res = match (rq.method(), path.as_str()) {
            (tiny_http::Method::Get, "/metrics") => {
                let (tx, rx) = sync_channel(1);
                if want.send(Up::Want(tx)).is_err() {
                    break;
                }
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(body) => rq.respond(
                        Response::from_string(body)
                            .with_header(header("text/plain; version=0.0.4; charset=utf-8")),
                    ),
                    Err(_) => rq.respond(
                        Response::from_string("metrics not ready\n").with_status_code(503),
                    ),
                }
            }
            (tiny_http::Method::Get, "/healthz") => rq.respond(Response::from_string("ok\n")),
            (tiny_http::Method::Get, "/") => rq.respond(
                Response::from_string("tcpwatch: metrics at /metrics, health at /healthz\n")
                    .with_header(header("text/plain; charset=utf-8")),
            ),
            _ => rq.respond(Response::from_string("not found\n").with_status_code(404)),
        };
        let _ = res;
    }
}
