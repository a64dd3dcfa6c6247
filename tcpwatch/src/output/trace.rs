//! `tcpwatch trace`: one line per event, as text for people or JSON lines for programs.
use std::io::{self, Write};
use std::net::SocketAddr;

use super::json::write_str;
use super::{Clock, human_ns};
use crate::model::Loss;
use crate::model::event::{Event, EventKind, Owner};

pub struct TraceWriter<W: Write> {
    out: W,
    json: bool,
    clock: Clock,
    /// The observer's own netns: text output only names other namespaces.
    home_netns: u32,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(out: W, json: bool, clock: Clock, home_netns: u32) -> Self {
        TraceWriter {
            out,
            json,
            clock,
            home_netns,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        if self.json {
            self.json_event(ev)
        } else {
            self.text_event(ev)
        }
    }

    /// Reports events lost since the previous report (`delta`) and in total.
    pub fn loss(&mut self, ts_ns: u64, delta: &Loss, total: &Loss) -> io::Result<()> {
        if self.json {
            writeln!(
                self.out,
                "{{\"type\":\"loss\",\"ts_ns\":{ts_ns},\"kernel_dropped\":{},\"channel_dropped\":{},\"decode_errors\":{},\"total\":{{\"kernel_dropped\":{},\"channel_dropped\":{},\"decode_errors\":{}}}}}",
                delta.kernel_dropped,
                delta.channel_dropped,
                delta.decode_errors,
                total.kernel_dropped,
                total.channel_dropped,
                total.decode_errors
            )
        } else {
            writeln!(
                self.out,
                "{} LOST {} events (kernel ring full {}, channel {}, undecodable {}); {} lost so far",
                self.clock.hms(ts_ns),
                delta.total(),
                delta.kernel_dropped,
                delta.channel_dropped,
                delta.decode_errors,
                total.total()
            )
        }
    }

    fn text_event(&mut self, ev: &Event) -> io::Result<()> {
        let owner = match &ev.owner {
            Some(o) => format!("{}/{}", o.pid, o.comm.to_string_lossy()),
            None => "?".to_string(),
        };
        let ns = if ev.netns != 0 && ev.netns != self.home_netns {
            format!(" [netns {}]", ev.netns)
        } else {
            String::new()
        };
        write!(
            self.out,
            "{} {:<22} {:<10} {} -> {}{}  ",
            self.clock.hms(ev.ts_ns),
            owner,
            ev.kind.type_name(),
            ev.local,
            ev.remote,
            ns
        )?;
        match ev.kind {
            EventKind::State {
                old,
                new,
                prev_state_ns,
            } => {
                write!(self.out, "{} -> {}", old.name(), new.name())?;
                if let Some(d) = prev_state_ns {
                    write!(self.out, " ({} in {})", human_ns(d), old.name())?;
                }
            }
            EventKind::Retransmit {
                kind,
                state,
                nth,
                interval_ns,
                err,
            } => {
                write!(self.out, "{} #{}", kind.name(), nth)?;
                if let Some(s) = state {
                    write!(self.out, " in {}", s.name())?;
                }
                if let Some(i) = interval_ns {
                    write!(self.out, " (+{} since previous)", human_ns(i))?;
                }
                if err != 0 {
                    write!(self.out, " err={err}")?;
                }
            }
            EventKind::Reset {
                sent,
                state,
                reason,
            } => {
                write!(self.out, "RST {}", if sent { "sent" } else { "received" })?;
                if let Some(s) = state {
                    write!(self.out, " in {}", s.name())?;
                }
                if let Some(r) = reason {
                    write!(self.out, " reason={r}")?;
                }
            }
            EventKind::SockError { errno } => {
                write!(
                    self.out,
                    "{} ({})",
                    errno_name(errno),
                    std::io::Error::from_raw_os_error(errno)
                )?;
            }
            EventKind::TimeWait {
                enter,
                substate,
                reason,
                duration_ns,
            } => {
                write!(self.out, "{}", if enter { "enter" } else { "exit" })?;
                if let Some(s) = substate {
                    write!(self.out, " {}", s.name())?;
                }
                if let Some(r) = reason {
                    write!(self.out, " {}", r.name())?;
                }
                if let Some(d) = duration_ns {
                    write!(self.out, " after {}", human_ns(d))?;
                }
            }
            EventKind::TimeWaitRearm { substate } => {
                write!(self.out, "rearm")?;
                if let Some(s) = substate {
                    write!(self.out, " {}", s.name())?;
                }
            }
            EventKind::Overflow {
                queue,
                len,
                max,
                count,
            } => {
                write!(self.out, "{} queue of listener {}", queue.name(), ev.local)?;
                if let (Some(l), Some(m)) = (len, max) {
                    write!(self.out, " ({l}/{m})")?;
                }
                if count != 1 {
                    write!(self.out, " x{count}")?;
                }
            }
        }
        writeln!(self.out)
    }

    fn json_event(&mut self, ev: &Event) -> io::Result<()> {
        let w = &mut self.out;
        write!(
            w,
            "{{\"type\":\"{}\",\"ts_ns\":{},\"cookie\":{},\"sk\":\"{:x}\",",
            ev.kind.type_name(),
            ev.ts_ns,
            ev.cookie,
            ev.skaddr
        )?;
        write!(
            w,
            "\"family\":\"{}\",\"netns\":{},",
            ev.family.name(),
            ev.netns
        )?;
        write_endpoint(w, "s", &ev.local)?;
        write_endpoint(w, "d", &ev.remote)?;
        write_owner(w, ev.owner.as_ref())?;
        write!(w, ",\"softirq\":{}", ev.softirq)?;
        match ev.kind {
            EventKind::State {
                old,
                new,
                prev_state_ns,
            } => {
                write!(
                    w,
                    ",\"old\":\"{}\",\"new\":\"{}\",\"prev_state_ns\":",
                    old.name(),
                    new.name()
                )?;
                write_opt(w, prev_state_ns)?;
            }
            EventKind::Retransmit {
                kind,
                state,
                nth,
                interval_ns,
                err,
            } => {
                write!(
                    w,
                    ",\"kind\":\"{}\",\"nth\":{},\"state\":",
                    kind.name(),
                    nth
                )?;
                write_opt_str(w, state.map(|s| s.name()))?;
                write!(w, ",\"interval_ns\":")?;
                write_opt(w, interval_ns)?;
                write!(w, ",\"err\":{err}")?;
            }
            EventKind::Reset {
                sent,
                state,
                reason,
            } => {
                write!(
                    w,
                    ",\"direction\":\"{}\",\"state\":",
                    if sent { "sent" } else { "received" }
                )?;
                write_opt_str(w, state.map(|s| s.name()))?;
                write!(w, ",\"reason\":")?;
                write_opt(w, reason)?;
            }
            EventKind::SockError { errno } => {
                write!(w, ",\"errno\":{errno},\"error\":\"{}\"", errno_name(errno))?;
            }
            EventKind::TimeWait {
                enter,
                substate,
                reason,
                duration_ns,
            } => {
                write!(
                    w,
                    ",\"event\":\"{}\",\"substate\":",
                    if enter { "enter" } else { "exit" }
                )?;
                write_opt_str(w, substate.map(|s| s.name()))?;
                write!(w, ",\"reason\":")?;
                write_opt_str(w, reason.map(|r| r.name()))?;
                write!(w, ",\"duration_ns\":")?;
                write_opt(w, duration_ns)?;
            }
            EventKind::TimeWaitRearm { substate } => {
                write!(w, ",\"event\":\"rearm\",\"substate\":")?;
                write_opt_str(w, substate.map(|s| s.name()))?;
                write!(w, ",\"reason\":null")?;
            }
            EventKind::Overflow {
                queue,
                len,
                max,
                count,
            } => {
                write!(
                    w,
                    ",\"queue\":\"{}\",\"listener\":{{\"addr\":\"{}\",\"port\":{}}},\"len\":",
                    queue.name(),
                    ev.local.ip(),
                    ev.local.port()
                )?;
                write_opt(w, len)?;
                write!(w, ",\"max\":")?;
                write_opt(w, max)?;
                write!(w, ",\"count\":{count}")?;
            }
        }
        w.write_all(b"}\n")
    }
}

fn write_endpoint<W: Write>(w: &mut W, side: &str, a: &SocketAddr) -> io::Result<()> {
    write!(
        w,
        "\"{side}addr\":\"{}\",\"{side}port\":{},",
        a.ip(),
        a.port()
    )
}

fn write_owner<W: Write>(w: &mut W, o: Option<&Owner>) -> io::Result<()> {
    match o {
        Some(o) => {
            write!(w, "\"pid\":{},\"tid\":{},\"comm\":", o.pid, o.tid)?;
            write_str(w, o.comm.as_bytes())?;
            write!(
                w,
                ",\"cgroup_id\":{},\"owner_source\":\"{}\"",
                o.cgroup_id,
                o.source.name()
            )
        }
        None => write!(
            w,
            "\"pid\":null,\"tid\":null,\"comm\":null,\"cgroup_id\":null,\"owner_source\":null"
        ),
    }
}

fn write_opt<W: Write, T: std::fmt::Display>(w: &mut W, v: Option<T>) -> io::Result<()> {
    match v {
        Some(v) => write!(w, "{v}"),
        None => w.write_all(b"null"),
    }
}

fn write_opt_str<W: Write>(w: &mut W, v: Option<&str>) -> io::Result<()> {
    match v {
        Some(v) => write!(w, "\"{v}\""),
        None => w.write_all(b"null"),
    }
}

/// Symbolic errno names for the errors TCP sockets report.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => "E?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Comm, Family, OwnerSource, RetransmitKind, TcpState};

