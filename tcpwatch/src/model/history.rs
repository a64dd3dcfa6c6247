//! The flight recorder's model: what each 10-second frame of the host's TCP activity holds,
//! which closed timelines are worth keeping longer than the plain ones, and which events are
//! signals (kept longer than state transitions). Pure: the daemon feeds it and stores what it
//! returns.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::Loss;
use crate::model::aggregate::{Aggregator, ListenerSample};
use crate::model::event::{Event, EventKind, TcpState};
use crate::model::snapshot::{Name, OverflowsView, OwnerView, SocketView};
use crate::model::system::{SockRec, errno_name, ss_state};

/// A frame's length.
pub const FRAME_NS: u64 = 10_000_000_000;

/// Listeners a frame names at most (the most troubled first); the rest are counted.
pub const FRAME_LISTENERS: usize = 100;

/// A handshake this slow took at least one SYN (or SYN-ACK) retransmit: worth keeping.
pub const SLOW_HANDSHAKE_NS: u64 = 1_000_000_000;

/// One 10-second frame: states at its end, what happened during it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Frame {
    /// Its end, Unix time in ns.
    pub wall_ns: i64,
    /// How long it covers (the first after a start is shorter).
    pub span_ns: u64,
    /// Sockets per state at its end, as `ss -tan` counts them; empty when no listing was
    /// read.
    pub states: BTreeMap<Name, u64>,
    /// Connections that reached ESTABLISHED, and timelines that reached CLOSE.
    pub opened: u64,
    pub closed: u64,
    pub retransmits: BTreeMap<Name, u64>,
    pub resets: BTreeMap<Name, u64>,
    pub errors: BTreeMap<Name, u64>,
    /// Every listener's overflows together.
    pub overflows: OverflowsView,
    pub time_wait_entered: u64,
    pub events: u64,
    /// Events lost in the frame (kernel, channels, decoding).
    pub lost: u64,
    pub listeners: Vec<ListenerFrame>,
    /// Listeners with activity beyond `FRAME_LISTENERS`, not named.
    pub listeners_omitted: u64,
}

/// One listener in a frame: the deepest its queues got, what it dropped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ListenerFrame {
    pub netns: u32,
    pub addr: String,
    pub port: u16,
    pub cookie: u64,
    pub owner: Option<OwnerView>,
    pub accept_peak: u32,
    pub accept_max: u32,
    pub syn_peak: u32,
    /// Its own drop counter at the frame's end (as `ss -tlm`).
    pub drops: u64,
    pub overflows: OverflowsView,
    pub synack_retransmits: u64,
}

impl ListenerFrame {
    fn trouble(&self) -> u64 {
        let o = &self.overflows;
        o.accept + o.syn + o.syncookies + self.synack_retransmits
    }
}

type ListenerKey = (u32, SocketAddr, u64);

/// What the aggregator's running totals were at the previous frame's end.
#[derive(Clone, Default)]
struct Mark {
    events: u64,
    retrans: [u64; 4],
    resets: [u64; 2],
    errors: HashMap<i32, u64>,
    tw_enter: u64,
    lost: u64,
    listeners: HashMap<ListenerKey, (OverflowsView, u64)>,
}

impl Mark {
    fn of(agg: &Aggregator, loss: &Loss) -> Mark {
        let t = &agg.totals;
        Mark {
            events: t.events,
            retrans: t.retrans,
            resets: [t.resets_sent, t.resets_received],
            errors: t.errors.iter().map(|(k, v)| (*k, *v)).collect(),
            tw_enter: t.tw_enter,
            lost: loss.total(),
            listeners: agg
                .listeners()
                .map(|l| {
                    (
                        (l.netns, l.local, l.cookie),
                        (
                            OverflowsView {
                                accept: l.overflow_accept,
                                syn: l.overflow_syn,
                                syncookies: l.syncookies,
                                final_ack_packets: l.overflow_packets,
                            },
                            l.synack_retransmits,
                        ),
                    )
                })
                .collect(),
        }
    }
}

/// Builds frames as differences of the aggregator's running totals, plus what only the
/// frame sees: queue peaks from the samples, connections opened and closed.
#[derive(Default)]
pub struct FrameBuilder {
    mark: Mark,
    start_wall_ns: Option<i64>,
    peaks: HashMap<ListenerKey, (u32, u32)>,
    opened: u64,
    closed: u64,
}

