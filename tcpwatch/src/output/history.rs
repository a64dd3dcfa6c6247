//! A past window's history as text: where the record's data came from, then the states and
//! what happened over time, one row per frame (or per group of frames, at most 60 rows).
use std::io::{self, Write};

use crate::model::api::History;
use crate::model::history::Frame;
use crate::model::time::Clock;

/// Rows printed at most: longer windows group frames.
const ROWS: usize = 60;

fn hms(clock: &Clock, wall_ns: i64) -> String {
    let mono = (wall_ns as i128 - clock.offset_ns).max(0) as u64;
    let s = clock.hms(mono);
    s.split('.').next().unwrap_or(&s).to_string()
}

pub fn write_text<W: Write>(w: W, h: &History, clock: &Clock) -> io::Result<()> {
    let mut w = super::printable::Escaped::new(w);
    write_raw(&mut w, h, clock)?;
    w.flush()
}

fn write_raw<W: Write>(mut w: W, h: &History, clock: &Clock) -> io::Result<()> {
    writeln!(w)?;
    writeln!(
        w,
        "HISTORY {} .. {} (the daemon's record)",
        hms(clock, h.from_wall_ns),
        hms(clock, h.to_wall_ns)
    )?;
    match (h.events_from_wall_ns, h.signals_from_wall_ns) {
        (Some(e), _) if e <= h.from_wall_ns => {
            writeln!(w, "  every event of the window ({} replayed)", h.events)?
        }
        (Some(e), _) if h.events_pruned == 0 => writeln!(
            w,
            "  every event from {}, where the record begins; {} replayed",
            hms(clock, e),
            h.events
        )?,
        (Some(e), Some(s)) => writeln!(
            w,
            "  every event from {} (older ones pruned to stay inside --history-mib); retransmits, resets, errors and overflows from {}; {} replayed",
            hms(clock, e),
            hms(clock, s.max(h.from_wall_ns)),
            h.events
        )?,
        _ => writeln!(w, "  no events recorded in the window; frames only")?,
    }
    if let Some(c) = h.counters_from_wall_ns
        && c > h.from_wall_ns + 10_000_000_000
    {
        writeln!(
            w,
            "  kernel counters from {} (none recorded earlier)",
            hms(clock, c)
        )?;
    }
    if h.frames.is_empty() {
        writeln!(w, "  no 10-second frames in the window")?;
        return Ok(());
    }
    writeln!(
        w,
        "  {:<8} {:>7} {:>8} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8} {:>6} {:>9} {:>5}",
        "time",
        "ESTAB",
        "SYN_SENT",
        "SYN_RECV",
        "TIME_WAIT",
        "CLOSE_WAIT",
        "opened",
        "closed",
        "retrans",
        "resets",
        "overflows",
        "lost"
    )?;
    let per = h.frames.len().div_ceil(ROWS).max(1);
    for group in h.frames.chunks(per) {
        let last = group.last().expect("chunks are not empty");
        let st = |k: &str| {
            group
                .iter()
                .rev()
                .find(|f| !f.states.is_empty())
                .and_then(|f| f.states.get(k).copied())
                .map_or("-".to_string(), |n| n.to_string())
        };
        let sum = |g: fn(&Frame) -> u64| group.iter().map(g).sum::<u64>();
        writeln!(
            w,
            "  {:<8} {:>7} {:>8} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8} {:>6} {:>9} {:>5}",
            hms(clock, last.wall_ns),
            st("ESTABLISHED"),
            st("SYN_SENT"),
            st("SYN_RECV"),
            st("TIME_WAIT"),
            st("CLOSE_WAIT"),
            sum(|f| f.opened),
            sum(|f| f.closed),
            sum(|f| f.retransmits.values().sum()),
            sum(|f| f.resets.values().sum()),
            sum(|f| f.overflows.accept + f.overflows.syn + f.overflows.syncookies),
            sum(|f| f.lost),
        )?;
    }
    // The listeners that overflowed or filled up, with their owners: who to look at.
    let mut busy: Vec<(String, String, u64, u32)> = Vec::new();
    for f in &h.frames {
        for l in &f.listeners {
            let key = crate::model::snapshot::endpoint(&l.addr, l.port);
            let owner = l
                .owner
                .as_ref()
                .map_or("?".to_string(), |o| format!("{}/{}", o.pid, o.comm));
            let o = l.overflows.accept + l.overflows.syn + l.overflows.syncookies;
            match busy.iter_mut().find(|b| b.0 == key && b.1 == owner) {
                Some(b) => {
                    b.2 += o;
                    b.3 = b.3.max(l.accept_peak);
                }
                None => busy.push((key, owner, o, l.accept_peak)),
            }
        }
    }
    busy.retain(|b| b.2 > 0);
    busy.sort_by_key(|b| std::cmp::Reverse(b.2));
    if !busy.is_empty() {
        writeln!(w, "  listeners that overflowed in the window:")?;
        for (addr, owner, o, peak) in busy.iter().take(10) {
            writeln!(
                w,
                "    {addr:<24} {owner:<24} {o} overflows, accept queue peak {peak}"
            )?;
        }
    }
    Ok(())
}
