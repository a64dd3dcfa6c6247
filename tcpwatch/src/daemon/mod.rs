//! The always-on daemon (`tcpwatch daemon`; `serve` is it without the API socket and the
//! record): one set of probes and one model for the host. A reader thread drains the rings
//! and never waits for anything else; a model thread keeps the live analysis, the frames,
//! the subscribers and the metrics; the recorder thread writes the record; tokio carries
//! the HTTP endpoint, the API socket, signals and timers. A slow client, a scrape or a slow
//! disk never stalls event reading: what cannot be taken in time is dropped and counted.
pub mod access;
pub mod handler;
pub mod messages;
pub mod model;
pub mod shared;
pub mod window;

pub use shared::{Shared, Status};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::recorder::Recorder;
use crate::server::http::{self, Limits, Render};
use crate::session::{Batch, Collector, Options, Session};
use crate::source::host;

/// A line on stderr that cannot panic.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// How the daemon runs.
pub struct Config {
    /// The session's probes and filters (what the whole host is watched for).
    pub session: Options,
    /// The API socket; `None`: no API (`serve`).
    pub socket: Option<PathBuf>,
    /// The Prometheus endpoint; `None`: off.
    pub metrics: Option<std::net::TcpListener>,
    pub metrics_addr: Option<SocketAddr>,
    /// Where the record lives, and its bound in bytes; `None`: no record (`serve`).
    pub state_dir: Option<(PathBuf, u64)>,
    pub max_listeners: usize,
    /// The group whose members may use the API (`tcpwatch`), when it exists.
    pub group: Option<u32>,
}

/// How often the rings are polled, and when nothing happened for a second.
const POLL: Duration = Duration::from_millis(20);
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Events queued between the reader and the model thread at most (about 130 MB).
const QUEUE_EVENTS: usize = 1 << 20;

