//! `tcpwatch top`: the interactive view over a live session (or a replayed capture), drawn
//! at `--refresh` per second; a plain snapshot when stdout is not a terminal.
use std::io::{self, BufWriter, IsTerminal as _};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, note, thresholds, watching};
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
    if !io::stdout().is_terminal() {
        if a.replay.is_some() {
            anyhow::bail!("--replay needs a terminal");
        }
        note!(
            "tcpwatch: stdout is not a terminal: printing a snapshot instead of the interactive view"
        );
        return super::snapshot::run(SnapshotArgs {
            json: false,
            duration: 0.0,
            close_wait_secs: a.close_wait_secs,
            filters: a.filters,
            probe: a.probe,
        });
    }
    match &a.replay {
        Some(p) => replay(&a, p),
        None => live(&a),
    }
}

fn live(a: &TopArgs) -> anyhow::Result<i32> {
    let stop = signals::install();
    let mut session = watching(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    let mut record = match &a.record {
        Some(p) => Some(
            TraceWriter::new(
                BufWriter::new(
                    std::fs::File::create(p)
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
    let mut app = App::new(format!("host {}", session.analysis().context().host));
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

fn replay(a: &TopArgs, path: &std::path::Path) -> anyhow::Result<i32> {
    let f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("--replay {}: {e}", path.display()))?;
    let capture = crate::source::replay::read(io::BufReader::new(f))
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let filters = Filters::from_args(&a.filters)?;
    let events: Vec<Event> = capture
        .events
        .into_iter()
        .filter(|e| filters.kernel_accepts(e) && filters.accepts(e))
        .collect();
    let log = LogLines::new(
        Clock {
            offset_ns: 0,
            utc_offset_s: 0,
        },
        0,
        capture.reasons.clone(),
    );
    let mut app = App::new(format!(
        "replay {} ({} events, {} other lines)",
        path.display(),
        events.len(),
        capture.skipped
    ));
    let first = events.first().map_or(0, |e| e.ts_ns);
    let mut analysis = Analysis::new(
        Context {
            host: String::new(),
            kernel: "(replay)".into(),
            home_netns: 0,
            thresholds: thresholds(a.close_wait_secs),
            sockets_filtered: a.filters.narrows_sockets(),
            reasons: capture.reasons,
        },
        Some(first),
    );
    let mut screen = Screen::new()?;
    let wall0 = Instant::now();
    let mut i = 0;
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    loop {
        // Everything up to the replay clock (all at once at speed 0).
        let replay_now = if a.speed <= 0.0 {
            u64::MAX
        } else {
            first + (wall0.elapsed().as_nanos() as f64 * a.speed) as u64
        };
        let before = i;
        while i < events.len() && events[i].ts_ns <= replay_now {
            analysis.apply(std::slice::from_ref(&events[i]));
            app.log(log.line(&events[i]));
            i += 1;
        }
        let now = if i > 0 { events[i - 1].ts_ns } else { first };
        analysis.tick(now);
        if i != before || app.snap.version == 0 {
            let snap = analysis.snapshot(now, Reading::none(Loss::default(), Vec::new()));
            app.update(
                snap,
                analysis.connections(now),
                (i - before) as f64 / refresh.as_secs_f64(),
            );
        }
        screen.draw(&app)?;
        if !wait_keys(&mut app, Instant::now() + refresh)? {
            return Ok(EXIT_OK);
        }
    }
}
