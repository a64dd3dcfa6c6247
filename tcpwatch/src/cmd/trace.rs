//! `tcpwatch trace`: the session's events streamed to stdout by a writer thread, so a slow
//! terminal backs up into the kernel ring (where loss is counted), never into memory.
use std::io::{self, BufWriter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, note, thresholds, watching};
use super::signals;
use crate::cli::TraceArgs;
use crate::model::Loss;
use crate::model::event::{Event, RstReasons};
use crate::model::time::Clock;
use crate::output::trace::TraceWriter;

enum Msg {
    Events(Vec<Event>),
    Loss {
        ts_ns: u64,
        delta: Loss,
        total: Loss,
    },
}

/// Batches (one per 20 ms poll) between the ring reader and the writer.
const QUEUE_BATCHES: usize = 8;

pub fn run(a: TraceArgs) -> anyhow::Result<i32> {
    let stop = signals::install();
    let mut session = watching(&a.filters, &a.probe, thresholds(10), false)?;
    for s in session.collector().status() {
        note!("tcpwatch: {}", s.line());
    }
    note!("tcpwatch: tracing; Ctrl-C to stop");

    // A stalled stdout must back up into the kernel ring, where every lost record is counted,
    // not into this process's memory: a few polls' worth of events wait here, no more.
    let (tx, rx) = sync_channel::<Msg>(QUEUE_BATCHES);
    let (json, clock, reasons) = (a.json, session.clock(), session.collector().rst_reasons());
    let wstop = stop.clone();
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || write(rx, json, clock, reasons, &wstop))
        .map_err(|e| anyhow::anyhow!("starting the writer thread: {e}"))?;

    let mut last_loss_check = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping {
            session.finish();
        } else {
            session.step(POLL);
        }
        let events = session.take_events();
        if !events.is_empty() && !send(&tx, Msg::Events(events), &stop) {
            break;
        }
        if stopping || last_loss_check.elapsed() >= Duration::from_secs(1) {
            last_loss_check = Instant::now();
            let delta = session.refresh_loss();
            for d in session.take_diagnostics() {
                note!("tcpwatch: {d}");
            }
            if delta.total() > 0 {
                let total = session.loss();
                note!(
                    "tcpwatch: lost {} events ({}); {} so far",
                    delta.total(),
                    delta.breakdown(),
                    total.total()
                );
                let m = Msg::Loss {
                    ts_ns: session.now_ns(),
                    delta,
                    total,
                };
                if !send(&tx, m, &stop) {
                    break;
                }
            }
        }
        if stopping {
            break;
        }
    }
    drop(tx);
    // A writer blocked on a stdout nobody reads would hold the exit for ever: give it a
    // moment to flush, then leave without it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !writer.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let res = if writer.is_finished() {
        writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")))
    } else {
        note!("tcpwatch: stdout is not being read; exiting without the queued output");
        Ok(())
    };
    note!(
        "tcpwatch: {} events, {} lost",
        session.events_seen(),
        session.loss().total()
    );
    if let Some(line) = session.collector().cost_line() {
        note!("tcpwatch: kernel cost: {line}");
    }
    res.map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(EXIT_OK)
}

/// Queues `m` for the writer, waiting while the queue is full (the kernel ring absorbs and
/// counts meanwhile); false once the writer is gone, or when a stop is asked for and the
/// queue is still full, so Ctrl-C works with a stalled stdout.
fn send(tx: &SyncSender<Msg>, mut m: Msg, stop: &AtomicBool) -> bool {
    let mut give_up: Option<Instant> = None;
    loop {
        match tx.try_send(m) {
            Ok(()) => return true,
            Err(std::sync::mpsc::TrySendError::Full(back)) => {
                if stop.load(Ordering::SeqCst) {
                    let at =
                        *give_up.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                    if Instant::now() >= at {
                        return false;
                    }
                }
                m = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Formats off the reader thread. A closed stdout is a normal way to stop (`| head`).
fn write(
    rx: Receiver<Msg>,
    json: bool,
    clock: Clock,
    reasons: RstReasons,
    stop: &AtomicBool,
) -> io::Result<()> {
    let out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut w =
        TraceWriter::new(out, json, clock, crate::settings::own_netns()).with_reasons(reasons);
    let res = (|| {
        for m in rx {
            match m {
                Msg::Events(v) => {
                    for e in &v {
                        w.event(e)?;
                    }
                }
                Msg::Loss {
                    ts_ns,
                    delta,
                    total,
                } => w.loss(ts_ns, &delta, &total)?,
            }
            w.flush()?;
        }
        w.flush()
    })();
    match res {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            stop.store(true, Ordering::SeqCst);
            Ok(())
        }
        other => other,
    }
}