fn minus(a: &OverflowsView, b: &OverflowsView) -> OverflowsView {
    OverflowsView {
        accept: a.accept.saturating_sub(b.accept),
        syn: a.syn.saturating_sub(b.syn),
        syncookies: a.syncookies.saturating_sub(b.syncookies),
        final_ack_packets: a.final_ack_packets.saturating_sub(b.final_ack_packets),
    }
}

impl FrameBuilder {
    /// A builder whose first frame starts now, `agg` and `loss` as they are.
    pub fn new(agg: &Aggregator, loss: &Loss, wall_ns: i64) -> FrameBuilder {
        FrameBuilder {
            mark: Mark::of(agg, loss),
            start_wall_ns: Some(wall_ns),
            ..FrameBuilder::default()
        }
    }

    pub fn apply(&mut self, events: &[Event]) {
        for e in events {
            if let EventKind::State { old, new, .. } = e.kind {
                if new == TcpState::Established
                    && matches!(old, TcpState::SynSent | TcpState::SynRecv)
                {
                    self.opened += 1;
                } else if new == TcpState::Close {
                    self.closed += 1;
                }
            }
        }
    }

    pub fn observe(&mut self, samples: &[ListenerSample]) {
        for s in samples {
            let p = self.peaks.entry((s.netns, s.local, s.cookie)).or_default();
            p.0 = p.0.max(s.accept_now);
            p.1 = p.1.max(s.syn_now);
        }
    }

    /// Ends the frame at `wall_ns`: states from `listing` (a socket listing read now, if
    /// any), everything else from what `agg` counted since the previous frame.
    pub fn close(
        &mut self,
        agg: &Aggregator,
        listing: Option<&[SockRec]>,
        loss: &Loss,
        wall_ns: i64,
    ) -> Frame {
        let now = Mark::of(agg, loss);
        let prev = std::mem::replace(&mut self.mark, now);
        let now = &self.mark;
        let mut f = Frame {
            wall_ns,
            span_ns: self
                .start_wall_ns
                .map_or(0, |s| wall_ns.saturating_sub(s).max(0) as u64),
            opened: std::mem::take(&mut self.opened),
            closed: std::mem::take(&mut self.closed),
            time_wait_entered: now.tw_enter.saturating_sub(prev.tw_enter),
            events: now.events.saturating_sub(prev.events),
            lost: now.lost.saturating_sub(prev.lost),
            ..Frame::default()
        };
        self.start_wall_ns = Some(wall_ns);
        if let Some(socks) = listing {
            for st in TcpState::ALL {
                if st != TcpState::Close {
                    f.states.insert(st.name().into(), 0);
                }
            }
            for r in socks {
                *f.states.entry(ss_state(r).name().into()).or_insert(0) += 1;
            }
        }
        for (i, k) in ["syn", "synack", "data", "fin"].iter().enumerate() {
            let n = now.retrans[i].saturating_sub(prev.retrans[i]);
            if n > 0 {
                f.retransmits.insert((*k).into(), n);
            }
        }
        for (i, k) in ["sent", "received"].iter().enumerate() {
            let n = now.resets[i].saturating_sub(prev.resets[i]);
            if n > 0 {
                f.resets.insert((*k).into(), n);
            }
        }
        for (e, n) in &now.errors {
            let d = n.saturating_sub(prev.errors.get(e).copied().unwrap_or(0));
            if d > 0 {
                *f.errors.entry(errno_name(*e).into()).or_insert(0) += d;
            }
        }
        let peaks = std::mem::take(&mut self.peaks);
        let mut ls: Vec<ListenerFrame> = Vec::new();
        for l in agg.listeners() {
            let key = (l.netns, l.local, l.cookie);
            let (o_now, sa_now) = now.listeners.get(&key).copied().unwrap_or_default();
            let (o_prev, sa_prev) = prev.listeners.get(&key).copied().unwrap_or_default();
            let (accept_peak, syn_peak) = peaks.get(&key).copied().unwrap_or_default();
            let lf = ListenerFrame {
                netns: l.netns,
                addr: l.local.ip().to_string(),
                port: l.local.port(),
                cookie: l.cookie,
                owner: l.owner.as_ref().map(OwnerView::from),
                accept_peak,
                accept_max: l.accept_max,
                syn_peak,
                drops: l.drops,
                overflows: minus(&o_now, &o_prev),
                synack_retransmits: sa_now.saturating_sub(sa_prev),
            };
            let o = &lf.overflows;
            f.overflows.accept += o.accept;
            f.overflows.syn += o.syn;
            f.overflows.syncookies += o.syncookies;
            f.overflows.final_ack_packets += o.final_ack_packets;
            if lf.trouble() > 0 || accept_peak > 0 || syn_peak > 0 {
                ls.push(lf);
            }
        }
        ls.sort_by(|a, b| {
            b.trouble()
                .cmp(&a.trouble())
                .then(b.accept_peak.cmp(&a.accept_peak))
                .then(b.syn_peak.cmp(&a.syn_peak))
                .then((a.netns, &a.addr, a.port).cmp(&(b.netns, &b.addr, b.port)))
        });
        f.listeners_omitted = ls.len().saturating_sub(FRAME_LISTENERS) as u64;
        ls.truncate(FRAME_LISTENERS);
        f.listeners = ls;
        f
    }
}

