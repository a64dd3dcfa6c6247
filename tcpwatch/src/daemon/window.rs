//! A snapshot of a window, made from the record: what `snapshot --duration` would have
//! printed had it been started at the window's beginning. The window's events are replayed
//! into a fresh analysis (the full stream where the record still has it, the signals before
//! that), the frames give the listener queue peaks and the states over time, the counters
//! recorded at the window's start the kernel's deltas. A window reaching now uses the socket
//! listing of now; a past one takes its states from the frame at its end.
use std::collections::BTreeMap;

use crate::model::aggregate::ListenerSample;
use crate::model::api::{self, History};
use crate::model::history::Frame;
use crate::model::snapshot::{NsInput, Snapshot};
use crate::model::system::{Counters, SockRec};
use crate::recorder::{Table, query, store};
use crate::session::{Analysis, Context, Reading};
use crate::settings::Filters;
use crate::source::host::wall_ns;

use super::shared::Shared;

/// A window ending this close to now is "up to now".
const NOW_SLACK_NS: i64 = 2_000_000_000;

/// What a client asked for.
pub struct Ask {
    pub from_wall_ns: Option<i64>,
    pub to_wall_ns: Option<i64>,
    pub filters: api::Filters,
    pub close_wait_secs: u64,
}

pub fn snapshot(shared: &Shared, ask: &Ask) -> anyhow::Result<(Snapshot, Option<History>)> {
    let f = Filters::from_api(&ask.filters)?;
    let now = wall_ns();
    let to = ask.to_wall_ns.unwrap_or(now).min(now);
    let from = ask.from_wall_ns.unwrap_or(to).min(to);
    let live_end = to >= now - NOW_SLACK_NS;
    let ctx = Context {
        thresholds: crate::model::snapshot::Thresholds {
            close_wait_secs: ask.close_wait_secs,
            ..shared.ctx.thresholds
        },
        sockets_filtered: ask.filters.narrows_sockets(),
        ..shared.ctx.clone()
    };
    let window = from < to;
    let mut an = Analysis::new(ctx, window.then(|| shared.mono(from)));
    // Everything in the window stays in it (a snapshot of the past is not a live view).
    an.set_retention((to - from).max(0) as u64 + 60_000_000_000);
    let (loss, hooks) = shared.status(|s| (s.loss, s.hooks.clone()));
    let inv = shared
        .status(|s| s.inventory.clone())
        .map(|i| i.including(f.kernel.netns));
    let mut history = None;
    let mut counters_from: BTreeMap<u32, (i64, Counters)> = BTreeMap::new();
    if window {
        let rec = shared
            .recorder
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this daemon keeps no record (--state-dir off)"))?;
        // The last second too.
        rec.syncer().sync(std::time::Duration::from_secs(5));
        let span = rec.span();
        let conn = store::open_reader(rec.dir())?;
        let mut h = History {
            from_wall_ns: from,
            to_wall_ns: to,
            events_from_wall_ns: span.events_from_wall_ns,
            signals_from_wall_ns: span.signals_from_wall_ns,
            events_pruned: span.pruned.events,
            ..History::default()
        };
        let frames = query::frames(&conn, from, Some(to))?;
        let events = replay(shared, &conn, &span, &f, &mut an, from, to, &frames)?;
        an.tick(shared.mono(to));
        // Each namespace's counters where the window starts.
        let namespaces: Vec<u32> = match &inv {
            Some(i) => i.namespaces(),
            None => Vec::new(),
        };
        for ns in namespaces {
            match query::counters_at(&conn, ns, from, false)? {
                Some((w, c)) => {
                    counters_from.insert(ns, (w, Counters(c)));
                }
                // Nothing recorded before the window: if the daemon found the namespace
                // when it started (in the window), from what it read then; if it found it
                // later, the namespace was born since and counted from zero.
                None => match query::counters_at(&conn, ns, shared.started_wall_ns, false)? {
                    Some((w, c)) if w >= from => {
                        counters_from.insert(ns, (w, Counters(c)));
                    }
                    _ => {
                        counters_from.insert(ns, (from, Counters::default()));
                    }
                },
            }
        }
        h.counters_from_wall_ns = counters_from.values().map(|(w, _)| *w).min();
        h.events = events;
        h.frames = frames;
        history = Some(h);
    }
    let to_mono = shared.mono(to);
    let mut snap = if live_end {
        // An instant snapshot may share a listing of the last second; a window's end is
        // read now.
        let (socks, nss): (Vec<SockRec>, Vec<NsInput>) = if window {
            match &inv {
                Some(i) => i.read(),
                None => (Vec::new(), Vec::new()),
            }
        } else {
            let l = shared.listing(f.kernel.netns);
            (l.0.clone(), l.1.clone())
        };
        if window {
            an.seed(&socks);
        }
        let k = f.kernel.netns;
        let socks: Vec<SockRec> = socks
            .into_iter()
            .filter(|s| (k == 0 || s.netns == k) && f.accepts_sock(s))
            .collect();
        let nss: Vec<NsInput> = nss
            .into_iter()
            .filter(|n| k == 0 || n.inode == k)
            .map(|mut n| {
                // The window's deltas: from the counters recorded at its start (an instant
                // snapshot has none).
                n.counters_start = match counters_from.get(&n.inode) {
                    Some((_, c)) => c.clone(),
                    None => n.counters_now.clone(),
                };
                n
            })
            .collect();
        an.snapshot(
            shared.mono(now),
            Reading {
                inventory: Some(&socks),
                namespaces: nss,
                loss,
                hooks,
            },
        )
    } else {
        let mut s = an.snapshot(to_mono, Reading::none(loss, hooks));
        // States as they were: the frame at the window's end.
        if let Some(fr) = history
            .as_ref()
            .and_then(|h| h.frames.iter().rev().find(|fr| !fr.states.is_empty()))
        {
            s.states = fr.states.clone();
        }
        s
    };
    if let Some(r) = &shared.recorder {
        snap.loss.recorder_dropped = r.span().dropped;
    }
    Ok((snap, history))
}

