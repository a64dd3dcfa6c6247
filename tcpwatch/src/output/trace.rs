//! `tcpwatch trace`: one line per event, as text for people or JSON lines for programs.
use std::io::{self, Write};
use std::net::IpAddr;

use super::json::write_str;
use super::{Clock, human_ns};
use crate::model::Loss;
use crate::model::event::{Event, EventKind, RetransmitKind, RstReasons, TwOp};
use crate::model::system::errno_name;

pub struct TraceWriter<W: Write> {
    out: W,
    /// Lines formatted since the last flush: one write per batch, not per event.
    pending: Vec<u8>,
    json: bool,
    clock: Clock,
    /// The observer's own netns: text output only names other namespaces.
    home_netns: u32,
    reasons: RstReasons,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(out: W, json: bool, clock: Clock, home_netns: u32) -> Self {
        TraceWriter {
            pending: Vec::with_capacity(1 << 16),
            out,
            json,
            clock,
            home_netns,
            reasons: RstReasons::default(),
        }
    }

    /// Names reset reasons with this kernel's (or capture's) table.
    pub fn with_reasons(mut self, reasons: RstReasons) -> Self {
        self.reasons = reasons;
        self
    }

    pub fn into_inner(mut self) -> W {
        let _ = self.flush();
        self.out
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            if self.json {
                self.out.write_all(&self.pending)?;
            } else {
                // Names come from other users' processes and from captures: shown, never
                // obeyed by the terminal.
                self.out
                    .write_all(super::printable::escape_bytes(&self.pending).as_bytes())?;
            }
            self.pending.clear();
        }
        self.out.flush()
    }

    /// The lines formatted since the last flush, taken instead of written (the daemon stores
    /// and sends them itself): in JSON mode one line per event, in order.
    pub fn take_lines(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Bytes formatted and not yet written or taken.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// A line written as it came (a daemon's JSON line, passed on); it must end in '\n'.
    pub fn raw_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(line);
        if self.pending.len() >= 1 << 16 {
            self.flush()?;
        }
        Ok(())
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
            fn fields(j: &mut JsonLine<'_>, l: &Loss) {
                j.u64("kernel_dropped", l.kernel_dropped);
                j.raw_key("kernel_dropped_by_type");
                j.buf.push(b'{');
                for (i, (k, n)) in l.kernel_dropped_by_type.nonzero().enumerate() {
                    if i > 0 {
                        j.buf.push(b',');
                    }
                    j.buf.push(b'"');
                    j.buf.extend_from_slice(k.as_bytes());
                    j.buf.extend_from_slice(b"\":");
                    push_u64(j.buf, n);
                }
                j.buf.push(b'}');
                j.u64("kernel_skipped", l.kernel_skipped);
                j.u64("channel_dropped", l.channel_dropped);
                j.u64("decode_errors", l.decode_errors);
            }
            let mut j = JsonLine::new(&mut self.pending);
            j.str_static("type", "loss");
            j.u64("ts_ns", ts_ns);
            fields(&mut j, delta);
            j.raw_key("total");
            let mut t = JsonLine::new(j.buf);
            fields(&mut t, total);
            t.buf.push(b'}');
            j.finish();
            Ok(())
        } else {
            writeln!(
                self.pending,
                "{} LOST {} events (kernel ring full {}, skipped by the kernel {}, channel {}, undecodable {}); {} lost so far",
                self.clock.hms(ts_ns),
                delta.total(),
                delta.kernel_dropped,
                delta.kernel_skipped,
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
            self.pending,
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
                write!(self.pending, "{} -> {}", old.name(), new.name())?;
                if let Some(d) = prev_state_ns {
                    write!(self.pending, " ({} in {})", human_ns(d), old.name())?;
                }
            }
            EventKind::Retransmit {
                kind,
                state,
                nth,
                interval_ns,
                err,
                segs,
                ..
            } => {
                if segs == 0 {
                    write!(self.pending, "{} attempt not sent", kind.name())?;
                } else {
                    write!(self.pending, "{} #{}", kind.name(), nth)?;
                }
                if let Some(s) = state {
                    write!(self.pending, " in {}", s.name())?;
                }
                if segs > 1 {
                    write!(self.pending, " {segs} segments")?;
                }
                if let Some(i) = interval_ns.filter(|_| segs > 0) {
                    write!(self.pending, " (+{} since previous)", human_ns(i))?;
                }
                if err != 0 {
                    write!(self.pending, " err={err}")?;
                }
            }
            EventKind::Reset {
                sent,
                state,
                reason,
            } => {
                write!(
                    self.pending,
                    "RST {}",
                    if sent { "sent" } else { "received" }
                )?;
                if let Some(s) = state {
                    write!(self.pending, " in {}", s.name())?;
                }
                if let Some(r) = reason {
                    match self.reasons.name(r) {
                        Some(n) => write!(self.pending, " reason={n}")?,
                        None => write!(self.pending, " reason={r}")?,
                    }
                }
            }
            EventKind::SockError { errno } => {
                write!(
                    self.pending,
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
                write!(self.pending, "{}", if enter { "enter" } else { "exit" })?;
                if let Some(s) = substate {
                    write!(self.pending, " {}", s.name())?;
                }
                if let Some(r) = reason {
                    write!(self.pending, " {}", r.name())?;
                }
                if let Some(d) = duration_ns {
                    write!(self.pending, " after {}", human_ns(d))?;
                }
            }
            EventKind::TimeWaitRearm { substate } => {
                write!(self.pending, "rearm")?;
                if let Some(s) = substate {
                    write!(self.pending, " {}", s.name())?;
                }
            }
            EventKind::TwTimer { op, .. } => {
                write!(self.pending, "timer {op:?}")?;
            }
            EventKind::Overflow {
                queue,
                len,
                max,
                count,
                source,
                action,
            } => {
                write!(self.pending, "{} {} ", action.name(), source.name())?;
                write!(
                    self.pending,
                    "{} queue of listener {}",
                    queue.name(),
                    ev.local
                )?;
                if let (Some(l), Some(m)) = (len, max) {
                    write!(self.pending, " ({l}/{m})")?;
                }
                if count != 1 {
                    write!(self.pending, " x{count}")?;
                }
            }
        }
        writeln!(self.pending)
    }

    fn json_event(&mut self, ev: &Event) -> io::Result<()> {
        let mut j = JsonLine::new(&mut self.pending);
        j.str_static("type", ev.kind.type_name());
        j.u64("ts_ns", ev.ts_ns);
        j.u64("cookie", ev.cookie);
        j.hex("sk", ev.skaddr);
        j.str_static("family", ev.family.name());
        j.u64("netns", ev.netns as u64);
        j.ip("saddr", ev.local.ip());
        j.u64("sport", ev.local.port() as u64);
        j.ip("daddr", ev.remote.ip());
        j.u64("dport", ev.remote.port() as u64);
        match &ev.owner {
            Some(o) => {
                j.u64("pid", o.pid as u64);
                j.u64("tid", o.tid as u64);
                j.escaped("comm", o.comm.as_bytes());
                j.u64("cgroup_id", o.cgroup_id);
                j.str_static("owner_source", o.source.name());
            }
            None => {
                for k in ["pid", "tid", "comm", "cgroup_id", "owner_source"] {
                    j.null(k);
                }
            }
        }
        j.bool("softirq", ev.softirq);
        match ev.kind {
            EventKind::State {
                old,
                new,
                prev_state_ns,
            } => {
                j.str_static("old", old.name());
                j.str_static("new", new.name());
                j.opt_u64("prev_state_ns", prev_state_ns);
            }
            EventKind::Retransmit {
                kind,
                state,
                nth,
                interval_ns,
                err,
                segs,
                accept_queue,
                syn_queue,
            } => {
                j.str_static("kind", kind.name());
                j.u64("nth", nth as u64);
                j.opt_str("state", state.map(|s| s.name()));
                j.opt_u64("interval_ns", interval_ns);
                j.i64("err", err as i64);
                j.u64("segs", segs as u64);
                if kind == RetransmitKind::SynAck {
                    j.raw_key("listener");
                    j.buf.extend_from_slice(b"{\"addr\":\"");
                    push_ip(j.buf, ev.local.ip());
                    j.buf.extend_from_slice(b"\",\"port\":");
                    push_u64(j.buf, ev.local.port() as u64);
                    j.buf.push(b'}');
                    j.opt_u64("accept_queue", accept_queue.map(u64::from));
                    j.opt_u64("syn_queue", syn_queue.map(u64::from));
                }
            }
            EventKind::Reset {
                sent,
                state,
                reason,
            } => {
                j.str_static("direction", if sent { "sent" } else { "received" });
                j.opt_str("state", state.map(|s| s.name()));
                match reason {
                    Some(r) => {
                        j.u64("reason_code", r as u64);
                        match self.reasons.name(r) {
                            Some(n) => j.str_static("reason", n),
                            None => j.u64("reason", r as u64),
                        }
                    }
                    None => {
                        j.null("reason_code");
                        j.null("reason");
                    }
                }
            }
            EventKind::SockError { errno } => {
                j.i64("errno", errno as i64);
                j.str_static("error", errno_name(errno));
            }
            EventKind::TimeWait {
                enter,
                substate,
                reason,
                duration_ns,
            } => {
                j.str_static("event", if enter { "enter" } else { "exit" });
                j.opt_str("substate", substate.map(|s| s.name()));
                j.opt_str("reason", reason.map(|r| r.name()));
                j.opt_u64("duration_ns", duration_ns);
            }
            EventKind::TimeWaitRearm { substate } => {
                j.str_static("event", "rearm");
                j.opt_str("substate", substate.map(|s| s.name()));
                j.null("reason");
            }
            EventKind::TwTimer { op, substate, .. } => {
                j.str_static(
                    "event",
                    match op {
                        TwOp::Start => "timer_start",
                        TwOp::Cancel => "timer_cancel",
                        TwOp::Expire => "timer_expire",
                        TwOp::Rearm => "timer_rearm",
                        TwOp::Deschedule => "deschedule",
                    },
                );
                j.opt_str("substate", substate.map(|s| s.name()));
            }
            EventKind::Overflow {
                queue,
                len,
                max,
                count,
                source,
                action,
            } => {
                j.str_static("queue", queue.name());
                j.raw_key("listener");
                j.buf.extend_from_slice(b"{\"addr\":\"");
                push_ip(j.buf, ev.local.ip());
                j.buf.extend_from_slice(b"\",\"port\":");
                push_u64(j.buf, ev.local.port() as u64);
                j.buf.push(b'}');
                j.opt_u64("len", len.map(u64::from));
                j.opt_u64("max", max.map(u64::from));
                j.u64("count", count);
                j.str_static("source", source.name());
                j.str_static("action", action.name());
            }
        }
        j.finish();
        Ok(())
    }
}