/// Why a closed connection's timeline is worth keeping longer than a plain one; empty for a
/// plain one.
pub fn interest(v: &SocketView, close_wait_ns: u64) -> Vec<&'static str> {
    let mut why = Vec::new();
    if !v.retransmits.is_empty() {
        why.push("retransmits");
    }
    if v.resets_sent > 0 || v.resets_received > 0 {
        why.push("reset");
    }
    if !v.errors.is_empty() {
        why.push("error");
    }
    let mut handshaking = false;
    let mut established = false;
    for t in &v.transitions {
        match (t.old.as_ref(), t.new.as_ref()) {
            (_, "SYN_SENT" | "SYN_RECV") => handshaking = true,
            ("SYN_SENT" | "SYN_RECV", "ESTABLISHED") => {
                established = true;
                if t.prev_state_ns.is_some_and(|d| d >= SLOW_HANDSHAKE_NS) {
                    why.push("slow_handshake");
                }
            }
            ("CLOSE_WAIT", _) if t.prev_state_ns.is_some_and(|d| d >= close_wait_ns) => {
                why.push("long_close_wait");
            }
            _ => {}
        }
    }
    if handshaking && !established && v.transitions.iter().any(|t| t.new == "CLOSE") {
        why.push("never_established");
    }
    why.dedup();
    why
}

