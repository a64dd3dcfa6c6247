//! Replaying a capture: `tcpwatch trace --json` lines (or `top --record`) back into events, so a
//! capture from a production host can be inspected elsewhere, without root.
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::model::event::{
    Comm, Event, EventKind, Family, OverflowAction, OverflowSource, Owner, OwnerSource, Queue,
    RetransmitKind, RstReasons, TcpState, TwExitReason,
};

fn addr(v: &Value, ip: &str, port: &str) -> Option<SocketAddr> {
    let ip: IpAddr = v[ip].as_str()?.parse().ok()?;
    Some(SocketAddr::new(ip, v[port].as_u64()? as u16))
}

fn state(v: &Value) -> Option<TcpState> {
    v.as_str().and_then(TcpState::from_name)
}

/// One JSON line back into an event; `None` for lines that are not events (loss records, or
/// anything malformed).
pub fn event_from_json(v: &Value) -> Option<Event> {
    let family = match v["family"].as_str()? {
        "inet" => Family::Inet,
        "inet6" => Family::Inet6,
        _ => return None,
    };
    let owner = v["pid"].as_u64().map(|pid| Owner {
        pid: pid as u32,
        tid: v["tid"].as_u64().unwrap_or(pid) as u32,
        comm: Comm::new(v["comm"].as_str().unwrap_or("")),
        cgroup_id: v["cgroup_id"].as_u64().unwrap_or(0),
        source: match v["owner_source"].as_str() {
            Some("listener") => OwnerSource::Listener,
            Some("inventory") => OwnerSource::Inventory,
            _ => OwnerSource::Task,
        },
    });
    let kind = match v["type"].as_str()? {
        "state" => EventKind::State {
            old: state(&v["old"])?,
            new: state(&v["new"])?,
            prev_state_ns: v["prev_state_ns"].as_u64(),
        },
        "retransmit" => EventKind::Retransmit {
            kind: match v["kind"].as_str()? {
                "syn" => RetransmitKind::Syn,
                "synack" => RetransmitKind::SynAck,
                "fin" => RetransmitKind::Fin,
                _ => RetransmitKind::Data,
            },
            state: state(&v["state"]),
            nth: v["nth"].as_u64().unwrap_or(0) as u32,
            interval_ns: v["interval_ns"].as_u64(),
            err: v["err"].as_i64().unwrap_or(0) as i32,
            // Recordings from before `segs`: a sent retransmit was one segment.
            segs: v["segs"]
                .as_u64()
                .unwrap_or(u64::from(v["err"].as_i64().unwrap_or(0) == 0)) as u32,
            accept_queue: v["accept_queue"].as_u64().map(|x| x as u32),
            syn_queue: v["syn_queue"].as_u64().map(|x| x as u32),
        },
        "reset" => EventKind::Reset {
            sent: v["direction"] == "sent",
            state: state(&v["state"]),
            reason: v["reason_code"].as_u64().map(|x| x as u32),
        },
        "error" => EventKind::SockError {
            errno: v["errno"].as_i64()? as i32,
        },
        "timewait" => match v["event"].as_str()? {
            "rearm" => EventKind::TimeWaitRearm {
                substate: state(&v["substate"]),
            },
            ev @ ("enter" | "exit") => EventKind::TimeWait {
                enter: ev == "enter",
                substate: state(&v["substate"]),
                reason: match v["reason"].as_str() {
                    Some("expired") => Some(TwExitReason::Expired),
                    Some("reused") => Some(TwExitReason::Reused),
                    Some("killed") => Some(TwExitReason::Killed),
                    _ => None,
                },
                duration_ns: v["duration_ns"].as_u64(),
            },
            _ => return None,
        },
        "overflow" => EventKind::Overflow {
            queue: if v["queue"] == "syn" {
                Queue::Syn
            } else {
                Queue::Accept
            },
            len: v["len"].as_u64().map(|x| x as u32),
            max: v["max"].as_u64().map(|x| x as u32),
            count: v["count"].as_u64().unwrap_or(1),
            source: if v["source"] == "kfree_skb" {
                OverflowSource::Packet
            } else {
                OverflowSource::Counters
            },
            action: if v["action"] == "cookies" {
                OverflowAction::Cookies
            } else {
                OverflowAction::Dropped
            },
        },
        _ => return None,
    };
    Some(Event {
        ts_ns: v["ts_ns"].as_u64()?,
        cookie: v["cookie"].as_u64().unwrap_or(0),
        skaddr: v["sk"]
            .as_str()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(0),
        netns: v["netns"].as_u64().unwrap_or(0) as u32,
        family,
        local: addr(v, "saddr", "sport")?,
        remote: addr(v, "daddr", "dport")?,
        owner,
        softirq: v["softirq"].as_bool().unwrap_or(false),
        kind,
    })
}

