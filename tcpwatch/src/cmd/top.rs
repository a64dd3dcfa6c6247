//! `tcpwatch top`: the interactive view over a live session (or a replayed capture), drawn
//! at `--refresh` per second; a plain snapshot when stdout is not a terminal.
use std::io::{self, BufWriter, IsTerminal as _};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, daemon_client, note, thresholds, watching};
use super::signals;
use crate::cli::{SnapshotArgs, TopArgs};
use crate::model::Loss;
use crate::model::event::Event;
use crate::model::time::Clock;
use crate::output::trace::TraceWriter;
use crate::output::tui::App;
use crate::output::tui::term::{LogLines, Screen, wait_keys};
use crate::session::{Analysis, Context, Reading};
use crate::settings::Filters;

pub fn run(a: TopArgs) -> anyhow::Result<i32> {
    if let Some(p) = &a.replay {
        // The capture is checked before the terminal: a file that holds no event is an
        // error wherever it is run.
        let reader = open_capture(p)?;
        if !io::stdout().is_terminal() {
            anyhow::bail!("--replay needs a terminal");
        }
        return replay(&a, p, reader);
    }
    if !io::stdout().is_terminal() {
        note!(
            "tcpwatch: stdout is not a terminal: printing a snapshot instead of the interactive view"
        );
        return super::snapshot::run(SnapshotArgs {
            json: false,
            duration: 0.0,
            since: None,
            close_wait_secs: a.close_wait_secs,
            filters: a.filters,
            probe: a.probe,
            source: a.source,
        });
    }
    if let Some(c) = daemon_client(&a.source)? {
        return through_daemon(&a, c);
    }
    live(&a)
}

type CaptureReader = crate::source::replay::Reader<io::BufReader<std::fs::File>>;

/// The capture opened and read up to its first event (kept for the replay).
fn open_capture(path: &std::path::Path) -> anyhow::Result<(CaptureReader, Event)> {
    use crate::source::replay::{Limits, Reader};
    let f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("--replay {}: {e}", path.display()))?;
    let mut r = Reader::new(io::BufReader::new(f), Limits::default());
    match r.next_event() {
        Ok(Some(first)) => Ok((r, first)),
        Ok(None) => anyhow::bail!("--replay {}: no tcpwatch event in it", path.display()),
        Err(e) => anyhow::bail!("--replay {}: {e}", path.display()),
    }
}