/// The frames of [from, to] (for `top`'s charts and stepping).
pub fn frames(shared: &Shared, from: i64, to: Option<i64>) -> anyhow::Result<Vec<Frame>> {
    let rec = shared
        .recorder
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("this daemon keeps no record (--state-dir off)"))?;
    rec.syncer().sync(std::time::Duration::from_secs(5));
    let conn = store::open_reader(rec.dir())?;
    Ok(query::frames(&conn, from, to)?)
}

/// Replays the record's [from, to] into `an` (the full stream where the record still has it,
/// signals before that, queue peaks from the frames); returns the events applied.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    shared: &Shared,
    conn: &rusqlite::Connection,
    span: &api::RecordSpan,
    f: &Filters,
    an: &mut Analysis,
    from: i64,
    to: i64,
    frames: &[Frame],
) -> anyhow::Result<u64> {
    let ev_from = span.events_from_wall_ns.unwrap_or(i64::MAX).max(from);
    let mut events = 0u64;
    let mut apply = |wall: i64, mut e: crate::model::event::Event, an: &mut Analysis| {
        e.ts_ns = shared.mono(wall);
        if f.accepts_event(&e) {
            an.apply(std::slice::from_ref(&e));
            events += 1;
            if events.is_multiple_of(4096) {
                an.tick(e.ts_ns);
            }
        }
    };
    // Signals where the full stream was already pruned, then the full stream.
    if ev_from > from {
        query::events(conn, Table::Signals, from, Some(ev_from.min(to)), |w, j| {
            apply(w, j, an);
            true
        })?;
    }
    if ev_from < to {
        query::events(conn, Table::Events, ev_from, Some(to + 1), |w, j| {
            apply(w, j, an);
            true
        })?;
    }
    // The queues' peaks from the frames' samples.
    for fr in frames {
        let samples: Vec<ListenerSample> = fr
            .listeners
            .iter()
            .filter(|l| f.kernel.netns == 0 || f.kernel.netns == l.netns)
            .filter_map(|l| {
                let ip: std::net::IpAddr = l.addr.parse().ok()?;
                Some(ListenerSample {
                    netns: l.netns,
                    local: std::net::SocketAddr::new(ip, l.port),
                    cookie: l.cookie,
                    owner: None,
                    accept_now: l.accept_peak,
                    accept_max: l.accept_max,
                    syn_now: l.syn_peak,
                    drops: l.drops,
                })
            })
            .collect();
        an.aggregator_observe(&samples, shared.mono(fr.wall_ns));
    }
    Ok(events)
}

/// A filtered view's start: the last `span_ns` of the record replayed (the model thread
/// applies what follows). Everything sent to the recorder is on disk first.
pub fn seed_view(
    shared: &Shared,
    f: &Filters,
    an: &mut Analysis,
    span_ns: i64,
) -> anyhow::Result<()> {
    let Some(rec) = &shared.recorder else {
        return Ok(());
    };
    rec.syncer().sync(std::time::Duration::from_secs(5));
    let span = rec.span();
    let conn = store::open_reader(rec.dir())?;
    let now = wall_ns();
    let from = now - span_ns;
    let frames = query::frames(&conn, from, Some(now))?;
    replay(shared, &conn, &span, f, an, from, now, &frames)?;
    an.tick(shared.mono(now));
    Ok(())
}
