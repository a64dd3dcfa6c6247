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
            close_wait_secs: a.close_wait_secs,
            filters: a.filters,
            probe: a.probe,
        });
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