/// A capture read back: its events in time order, the lines that were not events, and the
/// names of the reset reasons its records carry.
pub struct Capture {
    pub events: Vec<Event>,
    pub skipped: usize,
    pub reasons: RstReasons,
}

/// Every event of a capture.
pub fn read(r: impl BufRead) -> std::io::Result<Capture> {
    let mut out = Vec::new();
    let mut skipped = 0;
    // Reset reason codes are the capturing kernel's numbering: its names come along.
    let mut reasons: Vec<(u32, String)> = Vec::new();
    for line in r.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str::<Value>(&line).ok();
        if let Some(v) = &v
            && let (Some(code), Some(name)) = (v["reason_code"].as_u64(), v["reason"].as_str())
            && v["type"] == "reset"
            && !reasons.iter().any(|(c, _)| u64::from(*c) == code)
        {
            reasons.push((code as u32, name.to_string()));
        }
        match v.as_ref().and_then(event_from_json) {
            Some(e) => out.push(e),
            None => skipped += 1,
        }
    }
    out.sort_by_key(|e| e.ts_ns);
    Ok(Capture {
        events: out,
        skipped,
        reasons: RstReasons::new(reasons),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Clock;
    use crate::output::trace::TraceWriter;

    fn base(kind: EventKind) -> Event {
        Event {
            ts_ns: 123,
            cookie: 9,
            skaddr: 0xffff_8880_0000_1234,
            netns: 7,
            family: Family::Inet6,
            local: "[::1]:8080".parse().unwrap(),
            remote: "[::1]:40000".parse().unwrap(),
            owner: Some(Owner {
                pid: 42,
                tid: 43,
                comm: Comm::new("srv"),
                cgroup_id: 1,
                source: OwnerSource::Listener,
            }),
            softirq: true,
            kind,
        }
    }

    #[test]
    fn every_kind_round_trips_through_trace_json() {
        let kinds = [
            EventKind::State {
                old: TcpState::SynRecv,
                new: TcpState::Established,
                prev_state_ns: Some(5),
            },
            EventKind::Retransmit {
                kind: RetransmitKind::SynAck,
                state: Some(TcpState::SynRecv),
                nth: 2,
                interval_ns: Some(2_000),
                err: 0,
                segs: 1,
                accept_queue: Some(1),
                syn_queue: Some(3),
            },
            EventKind::Retransmit {
                kind: RetransmitKind::Data,
                state: Some(TcpState::Established),
                nth: 1,
                interval_ns: None,
                err: -11,
                segs: 3,
                accept_queue: None,
                syn_queue: None,
            },
            EventKind::Reset {
                sent: true,
                state: Some(TcpState::Close),
                reason: Some(1),
            },
            EventKind::SockError { errno: 110 },
            EventKind::TimeWait {
                enter: false,
                substate: Some(TcpState::TimeWait),
                reason: Some(TwExitReason::Reused),
                duration_ns: Some(7),
            },
            EventKind::TimeWaitRearm {
                substate: Some(TcpState::TimeWait),
            },
            EventKind::Overflow {
                queue: Queue::Syn,
                len: Some(5),
                max: Some(4),
                count: 14,
                source: OverflowSource::Counters,
                action: OverflowAction::Cookies,
            },
        ];
        let mut w = TraceWriter::new(
            Vec::new(),
            true,
            Clock {
                offset_ns: 0,
                utc_offset_s: 0,
            },
            0,
        );
        for k in kinds {
            w.event(&base(k)).unwrap();
        }
        let Capture {
            events: evs,
            skipped,
            ..
        } = read(std::io::Cursor::new(w.into_inner())).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(evs.len(), kinds.len());
        for (e, k) in evs.iter().zip(kinds) {
            assert_eq!(*e, base(k));
        }
    }

    #[test]
    fn loss_lines_and_garbage_are_skipped() {
        let text = "{\"type\":\"loss\",\"ts_ns\":1}\nnot json\n\n";
        let Capture {
            events: evs,
            skipped,
            ..
        } = read(std::io::Cursor::new(text)).unwrap();
        assert!(evs.is_empty());
        assert_eq!(skipped, 2);
    }
}