/// Builds one JSON object into a reused buffer: no format machinery, no allocation per event.
struct JsonLine<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonLine<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.reserve(512);
        buf.push(b'{');
        JsonLine { buf, first: true }
    }

    #[inline(always)]
    fn raw_key(&mut self, k: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string known to need no escaping (names from this crate).
    #[inline(always)]
    fn str_static(&mut self, k: &str, v: &str) {
        self.raw_key(k);
        self.buf.push(b'"');
        self.buf.extend_from_slice(v.as_bytes());
        self.buf.push(b'"');
    }

    #[inline(always)]
    fn escaped(&mut self, k: &str, v: &[u8]) {
        self.raw_key(k);
        // Writing into a Vec cannot fail.
        let _ = write_str(self.buf, v);
    }

    #[inline(always)]
    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => self.str_static(k, v),
            None => self.null(k),
        }
    }

    #[inline(always)]
    fn u64(&mut self, k: &str, v: u64) {
        self.raw_key(k);
        push_u64(self.buf, v);
    }

    #[inline(always)]
    fn i64(&mut self, k: &str, v: i64) {
        self.raw_key(k);
        if v < 0 {
            self.buf.push(b'-');
        }
        push_u64(self.buf, v.unsigned_abs());
    }

    #[inline(always)]
    fn opt_u64(&mut self, k: &str, v: Option<u64>) {
        match v {
            Some(v) => self.u64(k, v),
            None => self.null(k),
        }
    }

    #[inline(always)]
    fn hex(&mut self, k: &str, v: u64) {
        self.raw_key(k);
        self.buf.push(b'"');
        let mut tmp = [0u8; 16];
        let mut n = 0;
        let mut x = v;
        loop {
            tmp[n] = b"0123456789abcdef"[(x & 15) as usize];
            n += 1;
            x >>= 4;
            if x == 0 {
                break;
            }
        }
        self.buf.extend(tmp[..n].iter().rev());
        self.buf.push(b'"');
    }

    #[inline(always)]
    fn ip(&mut self, k: &str, ip: IpAddr) {
        self.raw_key(k);
        self.buf.push(b'"');
        push_ip(self.buf, ip);
        self.buf.push(b'"');
    }

    #[inline(always)]
    fn bool(&mut self, k: &str, v: bool) {
        self.raw_key(k);
        self.buf
            .extend_from_slice(if v { b"true" } else { b"false" });
    }

    #[inline(always)]
    fn null(&mut self, k: &str) {
        self.raw_key(k);
        self.buf.extend_from_slice(b"null");
    }

    fn finish(self) {
        self.buf.extend_from_slice(b"}\n");
    }
}

