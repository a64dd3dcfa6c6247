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

/// How much of a capture is read at once, and how much garbage is waded through before it
/// is declared no capture at all.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longer lines are skipped (and counted) without being held in memory.
    pub max_line: usize,
    /// No event within this many bytes from the start: not a capture.
    pub max_leading_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 64 << 10,
            max_leading_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no tcpwatch event in it (line {line}: {why})")]
    NoEvents { line: u64, why: String },
}

/// One line as read, bounded.
enum Line {
    Text,
    TooLong,
}

/// A capture read one event at a time, in bounded memory: lines are capped, events come out
/// as they are read (a capture from `trace --json` or `top --record` is in time order), and
/// what is not an event is counted.
pub struct Reader<R> {
    r: R,
    limits: Limits,
    line: Vec<u8>,
    /// Lines read, and those that were not events.
    pub lines: u64,
    pub skipped: u64,
    bytes: u64,
    seen_event: bool,
    /// The first line that was not an event, and why.
    first_bad: Option<(u64, String)>,
    /// Reset reason codes are the capturing kernel's numbering: its names come along.
    reasons: Vec<(u32, String)>,
    reasons_changed: bool,
}

impl<R: BufRead> Reader<R> {
    pub fn new(r: R, limits: Limits) -> Self {
        Reader {
            r,
            limits,
            line: Vec::new(),
            lines: 0,
            skipped: 0,
            bytes: 0,
            seen_event: false,
            first_bad: None,
            reasons: Vec::new(),
            reasons_changed: false,
        }
    }

    /// The next event; `None` at the end. A capture whose first `max_leading_bytes` (or all
    /// of it) hold no event is an error naming its first bad line.
    pub fn next_event(&mut self) -> Result<Option<Event>, ReplayError> {
        loop {
            if !self.seen_event && self.bytes > self.limits.max_leading_bytes {
                return Err(self.no_events());
            }
            let line = match self.read_line()? {
                None if self.seen_event => return Ok(None),
                None => return Err(self.no_events()),
                Some(l) => l,
            };
            self.lines += 1;
            let why = match line {
                Line::TooLong => format!("longer than {} bytes", self.limits.max_line),
                Line::Text => {
                    let text = String::from_utf8_lossy(&self.line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Value>(&text) {
                        Err(_) => "not JSON".to_string(),
                        Ok(v) => {
                            self.learn_reason(&v);
                            match event_from_json(&v) {
                                Some(e) => {
                                    self.seen_event = true;
                                    return Ok(Some(e));
                                }
                                // Loss records and other lines of a capture are no events.
                                None => "not a tcpwatch event".to_string(),
                            }
                        }
                    }
                }
            };
            self.skipped += 1;
            self.first_bad.get_or_insert((self.lines, why));
        }
    }

    /// The reset-reason names learned so far, when they changed since the last call.
    pub fn new_reasons(&mut self) -> Option<RstReasons> {
        std::mem::take(&mut self.reasons_changed).then(|| RstReasons::new(self.reasons.clone()))
    }

    fn no_events(&self) -> ReplayError {
        let (line, why) = self
            .first_bad
            .clone()
            .unwrap_or((self.lines.max(1), "the capture is empty".into()));
        ReplayError::NoEvents { line, why }
    }

    fn learn_reason(&mut self, v: &Value) {
        if let (Some(code), Some(name)) = (v["reason_code"].as_u64(), v["reason"].as_str())
            && v["type"] == "reset"
            && !self.reasons.iter().any(|(c, _)| u64::from(*c) == code)
            && self.reasons.len() < 256
        {
            self.reasons
                .push((code as u32, name.chars().take(64).collect()));
            self.reasons_changed = true;
        }
    }

    /// One line into `self.line`, or `TooLong` (its bytes past the cap are read and
    /// dropped, never held); `None` at the end.
    fn read_line(&mut self) -> std::io::Result<Option<Line>> {
        self.line.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Ok(any.then_some(if too_long { Line::TooLong } else { Line::Text }));
            }
            any = true;
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            if !too_long && self.line.len() + chunk.len() <= self.limits.max_line {
                self.line.extend_from_slice(chunk);
            } else {
                too_long = true;
                self.line.clear();
            }
            let used = done.unwrap_or(buf.len());
            self.r.consume(used);
            self.bytes += used as u64;
            if done.is_some() {
                return Ok(Some(if too_long { Line::TooLong } else { Line::Text }));
            }
            if !self.seen_event && self.bytes > self.limits.max_leading_bytes {
                // An endless first line (`/dev/zero`): give up on it here.
                return Ok(Some(Line::TooLong));
            }
        }
    }
}

/// A capture read back whole (small captures, tests): its events in time order, the lines
/// that were not events, and the names of the reset reasons its records carry.
pub struct Capture {
    pub events: Vec<Event>,
    pub skipped: usize,
    pub reasons: RstReasons,
}

/// Every event of a capture, sorted by time.
pub fn read(r: impl BufRead) -> Result<Capture, ReplayError> {
    let mut rd = Reader::new(r, Limits::default());
    let mut events = Vec::new();
    while let Some(e) = rd.next_event()? {
        events.push(e);
    }
    events.sort_by_key(|e| e.ts_ns);
    Ok(Capture {
        events,
        skipped: rd.skipped as usize,
        reasons: RstReasons::new(rd.reasons),
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

    const EVENT: &str = r#"{"type":"state","ts_ns":5,"cookie":1,"sk":"1","family":"inet","netns":1,"saddr":"127.0.0.1","sport":1,"daddr":"127.0.0.1","dport":2,"pid":null,"comm":null,"old":"CLOSE","new":"SYN_SENT","prev_state_ns":null}"#;

    #[test]
    fn loss_lines_and_garbage_are_skipped() {
        let text = format!("{{\"type\":\"loss\",\"ts_ns\":1}}\nnot json\n\n{EVENT}\n");
        let Capture {
            events: evs,
            skipped,
            ..
        } = read(std::io::Cursor::new(text)).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(skipped, 2);
    }

    #[test]
    fn a_file_without_events_names_its_first_bad_line() {
        let e = read(std::io::Cursor::new("\n{\"type\":\"loss\"}\nhello\n")).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("no tcpwatch event in it (line 2: not a tcpwatch event)")
        );
        let e = read(std::io::Cursor::new("")).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("no tcpwatch event in it (line 1: the capture is empty)")
        );
    }

    /// Endless input without a newline (`/dev/zero`) is given up on after a bounded read,
    /// holding at most one capped line.
    #[test]
    fn endless_garbage_ends_in_bounded_memory() {
        let zeros = std::io::BufReader::new(std::io::repeat(0));
        let mut rd = Reader::new(zeros, Limits::default());
        let e = rd.next_event().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("no tcpwatch event in it (line 1: longer than 65536 bytes)")
        );
        assert!(rd.line.capacity() <= Limits::default().max_line * 2);
    }

    #[test]
    fn long_lines_are_skipped_and_counted_once_events_came() {
        let long = "x".repeat(100 << 10);
        let text = format!("{EVENT}\n{long}\n{EVENT}\n");
        let mut rd = Reader::new(std::io::Cursor::new(text), Limits::default());
        assert!(rd.next_event().unwrap().is_some());
        assert!(rd.next_event().unwrap().is_some());
        assert!(rd.next_event().unwrap().is_none());
        assert_eq!((rd.lines, rd.skipped), (3, 1));
    }
}
