//! `tcpwatch trace`: the session's events streamed to stdout by a writer thread, so a slow
//! terminal backs up into the kernel ring (where loss is counted), never into memory.
use std::io::{self, BufWriter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, daemon_client, daemon_line, note, thresholds, watching};
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
    super::common::note_scope(&a.filters);
    if let Some(c) = daemon_client(&a.source)? {
        return through_daemon(&a, c);
    }
    if a.since.is_some() {
        return Err(super::common::since_needs_daemon(&a.source));
    }
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

/// How long a trace waits for a daemon that went away to come back.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Reads a subscription's lines on a thread of its own (so Ctrl-C is never stuck behind a
/// quiet daemon); `None` marks the daemon hanging up.
fn stream_lines(
    mut c: crate::source::daemon::Client,
) -> std::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = sync_channel(1024);
    std::thread::spawn(move || {
        loop {
            let mut buf = Vec::new();
            match c.next_line(&mut buf, None) {
                Ok(Some(())) => {
                    if tx.send(Some(buf)).is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    rx
}

/// Subscribes: the answer line, then the stream's lines on a thread.
fn subscribe(
    c: &mut crate::source::daemon::Client,
    from: Option<i64>,
    filters: &crate::model::api::Filters,
) -> anyhow::Result<Option<i64>> {
    use crate::model::api::{Body, Op};
    match c.request(
        Op::Subscribe {
            from_wall_ns: from,
            filters: filters.clone(),
        },
        Duration::from_secs(30),
    )? {
        Body::Subscribed { from_wall_ns } => Ok(from_wall_ns),
        _ => anyhow::bail!("the daemon answered something else than a subscription"),
    }
}

/// The events through the daemon: recorded ones from `--since`, then live, as JSON lines
/// passed on or as text. If the daemon goes away, reconnects for a while and goes on from
/// the last event it had.
fn through_daemon(a: &TraceArgs, mut c: crate::source::daemon::Client) -> anyhow::Result<i32> {
    use crate::source::daemon::Client;
    use crate::source::host::wall_ns;
    let stop = signals::install();
    note!("tcpwatch: {}", daemon_line(&c));
    let filters = crate::settings::api_filters(&a.filters)?;
    let clock = crate::source::host::wall_clock();
    let reasons = RstReasons::new(c.hello.reasons.clone());
    let path = c.path.clone();
    let out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut w =
        TraceWriter::new(out, a.json, clock, crate::settings::own_netns()).with_reasons(reasons);
    let asked = a.since.map(|d| wall_ns() - d as i64);
    let starts = subscribe(&mut c, asked, &filters)?;
    if let (Some(asked), Some(s)) = (asked, starts)
        && s > asked + 1_000_000_000
    {
        let pruned = c.hello.record.is_some_and(|r| r.pruned.events > 0);
        note!(
            "tcpwatch: the record starts at {}{}",
            clock.hms_of_wall(s),
            if pruned {
                " (older events were pruned to stay inside --history-mib)"
            } else {
                ": nothing was recorded before"
            }
        );
    }
    note!("tcpwatch: tracing; Ctrl-C to stop");
    let mut rx = stream_lines(c);
    let (mut events, mut skipped) = (0u64, 0u64);
    let mut last_wall: Option<i64> = None;
    let res: io::Result<()> = (|| {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let line = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Some(l)) => l,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    w.flush()?;
                    continue;
                }
                Ok(None) | Err(_) => {
                    w.flush()?;
                    note!(
                        "tcpwatch: the daemon at {} went away; waiting for it to come back",
                        path.display()
                    );
                    let give_up = Instant::now() + RECONNECT_FOR;
                    let gap_from = last_wall;
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        if Instant::now() >= give_up {
                            return Err(io::Error::other(format!(
                                "the daemon at {} did not come back within {} s",
                                path.display(),
                                RECONNECT_FOR.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(500));
                        let Ok(mut c2) = Client::connect(&path) else {
                            continue;
                        };
                        // From the last event seen: what the new daemon recorded since.
                        let resume = gap_from.map_or_else(wall_ns, |w| w + 1);
                        if subscribe(&mut c2, Some(resume), &filters).is_err() {
                            continue;
                        }
                        note!(
                            "tcpwatch: reconnected (daemon pid {}); events while no daemon ran were not observed",
                            c2.hello.pid
                        );
                        rx = stream_lines(c2);
                        break;
                    }
                    continue;
                }
            };
            // Event lines passed on as JSON are not parsed: 50 clients of a busy daemon
            // would otherwise spend cores on it.
            if a.json
                && let Some(ts) = event_ts(&line)
            {
                events += 1;
                last_wall = Some(clock.wall_ns(ts) as i64);
                w.raw_line(&line)?;
                continue;
            }
            let v: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v.get("ok") == Some(&serde_json::Value::Bool(false)) {
                let why = v["error"].as_str().unwrap_or("?");
                return Err(io::Error::other(format!(
                    "the daemon says: {}",
                    crate::source::daemon::printable(why)
                )));
            }
            match v["type"].as_str() {
                Some("live") => continue,
                Some("skipped") => {
                    let n = v["count"].as_u64().unwrap_or(0);
                    skipped += n;
                    note!(
                        "tcpwatch: {n} events skipped: this trace did not keep up with the daemon"
                    );
                    if a.json {
                        w.raw_line(&line)?;
                    }
                    continue;
                }
                Some("loss") => {
                    if a.json {
                        w.raw_line(&line)?;
                    } else {
                        note!(
                            "tcpwatch: the daemon lost {} events ({} so far)",
                            v["kernel_dropped"].as_u64().unwrap_or(0)
                                + v["kernel_skipped"].as_u64().unwrap_or(0)
                                + v["channel_dropped"].as_u64().unwrap_or(0)
                                + v["decode_errors"].as_u64().unwrap_or(0),
                            v["total"]["kernel_dropped"].as_u64().unwrap_or(0)
                                + v["total"]["kernel_skipped"].as_u64().unwrap_or(0)
                                + v["total"]["channel_dropped"].as_u64().unwrap_or(0)
                                + v["total"]["decode_errors"].as_u64().unwrap_or(0)
                        );
                    }
                    continue;
                }
                _ => {}
            }
            let Some(e) = crate::source::replay::event_from_json(&v) else {
                continue;
            };
            events += 1;
            last_wall = Some(clock.wall_ns(e.ts_ns) as i64);
            if a.json {
                w.raw_line(&line)?;
            } else {
                w.event(&e)?;
            }
        }
    })();
    let res = match res {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Other => {
            let _ = w.flush();
            return Err(anyhow::anyhow!("{e}"));
        }
        other => other.and_then(|_| w.flush()),
    };
    note!("tcpwatch: {events} events from the daemon, {skipped} skipped");
    match res {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing output: {e}"))
        }
        _ => Ok(EXIT_OK),
    }
}

/// The `ts_ns` of an event line (`{"type":"state","ts_ns":…`), without parsing the rest;
/// `None` for anything else (notes, loss lines, failures).
fn event_ts(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"type\":\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    if !matches!(
        &rest[..end],
        b"state" | b"retransmit" | b"reset" | b"error" | b"timewait" | b"overflow"
    ) {
        return None;
    }
    let rest = rest[end..].strip_prefix(b"\",\"ts_ns\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_lines_are_told_without_parsing() {
        assert_eq!(
            super::event_ts(br#"{"type":"state","ts_ns":12345,"cookie":1}"#),
            Some(12345)
        );
        assert_eq!(super::event_ts(br#"{"type":"loss","ts_ns":5}"#), None);
        assert_eq!(super::event_ts(br#"{"type":"skipped","count":3}"#), None);
        assert_eq!(super::event_ts(br#"{"ok":false,"error":"x"}"#), None);
    }
}