#[inline]
fn push_u64(buf: &mut Vec<u8>, v: u64) {
    let mut b = itoa::Buffer::new();
    buf.extend_from_slice(b.format(v).as_bytes());
}

fn push_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                push_u64(buf, *o as u64);
            }
        }
        // Rare enough, and compression rules are subtle: use the standard formatter.
        IpAddr::V6(v6) => {
            let _ = write!(buf, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Comm, Family, Owner, OwnerSource, RetransmitKind, TcpState};

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
    fn a_hostile_process_name_is_shown_not_obeyed() {
        let mut e = ev(state());
        e.owner.as_mut().unwrap().comm = Comm::new("\x1b]0;pwn\x07");
        let mut w = TraceWriter::new(Vec::new(), false, clock(), 4026531840);
        w.event(&e).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert!(s.contains("42/\\x1b]0;pwn\\x07"), "{s}");
        assert!(!s.contains('\x1b') && !s.contains('\x07'), "{s:?}");
        // JSON keeps the name as it is, escaped the JSON way.
        let mut w = TraceWriter::new(Vec::new(), true, clock(), 0);
        w.event(&e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.into_inner()).unwrap();
        assert_eq!(v["comm"], "\x1b]0;pwn\x07");
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
            segs: 1,
            accept_queue: None,
            syn_queue: None,
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
            kernel_dropped_by_type: crate::model::ByType([5, 0, 0, 0, 0, 0]),
            kernel_dropped: 5,
            kernel_skipped: 0,
            channel_dropped: 0,
            decode_errors: 1,
        };
        let t = Loss {
            kernel_dropped_by_type: Default::default(),
            kernel_dropped: 9,
            kernel_skipped: 2,
            channel_dropped: 0,
            decode_errors: 1,
        };
        w.loss(7, &d, &t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.into_inner()).unwrap();
        assert_eq!(v["type"], "loss");
        assert_eq!(v["kernel_dropped"], 5);
        assert_eq!(v["total"]["kernel_dropped"], 9);
        assert_eq!(v["total"]["kernel_skipped"], 2);
        assert_eq!(v["kernel_dropped_by_type"]["state"], 5);
        assert!(
            v["total"]["kernel_dropped_by_type"]
                .as_object()
                .unwrap()
                .is_empty()
        );
        let mut w = TraceWriter::new(Vec::new(), false, clock(), 0);
        w.loss(0, &d, &t).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert!(
            s.contains(
                "LOST 6 events (kernel ring full 5, skipped by the kernel 0, channel 0, undecodable 1); 12 lost so far"
            ),
            "{s}"
        );
    }
}