pub fn run(cfg: Config, stop: Arc<AtomicBool>) -> anyhow::Result<i32> {
    let Config {
        session,
        socket,
        metrics,
        metrics_addr,
        state_dir,
        max_listeners,
        group,
    } = cfg;
    // The socket is checked before the probes load: a second daemon fails fast.
    let api = match &socket {
        Some(p) => Some(access::bind(p, group)?),
        None => None,
    };
    let recorder = match &state_dir {
        Some((dir, bound)) => {
            access::state_dir(dir, group)?;
            Some(Arc::new(Recorder::start(dir, *bound).map_err(|e| {
                anyhow::anyhow!("the record in {}: {e:#}", dir.display())
            })?))
        }
        None => None,
    };
    let mut session = session;
    session.probe.relaxed_sampling = true;
    let retention_ns = session.retention_ns;
    let close_wait_secs = session.thresholds.close_wait_secs;
    let session = Session::start(session)?;
    for s in session.collector().status() {
        note!("tcpwatch: {}", s.line());
    }
    let clock = session.clock();
    let (src, mut analysis) = session.into_parts();
    analysis.keep_retired();
    if let Some(r) = retention_ns {
        analysis.set_retention(r);
    }
    let (up_tx, up_rx) = sync_channel::<messages::Up>(4096);
    let shared = Arc::new(Shared {
        ctx: analysis.context().clone(),
        clock,
        started_wall_ns: host::wall_ns(),
        status: Mutex::new(Status {
            hooks: src.hooks(),
            loss: src.loss(),
            events_seen: 0,
            inventory: Some(Arc::new(src.inventory_reader())),
        }),
        recorder,
        up: up_tx.clone(),
        waker: src.waker(),
        heavy: tokio::sync::Semaphore::new(2),
        listing: Mutex::new(None),
        group,
    });
    let queued = Arc::new(AtomicUsize::new(0));
    let (state_tx, state_rx) = sync_channel::<()>(4);
    let reader = {
        let (stop, queued, up_tx, shared) =
            (stop.clone(), queued.clone(), up_tx.clone(), shared.clone());
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || read(src, &stop, &queued, &up_tx, &state_rx, &shared))
            .map_err(|e| anyhow::anyhow!("starting the reader thread: {e}"))?
    };
    let model = {
        let (stop, queued, shared) = (stop.clone(), queued.clone(), shared.clone());
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                let started = shared.started_wall_ns;
                let m = model::Model::new(analysis, shared, max_listeners, close_wait_secs);
                m.record_start(started);
                m.run(up_rx, &state_tx, &stop, &queued)
            })
            .map_err(|e| anyhow::anyhow!("starting the model thread: {e}"))?
    };
    if let Some(a) = metrics_addr {
        note!("tcpwatch: serving http://{a}/metrics");
    }
    if let Some(p) = &socket {
        note!(
            "tcpwatch: API on {} ({})",
            p.display(),
            access::describe(group)
        );
    }
    if let Some(r) = &shared.recorder {
        let span = r.span();
        note!(
            "tcpwatch: recording to {} (at most {} MiB{})",
            r.dir().join(crate::recorder::DB_FILE).display(),
            span.bound_bytes >> 20,
            span.frames_from_wall_ns
                .map(|w| format!("; history from {}", clock.hms_of_wall(w)))
                .unwrap_or_default()
        );
    }
    note!("tcpwatch: Ctrl-C to stop");
    let render: Render = {
        let up = up_tx.clone();
        Arc::new(move || {
            let (tx, rx) = oneshot::channel();
            up.try_send(messages::Up::Want(tx)).ok()?;
            Some(rx)
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the I/O runtime: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let failed: Option<String> = rt.block_on(async {
        let http = match metrics {
            Some(l) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                Some(tokio::spawn(http::run(
                    l,
                    render,
                    Limits::default(),
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
        let api = match api {
            Some(l) => {
                let l = tokio::net::UnixListener::from_std(l)?;
                let h: Arc<dyn crate::server::api::Handler> =
                    Arc::new(handler::Api::new(shared.clone()));
                Some(tokio::spawn(crate::server::api::run(
                    l,
                    h,
                    crate::server::api::Limits::default(),
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
        let (mut http, mut api) = (http, api);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let why = 'watch: loop {
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
            if shared.recorder.as_ref().is_some_and(|r| r.failed()) {
                break Some("the recorder stopped".to_string());
            }
            for (name, t) in [("HTTP endpoint", &mut http), ("API socket", &mut api)] {
                if let Some(h) = t.take_if(|h| h.is_finished()) {
                    break 'watch Some(match h.await {
                        Ok(Err(e)) => format!("{e:#}"),
                        Ok(Ok(())) => format!("the {name} ended"),
                        Err(e) => format!("the {name} failed: {e}"),
                    });
                }
            }
        };
        let _ = stop_tx.send(true);
        anyhow::Ok(why)
    })?;
    let _ = stop_tx.send(true);
    drop(rt);
    stop.store(true, Ordering::SeqCst);
    let reader_panicked = reader.join().is_err();
    let model_result = model.join();
    if let Some(p) = &socket {
        let _ = std::fs::remove_file(p);
    }
    match (failed, reader_panicked, model_result) {
        (_, true, _) => anyhow::bail!("the reader thread panicked; the daemon stopped"),
        (_, _, Err(_)) => anyhow::bail!("the model thread panicked; the daemon stopped"),
        (_, _, Ok(Some(why))) | (Some(why), _, _) => anyhow::bail!("{why}; the daemon stopped"),
        _ => Ok(0),
    }
}

/// The reader thread: drains the rings, sends batches up, answers state requests, publishes
/// the status every second.
fn read(
    mut src: Collector,
    stop: &AtomicBool,
    queued: &AtomicUsize,
    up_tx: &SyncSender<messages::Up>,
    state_rx: &Receiver<()>,
    shared: &Shared,
) {
    let mut batch = Batch::default();
    let mut last_status = Instant::now();
    let mut reported_loss = 0;
    let mut quiet_since = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        batch.clear();
        // After a quiet second the rings are looked at every 100 ms: the ring holds what
        // comes meanwhile, and a client's request wakes the reader at once.
        let wait = if quiet_since.elapsed() >= Duration::from_secs(1) {
            IDLE_POLL
        } else {
            POLL
        };
        src.poll(wait, false, &mut batch);
        if !batch.events.is_empty() {
            quiet_since = Instant::now();
        }
        if !batch.is_empty() {
            let evs = std::mem::take(&mut batch.events);
            let samples = std::mem::take(&mut batch.listeners);
            let n = evs.len();
            if queued.load(Ordering::Relaxed) + n > QUEUE_EVENTS {
                src.count_channel_drop(n as u64);
            } else {
                queued.fetch_add(n, Ordering::Relaxed);
                match up_tx.try_send(messages::Up::Batch(evs, samples)) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {
                        queued.fetch_sub(n, Ordering::Relaxed);
                        src.count_channel_drop(n as u64);
                    }
                    Err(_) => break,
                }
            }
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            src.refresh_loss();
            for line in src.take_diagnostics() {
                note!("tcpwatch: {line}");
            }
            let loss = src.loss();
            if loss.total() > reported_loss {
                note!(
                    "tcpwatch: lost {} events; {} so far",
                    loss.total() - reported_loss,
                    loss.total()
                );
                reported_loss = loss.total();
            }
            let inventory = Arc::new(src.inventory_reader());
            let mut st = shared.status.lock().unwrap_or_else(|p| p.into_inner());
            st.hooks = src.hooks();
            st.loss = loss;
            st.events_seen = src.events_seen();
            st.inventory = Some(inventory);
        }
        if state_rx.try_recv().is_ok() {
            src.refresh_loss();
            let st = messages::Up::State {
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