fn live(a: &TopArgs) -> anyhow::Result<i32> {
    let stop = signals::install();
    let mut session = watching(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    let mut record = match &a.record {
        Some(p) => Some(
            TraceWriter::new(
                BufWriter::new(
                    crate::source::files::create(p)
                        .map_err(|e| anyhow::anyhow!("--record {}: {e}", p.display()))?,
                ),
                true,
                session.clock(),
                0,
            )
            .with_reasons(session.collector().rst_reasons()),
        ),
        None => None,
    };
    let log = LogLines::new(
        session.clock(),
        crate::settings::own_netns(),
        session.collector().rst_reasons(),
    );
    let mut app = App::new(format!(
        "host {}{}",
        session.analysis().context().host,
        scope_suffix(&a.filters)
    ));
    app.clock = Some(session.clock());
    let mut screen = Screen::new()?;
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    let (mut rate_t, mut rate_n) = (Instant::now(), session.events_seen());
    loop {
        let tick = Instant::now() + refresh;
        // Drain events until the next screen refresh.
        while Instant::now() < tick && !stop.load(Ordering::SeqCst) {
            let batch = session.step(POLL);
            for e in &batch.events {
                if let Some(w) = record.as_mut() {
                    w.event(e)?;
                }
                app.log(log.line(e));
            }
            if let Some(w) = record.as_mut() {
                w.flush()?;
            }
            if !wait_keys(&mut app, Instant::now())? {
                return Ok(EXIT_OK);
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        session.refresh_loss();
        for d in session.take_diagnostics() {
            app.log(d);
        }
        // The socket listing is the expensive part: once a second is enough for the eye.
        let snap = session.snapshot(Duration::from_secs(1));
        let el = rate_t.elapsed().as_secs_f64();
        let rate = (session.events_seen() - rate_n) as f64 / el.max(1e-3);
        (rate_t, rate_n) = (Instant::now(), session.events_seen());
        app.update(snap, session.connections(), rate);
        screen.draw(&app)?;
    }
    Ok(EXIT_OK)
}

/// Events applied per screen refresh at most, so the view stays responsive at speed 0 on a
/// large capture.
const REPLAY_CHUNK: usize = 100_000;

fn replay(
    a: &TopArgs,
    path: &std::path::Path,
    (mut reader, first): (CaptureReader, Event),
) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    let wanted = |e: &Event| filters.kernel_accepts(e) && filters.accepts(e);
    let clock = Clock {
        offset_ns: 0,
        utc_offset_s: 0,
    };
    let mut log = LogLines::new(clock, 0, Default::default());
    let mut app = App::new(format!("replay {}", path.display()));
    let t0 = first.ts_ns;
    let mut analysis = Analysis::new(
        Context {
            host: String::new(),
            kernel: "(replay)".into(),
            home_netns: 0,
            thresholds: thresholds(a.close_wait_secs),
            sockets_filtered: a.filters.narrows_sockets(),
            reasons: Default::default(),
        },
        Some(t0),
    );
    let mut screen = Screen::new()?;
    let wall0 = Instant::now();
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    // The next event not applied yet; `None` once the capture is read to its end.
    let mut next = Some(first);
    let (mut applied, mut last_ts) = (0u64, t0);
    loop {
        // Everything up to the replay clock (at speed 0 as fast as the screen allows).
        let replay_now = if a.speed <= 0.0 {
            u64::MAX
        } else {
            t0.saturating_add((wall0.elapsed().as_nanos() as f64 * a.speed) as u64)
        };
        let mut n = 0;
        while let Some(e) = next.take_if(|e| e.ts_ns <= replay_now) {
            if wanted(&e) {
                analysis.apply(std::slice::from_ref(&e));
                app.log(log.line(&e));
                applied += 1;
            }
            last_ts = last_ts.max(e.ts_ns);
            next = reader
                .next_event()
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            n += 1;
            if n >= REPLAY_CHUNK {
                break;
            }
        }
        if let Some(r) = reader.new_reasons() {
            analysis.set_reasons(r.clone());
            log = LogLines::new(clock, 0, r);
        }
        analysis.tick(last_ts);
        if n > 0 || app.snap.version == 0 {
            let snap = analysis.snapshot(last_ts, Reading::none(Loss::default(), Vec::new()));
            app.source = format!(
                "replay {} ({applied} events, {} other lines{})",
                path.display(),
                reader.skipped,
                if next.is_none() { ", end" } else { "" }
            );
            app.update(
                snap,
                analysis.connections(last_ts),
                n as f64 / refresh.as_secs_f64(),
            );
        }
        screen.draw(&app)?;
        if !wait_keys(&mut app, Instant::now() + refresh)? {
            return Ok(EXIT_OK);
        }
    }
}

/// The events of a subscription as display lines, read on a thread of their own.
fn event_lines(
    path: &std::path::Path,
    from: i64,
    filters: &crate::model::api::Filters,
    log: LogLines,
) -> Option<std::sync::mpsc::Receiver<String>> {
    use crate::model::api::{Body, Op};
    let mut c = crate::source::daemon::Client::connect(path).ok()?;
    let ok = c.request(
        Op::Subscribe {
            from_wall_ns: Some(from),
            filters: filters.clone(),
        },
        Duration::from_secs(30),
    );
    if !matches!(ok, Ok(Body::Subscribed { .. })) {
        return None;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(8192);
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        while let Ok(Some(())) = c.next_line(&mut buf, None) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) else {
                continue;
            };
            let line = match v["type"].as_str() {
                Some("live") => continue,
                Some("skipped") => format!(
                    "-- {} events skipped: the view did not keep up",
                    v["count"].as_u64().unwrap_or(0)
                ),
                Some("loss") => "-- the daemon lost events (see the header)".to_string(),
                _ => match crate::source::replay::event_from_json(&v) {
                    Some(e) => log.line(&e),
                    None => continue,
                },
            };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Some(rx)
}

/// The view of a daemon: its live model (the past since it started), the last hour of
/// frames as the charts, the events of the last minutes pre-filled, and the record to step
/// back through.
fn through_daemon(a: &TopArgs, mut c: crate::source::daemon::Client) -> anyhow::Result<i32> {
    use crate::model::api::{Body, Op};
    use crate::source::host::wall_ns;
    let stop = signals::install();
    let filters = crate::settings::api_filters(&a.filters)?;
    let clock = crate::source::host::wall_clock();
    let reasons = crate::model::event::RstReasons::new(c.hello.reasons.clone());
    let path = c.path.clone();
    let mut app = App::new(String::new());
    app.clock = Some(clock);
    app.can_travel = c.hello.record.is_some();
    let source = |c: &crate::source::daemon::Client| {
        format!(
            "host {}{} via the daemon (pid {}, since {})",
            c.hello.host,
            scope_suffix(&a.filters),
            c.hello.pid,
            clock.hms_of_wall(c.hello.started_wall_ns)
        )
    };
    app.source = source(&c);
    let log = || LogLines::new(clock, crate::settings::own_netns(), reasons.clone());
    let mut events = if app.can_travel {
        event_lines(&path, wall_ns() - 300_000_000_000, &filters, log())
    } else {
        event_lines(&path, wall_ns(), &filters, log())
    };
    let mut screen = Screen::new()?;
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    let mut frames: Vec<std::collections::BTreeMap<crate::model::snapshot::Name, u64>> = Vec::new();
    let mut frames_read: Option<Instant> = None;
    let mut live_read: Option<Instant> = None;
    let (mut rate_t, mut rate_n) = (Instant::now(), None::<u64>);
    let mut connected = true;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(EXIT_OK);
        }
        if let Some(rx) = &events {
            for _ in 0..20_000 {
                match rx.try_recv() {
                    Ok(l) => app.log(l),
                    Err(_) => break,
                }
            }
        }
        if !connected {
            match crate::source::daemon::Client::connect(&path) {
                Ok(c2) => {
                    c = c2;
                    connected = true;
                    app.source = source(&c);
                    events = event_lines(&path, wall_ns(), &filters, log());
                    frames_read = None;
                }
                Err(_) => {
                    app.source = format!("the daemon at {} is gone: waiting for it", path.display())
                }
            }
        }
        let travel = app.travel.take();
        if connected {
            let res = match (travel, app.at) {
                (Some(Some(at)), _) => {
                    // A past window: the five minutes up to it, and the hour of frames before.
                    let r = c.request(
                        Op::Snapshot {
                            from_wall_ns: Some(at - 300_000_000_000),
                            to_wall_ns: Some(at),
                            filters: filters.clone(),
                            close_wait_secs: a.close_wait_secs,
                        },
                        Duration::from_secs(120),
                    );
                    r.and_then(|b| match b {
                        Body::Snapshot { snapshot, .. } => {
                            let socks = snapshot.sockets.clone();
                            app.update(*snapshot, socks, 0.0);
                            let r = c.request(
                                Op::Frames {
                                    from_wall_ns: at - 3_600_000_000_000,
                                    to_wall_ns: Some(at),
                                },
                                Duration::from_secs(30),
                            )?;
                            if let Body::Frames { frames } = r {
                                app.set_history(
                                    frames
                                        .into_iter()
                                        .filter(|f| !f.states.is_empty())
                                        .map(|f| f.states)
                                        .collect(),
                                );
                            }
                            Ok(())
                        }
                        _ => anyhow::bail!("an unexpected answer"),
                    })
                }
                (_, Some(_)) => Ok(()),
                // The daemon's model is read once a second (the eye needs no more).
                (_, None) if live_read.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) => {
                    Ok(())
                }
                (_, None) => (|| {
                    live_read = Some(Instant::now());
                    if frames_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                        && app.can_travel
                    {
                        frames_read = Some(Instant::now());
                        if let Body::Frames { frames: f } = c.request(
                            Op::Frames {
                                from_wall_ns: wall_ns() - 3_600_000_000_000,
                                to_wall_ns: None,
                            },
                            Duration::from_secs(30),
                        )? {
                            frames = f
                                .into_iter()
                                .filter(|f| !f.states.is_empty())
                                .map(|f| f.states)
                                .collect();
                        }
                    }
                    let b = c.request(
                        Op::Live {
                            filters: filters.clone(),
                            close_wait_secs: a.close_wait_secs,
                            connections: 5000,
                        },
                        Duration::from_secs(30),
                    )?;
                    if let Body::Live {
                        snapshot,
                        connections,
                        events_seen,
                    } = b
                    {
                        let el = rate_t.elapsed().as_secs_f64().max(1e-3);
                        let rate =
                            rate_n.map_or(0.0, |n| events_seen.saturating_sub(n) as f64 / el);
                        (rate_t, rate_n) = (Instant::now(), Some(events_seen));
                        let states = snapshot.states.clone();
                        app.update(*snapshot, connections, rate);
                        if app.can_travel {
                            let mut h = frames.clone();
                            h.push(states);
                            app.set_history(h);
                        }
                    }
                    Ok(())
                })(),
            };
            if let Err(e) = res {
                let gone = crate::source::daemon::Client::connect(&path).is_err();
                if gone {
                    connected = false;
                    app.source =
                        format!("the daemon at {} is gone: waiting for it", path.display());
                } else {
                    app.log(format!("-- {e:#}"));
                }
            }
        }
        screen.draw(&app)?;
        if !wait_keys(&mut app, Instant::now() + refresh)? {
            return Ok(EXIT_OK);
        }
    }
}

/// The header's word on a default scope narrowed to tcpwatch's own namespace.
fn scope_suffix(f: &crate::cli::FilterArgs) -> String {
    match crate::settings::default_scope(f) {
        Some(n) => format!(", netns {n} only (--all-netns: all)"),
        None => String::new(),
    }
}