/// Signals (retransmits, resets, errors, overflows) are kept longer than state transitions:
/// they are what findings are made of.
pub fn is_signal(e: &Event) -> bool {
    matches!(
        e.kind,
        EventKind::Retransmit { .. }
            | EventKind::Reset { .. }
            | EventKind::SockError { .. }
            | EventKind::Overflow { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Config;
    use crate::model::event::RetransmitKind;
    use crate::model::snapshot::TransitionView;
    use crate::testkit::{conn, test_event as ev, test_overflow, test_rec};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn state(ts: u64, cookie: u64, old: TcpState, new: TcpState) -> Event {
        ev(
            ts,
            cookie,
            EventKind::State {
                old,
                new,
                prev_state_ns: None,
            },
        )
    }

    #[test]
    fn a_frame_is_what_happened_since_the_previous_one() {
        use TcpState::*;
        let mut agg = Aggregator::new(Config::default());
        let loss = Loss::default();
        let mut fb = FrameBuilder::new(&agg, &loss, 1_000);
        let batch1 = [
            state(1, 1, Close, SynSent),
            state(2, 1, SynSent, Established),
            ev(
                3,
                2,
                EventKind::Retransmit {
                    kind: RetransmitKind::Syn,
                    state: Some(SynSent),
                    nth: 1,
                    interval_ns: None,
                    err: 0,
                    segs: 1,
                    accept_queue: None,
                    syn_queue: None,
                },
            ),
        ];
        agg.apply(&batch1[0]);
        agg.apply(&batch1[1]);
        agg.apply(&batch1[2]);
        fb.apply(&batch1);
        let listing = [
            test_rec(Established, 1, a("10.0.0.1:40000"), a("10.0.0.2:80")),
            test_rec(Listen, 1, a("0.0.0.0:80"), a("0.0.0.0:0")),
        ];
        let f = fb.close(&agg, Some(&listing), &loss, 11_000);
        assert_eq!(f.span_ns, 10_000);
        assert_eq!((f.opened, f.closed, f.events), (1, 0, 3));
        assert_eq!(f.retransmits.get("syn"), Some(&1));
        assert_eq!(f.states.get("ESTABLISHED"), Some(&1));
        assert_eq!(f.states.get("LISTEN"), Some(&1));
        assert_eq!(f.states.get("TIME_WAIT"), Some(&0));

        // The next frame counts only its own.
        let close = [state(20, 1, Established, Close)];
        agg.apply(&close[0]);
        fb.apply(&close);
        let lost = Loss {
            kernel_dropped: 4,
            ..Loss::default()
        };
        let f = fb.close(&agg, None, &lost, 21_000);
        assert_eq!((f.opened, f.closed, f.events, f.lost), (0, 1, 1, 4));
        assert!(f.retransmits.is_empty() && f.states.is_empty());
    }

    #[test]
    fn listeners_in_a_frame_carry_their_peaks_and_drops() {
        let mut agg = Aggregator::new(Config::default());
        let loss = Loss::default();
        let mut fb = FrameBuilder::new(&agg, &loss, 0);
        let l = a("127.0.0.1:8080");
        let sample = |accept_now| ListenerSample {
            netns: 1,
            local: l,
            cookie: 9,
            owner: None,
            accept_now,
            accept_max: 4,
            syn_now: 0,
            drops: 3,
        };
        for n in [1, 5, 2] {
            agg.observe_listener(&sample(n), 5);
            fb.observe(&[sample(n)]);
        }
        let o = test_overflow(6, 9, l, 3);
        agg.apply(&o);
        fb.apply(&[o]);
        let f = fb.close(&agg, None, &loss, FRAME_NS as i64);
        assert_eq!(f.listeners.len(), 1);
        let lf = &f.listeners[0];
        assert_eq!((lf.accept_peak, lf.accept_max, lf.drops), (5, 4, 3));
        assert_eq!(lf.overflows.accept, 3);
        assert_eq!(f.overflows.accept, 3);
        // Nothing new, an empty queue: the listener is not named again.
        agg.observe_listener(&sample(0), 7);
        fb.observe(&[sample(0)]);
        let f = fb.close(&agg, None, &loss, 2 * FRAME_NS as i64);
        assert!(f.listeners.is_empty(), "{:?}", f.listeners);
    }

    fn view(transitions: &[(&'static str, &'static str, Option<u64>)]) -> SocketView {
        let mut v = conn(1, "CLOSE", "10.0.0.1:40000", "curl", 7);
        v.transitions = transitions
            .iter()
            .map(|(o, n, p)| TransitionView {
                ts_ns: 0,
                wall_ns: None,
                old: (*o).into(),
                new: (*n).into(),
                prev_state_ns: *p,
            })
            .collect();
        v
    }

    #[test]
    fn interesting_timelines_say_why() {
        let plain = view(&[
            ("CLOSE", "SYN_SENT", None),
            ("SYN_SENT", "ESTABLISHED", Some(50_000)),
            ("ESTABLISHED", "FIN_WAIT1", Some(1_000_000)),
            ("FIN_WAIT1", "CLOSE", Some(100)),
        ]);
        assert!(interest(&plain, 10_000_000_000).is_empty());
        let slow = view(&[
            ("CLOSE", "SYN_SENT", None),
            ("SYN_SENT", "ESTABLISHED", Some(3_000_000_000)),
        ]);
        assert_eq!(interest(&slow, 10_000_000_000), ["slow_handshake"]);
        let refused = view(&[("CLOSE", "SYN_SENT", None), ("SYN_SENT", "CLOSE", Some(10))]);
        assert_eq!(interest(&refused, 10_000_000_000), ["never_established"]);
        let mut leak = view(&[
            ("ESTABLISHED", "CLOSE_WAIT", Some(1)),
            ("CLOSE_WAIT", "LAST_ACK", Some(20_000_000_000)),
        ]);
        leak.resets_received = 1;
        assert_eq!(
            interest(&leak, 10_000_000_000),
            ["reset", "long_close_wait"]
        );
    }
}
