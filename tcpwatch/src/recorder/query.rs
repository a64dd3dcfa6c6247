//! Reading the record: what a past window, a timeline or a `--since` stream needs, each on a
//! read-only connection beside the writer (WAL: readers and the writer never wait for each
//! other).
use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use super::Table;
use crate::model::event::Event;
use crate::model::history::{Frame, ListenerFrame};
use crate::model::snapshot::{OverflowsView, OwnerView, SocketView};

/// Calls `each(wall_ns, event)` for the recorded events (or signals) of [from, to) in the
/// order they were recorded, until it returns false. Returns how many it was given (a row
/// that does not decode is skipped: the file is another process's to damage).
pub fn events(
    conn: &Connection,
    table: Table,
    from_wall_ns: i64,
    to_wall_ns: Option<i64>,
    mut each: impl FnMut(i64, Event) -> bool,
) -> rusqlite::Result<u64> {
    let name = match table {
        Table::Signals => "signals",
        _ => "events",
    };
    // The first row of the window through the time index, then the rest in insertion order
    // by key (no sort of a million rows).
    let first: Option<i64> = conn.query_row(
        &format!("SELECT min(id) FROM {name} WHERE wall_ns >= ?1"),
        [from_wall_ns],
        |r| r.get(0),
    )?;
    let Some(first) = first else { return Ok(0) };
    let mut st = conn.prepare(&format!(
        "SELECT wall_ns, ev FROM {name} WHERE id >= ?1 AND wall_ns < ?2 ORDER BY id"
    ))?;
    let mut rows = st.query(params![first, to_wall_ns.unwrap_or(i64::MAX)])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let wall: i64 = r.get(0)?;
        if wall < from_wall_ns {
            continue;
        }
        let Some(e) = r.get_ref(1)?.as_blob().ok().and_then(super::decode) else {
            continue;
        };
        n += 1;
        if !each(wall, e) {
            break;
        }
    }
    Ok(n)
}

/// The frames of [from, to], oldest first, each with its listeners.
pub fn frames(
    conn: &Connection,
    from_wall_ns: i64,
    to_wall_ns: Option<i64>,
) -> rusqlite::Result<Vec<Frame>> {
    let to = to_wall_ns.unwrap_or(i64::MAX);
    let mut st = conn.prepare(
        "SELECT json FROM frames WHERE wall_ns >= ?1 AND wall_ns <= ?2 ORDER BY wall_ns",
    )?;
    let mut out: Vec<Frame> = st
        .query_map(params![from_wall_ns, to], |r| r.get::<_, String>(0))?
        .filter_map(|j| j.ok().and_then(|j| serde_json::from_str(&j).ok()))
        .collect();
    let mut st = conn.prepare(
        "SELECT wall_ns, netns, addr, port, cookie, pid, comm, accept_peak, accept_max, syn_peak,
                drops, overflow_accept, overflow_syn, syncookies, final_ack_packets,
                synack_retransmits
         FROM listener_frames WHERE wall_ns >= ?1 AND wall_ns <= ?2 ORDER BY wall_ns, rowid",
    )?;
    let mut rows = st.query(params![from_wall_ns, to])?;
    let mut i = 0;
    while let Some(r) = rows.next()? {
        let wall: i64 = r.get(0)?;
        while i < out.len() && out[i].wall_ns < wall {
            i += 1;
        }
        let Some(f) = out.get_mut(i).filter(|f| f.wall_ns == wall) else {
            continue;
        };
        let pid: Option<u32> = r.get(5)?;
        let comm: Option<String> = r.get(6)?;
        f.listeners.push(ListenerFrame {
            netns: r.get(1)?,
            addr: r.get(2)?,
            port: r.get(3)?,
            cookie: r.get::<_, i64>(4)? as u64,
            owner: pid.map(|pid| OwnerView {
                pid,
                comm: comm.unwrap_or_default(),
            }),
            accept_peak: r.get(7)?,
            accept_max: r.get(8)?,
            syn_peak: r.get(9)?,
            drops: r.get::<_, i64>(10)? as u64,
            overflows: OverflowsView {
                accept: r.get::<_, i64>(11)? as u64,
                syn: r.get::<_, i64>(12)? as u64,
                syncookies: r.get::<_, i64>(13)? as u64,
                final_ack_packets: r.get::<_, i64>(14)? as u64,
            },
            synack_retransmits: r.get::<_, i64>(15)? as u64,
        });
    }
    Ok(out)
}

/// A namespace's counters as recorded at or before `wall_ns` (else, with `or_after`, the
/// first after it), and when they were read.
pub fn counters_at(
    conn: &Connection,
    netns: u32,
    wall_ns: i64,
    or_after: bool,
) -> rusqlite::Result<Option<(i64, BTreeMap<String, u64>)>> {
    let row = |sql: &str| -> rusqlite::Result<Option<(i64, String)>> {
        let mut st = conn.prepare(sql)?;
        let mut rows = st.query(params![netns, wall_ns])?;
        Ok(match rows.next()? {
            Some(r) => Some((r.get(0)?, r.get(1)?)),
            None => None,
        })
    };
    let found = match row(
        "SELECT wall_ns, json FROM counters WHERE netns = ?1 AND wall_ns <= ?2
         ORDER BY wall_ns DESC LIMIT 1",
    )? {
        Some(r) => Some(r),
        None if !or_after => None,
        None => row(
            "SELECT wall_ns, json FROM counters WHERE netns = ?1 AND wall_ns > ?2
             ORDER BY wall_ns LIMIT 1",
        )?,
    };
    Ok(found.and_then(|(w, j)| serde_json::from_str(&j).ok().map(|c| (w, c))))
}

/// Which recorded timelines a query wants.
pub enum Which<'a> {
    Cookie(u64),
    Endpoints {
        local: &'a str,
        remote: &'a str,
        netns: Option<u32>,
    },
}

/// Recorded timelines, the most recently closed first (at most `limit`), each with the
/// clock offset it was recorded under.
pub fn timelines(
    conn: &Connection,
    which: &Which<'_>,
    limit: usize,
) -> rusqlite::Result<Vec<(SocketView, i64)>> {
    let limit = limit as i64;
    let map =
        |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, i64)> { Ok((r.get(0)?, r.get(1)?)) };
    let rows: Vec<(String, i64)> = match which {
        Which::Cookie(c) => conn
            .prepare(
                "SELECT json, clock_offset_ns FROM timelines WHERE cookie = ?1
                 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![*c as i64, limit], map)?
            .collect::<Result<_, _>>()?,
        Which::Endpoints {
            local,
            remote,
            netns,
        } => conn
            .prepare(
                "SELECT json, clock_offset_ns FROM timelines
                 WHERE ((local = ?1 AND remote = ?2) OR (local = ?2 AND remote = ?1))
                   AND (?3 IS NULL OR netns = ?3)
                 ORDER BY id DESC LIMIT ?4",
            )?
            .query_map(params![local, remote, netns, limit], map)?
            .collect::<Result<_, _>>()?,
    };
    Ok(rows
        .into_iter()
        .filter_map(|(j, off)| serde_json::from_str(&j).ok().map(|v| (v, off)))
        .collect())
}