    fn clock() -> Clock {
        Clock {
            offset_ns: 0,
            utc_offset_s: 0,
        }
    }

    fn ev(kind: EventKind) -> Event {
        Event {
            ts_ns: 3_723_000_001_000,
            cookie: 12,
            skaddr: 0xffff,
            netns: 4026531840,
            family: Family::Inet,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
            owner: Some(Owner {
                pid: 42,
                tid: 43,
                comm: Comm::new("cur\"l"),
                cgroup_id: 1,
                source: OwnerSource::Task,
            }),
            softirq: false,
            kind,
        }
    }

    fn state() -> EventKind {
        EventKind::State {
            old: TcpState::SynSent,
            new: TcpState::Established,
            prev_state_ns: Some(1_500_000),
        }
    }

    #[test]
    fn text_line() {
        let mut w = TraceWriter::new(Vec::new(), false, clock(), 4026531840);
        w.event(&ev(state())).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(
            s,
            "01:02:03.000001 42/cur\"l               state      127.0.0.1:40000 -> 127.0.0.1:8080  SYN_SENT -> ESTABLISHED (1.5ms in SYN_SENT)\n"
        );
    }

    #[test]
    fn json_line_has_the_contract_fields() {
        let mut w = TraceWriter::new(Vec::new(), true, clock(), 0);
        w.event(&ev(state())).unwrap();
        let mut unknown = ev(EventKind::Retransmit {
            kind: RetransmitKind::Syn,
            state: Some(TcpState::SynSent),
            nth: 2,
            interval_ns: None,
            err: 0,
        });
        unknown.owner = None;
        unknown.family = Family::Inet6;
        unknown.local = "[::1]:1".parse().unwrap();
        w.event(&unknown).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        let lines: Vec<serde_json::Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let a = &lines[0];
        assert_eq!(a["type"], "state");
        assert_eq!(a["ts_ns"], 3_723_000_001_000u64);
        assert_eq!(a["cookie"], 12);
        assert_eq!(a["sk"], "ffff");
        assert_eq!(a["family"], "inet");
        assert_eq!(a["netns"], 4026531840u64);
        assert_eq!(a["saddr"], "127.0.0.1");
        assert_eq!(a["sport"], 40000);
        assert_eq!(a["daddr"], "127.0.0.1");
        assert_eq!(a["dport"], 8080);
        assert_eq!(a["pid"], 42);
        assert_eq!(a["comm"], "cur\"l");
        assert_eq!(a["old"], "SYN_SENT");
        assert_eq!(a["new"], "ESTABLISHED");
        assert_eq!(a["prev_state_ns"], 1_500_000);
        let b = &lines[1];
        assert_eq!(b["type"], "retransmit");
        assert_eq!(b["kind"], "syn");
        assert_eq!(b["nth"], 2);
        assert_eq!(b["family"], "inet6");
        assert_eq!(b["saddr"], "::1");
        assert!(b["pid"].is_null());
        assert!(b["interval_ns"].is_null());
    }

    #[test]
    fn loss_lines() {
        let mut w = TraceWriter::new(Vec::new(), true, clock(), 0);
        let d = Loss {
            kernel_dropped: 5,
            channel_dropped: 0,
            decode_errors: 1,
        };
        let t = Loss {
            kernel_dropped: 9,
            channel_dropped: 0,
            decode_errors: 1,
        };
        w.loss(7, &d, &t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.into_inner()).unwrap();
        assert_eq!(v["type"], "loss");
        assert_eq!(v["kernel_dropped"], 5);
        assert_eq!(v["total"]["kernel_dropped"], 9);
        let mut w = TraceWriter::new(Vec::new(), false, clock(), 0);
        w.loss(0, &d, &t).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert!(
            s.contains(
                "LOST 6 events (kernel ring full 5, channel 0, undecodable 1); 10 lost so far"
            ),
            "{s}"
        );
    }
}
