//! Timewait lifecycle from raw records. The timer hooks give, on one CPU, for a timewait
//! socket's timer: `start` (armed), `cancel` (detached) and `expire` (fired). A cancel directly
//! followed by an expire is the normal end; by a start of the same socket in softirq, a re-arm
//! (the peer's FIN turned a FIN_WAIT2 substate into TIME_WAIT, or a retransmitted FIN); by
//! nothing, a deschedule (`connect()` reusing the tuple, a RST, or netns teardown). The timer
//! hooks only see a re-arm that moves the timer to another wheel bucket. The fentry strategy
//! reports `rearm` and `deschedule` where the kernel does them, with no inference.
use rustc_hash::FxHashMap as HashMap;

use super::slab::SlabMap;

use std::net::SocketAddr;

use super::event::{Event, EventKind, Family, Owner, TcpState, TwExitReason, TwOp};

/// A cancel's follow-up comes within microseconds under the timer lock; after this long
/// without one the socket was descheduled.
pub const FOLLOW_UP_NS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
struct Live {
    /// `None` for sockets that existed before tcpwatch started.
    enter_ts: Option<u64>,
    owner: Option<Owner>,
    /// Who it is, to report its end when its namespace goes away unseen.
    at: Origin,
}

/// A timewait socket's identity as its records give it.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub cookie: u64,
    pub netns: u32,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub substate: Option<TcpState>,
}

impl Origin {
    fn of(ev: &Event, substate: Option<TcpState>) -> Origin {
        Origin {
            cookie: ev.cookie,
            netns: ev.netns,
            family: ev.family,
            local: ev.local,
            remote: ev.remote,
            substate,
        }
    }
}

#[derive(Default)]
pub struct TwMachine {
    live: SlabMap<Live>,
    /// Cancels waiting for their follow-up, by timewait socket.
    pending: HashMap<u64, Event>,
    /// Exits of sockets that were neither seen entering nor seeded.
    pub untracked_exits: u64,
    /// Namespaces already reported gone (the last few): the kernel's own kill records for
    /// their sockets often come after, and must not end them twice.
    gone: std::collections::VecDeque<u32>,
}

/// How many gone namespaces are remembered.
const GONE_KEEP: usize = 64;

impl TwMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timewait socket from the inventory (already in TIME_WAIT when tcpwatch started).
    pub fn seed(&mut self, tw: u64, at: Origin, owner: Option<Owner>) {
        self.live.get_or_insert_with(tw, || Live {
            enter_ts: None,
            owner,
            at,
        });
    }

    /// A namespace is gone: whatever of its timewait sockets is still live here ended with it
    /// (teardown kills them; a kernel that inlines that path shows no record of it).
    pub fn forget_netns(&mut self, netns: u32, now_ns: u64, out: &mut Vec<Event>) {
        if self.gone.len() == GONE_KEEP {
            self.gone.pop_front();
        }
        self.gone.push_back(netns);
        let mut gone: Vec<(u64, Live)> = self
            .live
            .iter()
            .filter(|(_, l)| l.at.netns == netns)
            .map(|(k, l)| (*k, *l))
            .collect();
        gone.sort_by_key(|(k, _)| *k);
        for (tw, l) in gone {
            self.live.remove(&tw);
            self.pending.remove(&tw);
            out.push(Event {
                ts_ns: now_ns,
                cookie: l.at.cookie,
                skaddr: tw,
                netns,
                family: l.at.family,
                local: l.at.local,
                remote: l.at.remote,
                owner: l.owner,
                softirq: false,
                kind: EventKind::TimeWait {
                    enter: false,
                    substate: l.at.substate,
                    reason: Some(TwExitReason::Killed),
                    duration_ns: l.enter_ts.map(|t| now_ns.saturating_sub(t)),
                },
            });
        }
    }

    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Feeds one event in time order; appends what it means to `out` (non-timewait events pass
    /// through unchanged).
    pub fn apply(&mut self, ev: Event, out: &mut Vec<Event>) {
        self.resolve_due(ev.ts_ns, out);
        let EventKind::TwTimer { op, substate, .. } = ev.kind else {
            out.push(ev);
            return;
        };
        let tw = ev.skaddr;
        match op {
            // A cancel in the task that connect()s over the tuple is final: out now, not after
            // the follow-up window, so the exit is not printed after events that came later.
            // A kworker's waits like a softirq's: on 6.1 one was seen right before the expiry.
            TwOp::Cancel if cancel_is_reuse(&ev) => {
                if let Some(old) = self.pending.remove(&tw) {
                    self.deschedule(old, out);
                }
                self.deschedule(ev, out);
            }
            TwOp::Cancel => {
                if let Some(old) = self.pending.insert(tw, ev) {
                    self.deschedule(old, out);
                }
            }
            TwOp::Start => {
                let rearm = match self.pending.remove(&tw) {
                    // A re-arm runs where the peer's segment is processed: in softirq. A cancel
                    // in a task (connect() taking the tuple) or a kworker (netns teardown) is
                    // final, whatever follows in the same memory.
                    Some(cancel) if cancel_may_rearm(&cancel) && same_socket(&cancel, &ev) => true,
                    Some(cancel) => {
                        self.deschedule(cancel, out);
                        false
                    }
                    None => false,
                };
                if rearm {
                    self.rearm(ev, substate, out);
                } else {
                    self.live.insert(
                        tw,
                        Live {
                            enter_ts: Some(ev.ts_ns),
                            owner: ev.owner,
                            at: Origin::of(&ev, substate),
                        },
                    );
                    out.push(Event {
                        kind: EventKind::TimeWait {
                            enter: true,
                            substate,
                            reason: None,
                            duration_ns: None,
                        },
                        ..ev
                    });
                }
            }
            TwOp::Expire => {
                self.pending.remove(&tw);
                self.exit(ev, TwExitReason::Expired, out);
            }
            TwOp::Deschedule => {
                if let Some(old) = self.pending.remove(&tw) {
                    self.deschedule(old, out);
                }
                self.deschedule(ev, out);
            }
            TwOp::Rearm => self.rearm(ev, substate, out),
        }
    }

    /// Resolves cancels that had no follow-up by `now_ns` (call on every poll).
    pub fn resolve_due(&mut self, now_ns: u64, out: &mut Vec<Event>) {
        if self.pending.is_empty() {
            return;
        }
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, e)| e.ts_ns.saturating_add(FOLLOW_UP_NS) < now_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut evs: Vec<Event> = due
            .into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .collect();
        evs.sort_by_key(|e| e.ts_ns);
        for e in evs {
            self.deschedule(e, out);
        }
    }

    /// Every pending cancel, at shutdown.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        self.resolve_due(u64::MAX, out);
    }

    fn rearm(&mut self, ev: Event, substate: Option<TcpState>, out: &mut Vec<Event>) {
        let live = self.live.get_mut(&ev.skaddr);
        let owner = live.as_ref().and_then(|l| l.owner).or(ev.owner);
        if let Some(l) = live {
            l.at.substate = substate;
        }
        out.push(Event {
            owner,
            kind: EventKind::TimeWaitRearm { substate },
            ..ev
        });
    }

    fn deschedule(&mut self, cancel: Event, out: &mut Vec<Event>) {
        let reason = if cancel_is_reuse(&cancel) {
            TwExitReason::Reused
        } else {
            TwExitReason::Killed
        };
        self.exit(cancel, reason, out);
    }

    fn exit(&mut self, ev: Event, reason: TwExitReason, out: &mut Vec<Event>) {
        let substate = match ev.kind {
            EventKind::TwTimer { substate, .. } => substate,
            _ => None,
        };
        let (duration_ns, owner) = match self.live.remove(&ev.skaddr) {
            Some(l) => (
                l.enter_ts.map(|t| ev.ts_ns.saturating_sub(t)),
                l.owner.or(ev.owner),
            ),
            // Already ended when its namespace went.
            None if self.gone.contains(&ev.netns) => return,
            None => {
                self.untracked_exits += 1;
                (None, ev.owner)
            }
        };
        out.push(Event {
            owner,
            kind: EventKind::TimeWait {
                enter: false,
                substate,
                reason: Some(reason),
                duration_ns,
            },
            ..ev
        });
    }
}

fn in_kworker(ev: &Event) -> bool {
    matches!(ev.kind, EventKind::TwTimer { kworker: true, .. })
}

fn cancel_may_rearm(cancel: &Event) -> bool {
    cancel.softirq && !in_kworker(cancel)
}

/// A cancel by the task connecting over the timewait socket's tuple (tcp_tw_reuse): neither
/// softirq (expiry, re-arm, a peer's RST) nor a kworker (netns teardown).
fn cancel_is_reuse(cancel: &Event) -> bool {
    !cancel.softirq && !in_kworker(cancel)
}

/// Whether a cancel and the start that follows it on one timer are the same timewait socket.
/// A re-arm keeps the socket, so both carry its cookie (fixed when it was allocated); a new
/// socket in the memory of one just descheduled (tcp_tw_reuse: the slab hands the freed
/// object straight back) has its own. Without cookies the tuple must match.
fn same_socket(cancel: &Event, start: &Event) -> bool {
    if cancel.cookie != 0 || start.cookie != 0 {
        return cancel.cookie == start.cookie;
    }
    (cancel.netns, cancel.local, cancel.remote) == (start.netns, start.local, start.remote)
}

/// Whether `state` is a substate a timewait socket can be in.
pub fn is_tw_substate(s: TcpState) -> bool {
    matches!(s, TcpState::TimeWait | TcpState::FinWait2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Comm, Family, OwnerSource};

    fn tw(ts: u64, tw: u64, op: TwOp, sub: TcpState) -> Event {
        Event {
            ts_ns: ts,
            cookie: 9,
            skaddr: tw,
            netns: 1,
            family: Family::Inet,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
            owner: None,
            softirq: true,
            kind: EventKind::TwTimer {
                op,
                substate: Some(sub),
                kworker: false,
            },
        }
    }

    /// `tw` from task context (a syscall of the process acting on the socket).
    fn task_tw(ts: u64, t: u64, op: TwOp, sub: TcpState) -> Event {
        Event {
            softirq: false,
            ..tw(ts, t, op, sub)
        }
    }

    /// A cancel in a kworker's task context (netns teardown, or as seen on 6.1 before expiry).
    fn kworker_cancel(ts: u64, t: u64, sub: TcpState) -> Event {
        let mut c = task_tw(ts, t, TwOp::Cancel, sub);
        c.kind = EventKind::TwTimer {
            op: TwOp::Cancel,
            substate: Some(sub),
            kworker: true,
        };
        c
    }

    fn kinds(out: &[Event]) -> Vec<String> {
        out.iter()
            .map(|e| match e.kind {
                EventKind::TimeWait { enter: true, .. } => "enter".to_string(),
                EventKind::TimeWait {
                    enter: false,
                    reason,
                    ..
                } => format!("exit:{}", reason.unwrap().name()),
                EventKind::TimeWaitRearm { substate } => {
                    format!("rearm:{}", substate.unwrap().name())
                }
                _ => "other".to_string(),
            })
            .collect()
    }

    #[test]
    fn a_final_cancel_is_out_before_what_follows_it() {
        // connect() takes the tuple of TIME_WAIT socket 1; the new connection closes and its
        // own TIME_WAIT (socket 2) starts within the follow-up window.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(
            task_tw(1_000, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(kinds(&out), vec!["enter", "exit:reused"], "without waiting");
        m.apply(tw(2_000, 2, TwOp::Start, TcpState::TimeWait), &mut out);
        assert_eq!(kinds(&out), vec!["enter", "exit:reused", "enter"]);
    }

    #[test]
    fn enter_then_expiry() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        assert_eq!(m.live(), 1);
        m.apply(
            tw(60_000_000_100, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        m.apply(
            tw(60_000_000_200, 1, TwOp::Expire, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(kinds(&out), vec!["enter", "exit:expired"]);
        assert_eq!(m.live(), 0);
        match out[1].kind {
            EventKind::TimeWait { duration_ns, .. } => {
                assert_eq!(duration_ns, Some(60_000_000_100))
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn fin_wait2_substate_rearmed_by_the_peers_fin() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::FinWait2), &mut out);
        m.apply(
            tw(2_000_000_000, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        m.apply(
            tw(2_000_000_050, 1, TwOp::Start, TcpState::TimeWait),
            &mut out,
        );
        m.resolve_due(3_000_000_000, &mut out);
        assert_eq!(kinds(&out), vec!["enter", "rearm:TIME_WAIT"]);
        assert_eq!(m.live(), 1);
    }

    #[test]
    fn a_task_context_cancel_is_final_even_for_the_same_tuple_without_cookies() {
        // tcp_tw_reuse keeps the 4-tuple, and without cookies (classic state hook) nothing
        // else tells the new socket from the old: the cancel's context does.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        let mut a = tw(100, 1, TwOp::Start, TcpState::TimeWait);
        a.cookie = 0;
        m.apply(a, &mut out);
        let mut c = tw(2_000_000_000, 1, TwOp::Cancel, TcpState::TimeWait);
        (c.cookie, c.softirq) = (0, false);
        m.apply(c, &mut out);
        let mut b = tw(2_000_010_000, 1, TwOp::Start, TcpState::FinWait2);
        b.cookie = 0;
        m.apply(b, &mut out);
        assert_eq!(kinds(&out), vec!["enter", "exit:reused", "enter"]);
        assert_eq!(m.live(), 1);
    }

    fn origin() -> Origin {
        Origin {
            cookie: 0,
            netns: 1,
            family: Family::Inet,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
            substate: Some(TcpState::TimeWait),
        }
    }

    #[test]
    fn a_gone_namespace_ends_its_live_sockets() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        let mut other = tw(200, 2, TwOp::Start, TcpState::TimeWait);
        other.netns = 2;
        m.apply(other, &mut out);
        m.seed(3, origin(), None);
        m.forget_netns(1, 5_000, &mut out);
        assert_eq!(
            kinds(&out),
            vec!["enter", "enter", "exit:killed", "exit:killed"]
        );
        assert_eq!(m.live(), 1, "the other namespace's socket stays");
        // The kernel's teardown records come after: not a second end.
        let n = out.len();
        m.apply(
            task_tw(6_000, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        m.flush(&mut out);
        assert_eq!(out.len(), n);
        assert_eq!(m.untracked_exits, 0);
        assert_eq!(out[2].skaddr, 1);
        assert_eq!(out[2].local, "127.0.0.1:40000".parse().unwrap());
        match out[3].kind {
            EventKind::TimeWait { duration_ns, .. } => assert_eq!(duration_ns, None),
            _ => unreachable!(),
        }
    }

    #[test]
    fn an_explicit_deschedule_ends_at_once() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(tw(200, 2, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(
            task_tw(1_000, 1, TwOp::Deschedule, TcpState::TimeWait),
            &mut out,
        );
        m.apply(tw(2_000, 2, TwOp::Deschedule, TcpState::TimeWait), &mut out);
        assert_eq!(
            kinds(&out),
            vec!["enter", "enter", "exit:reused", "exit:killed"]
        );
        assert_eq!(m.live(), 0);
    }

    #[test]
    fn an_explicit_rearm_needs_no_pairing() {
        // fentry sees the re-arm itself; an interrupt between records cannot split a pair.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::FinWait2), &mut out);
        m.apply(
            tw(2_000_000_000, 1, TwOp::Rearm, TcpState::TimeWait),
            &mut out,
        );
        m.resolve_due(u64::MAX, &mut out);
        assert_eq!(kinds(&out), vec!["enter", "rearm:TIME_WAIT"]);
        assert_eq!(m.live(), 1);
    }

    #[test]
    fn deschedule_in_task_context_is_a_reuse_in_softirq_a_kill() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(tw(200, 2, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(
            task_tw(1_000, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        m.apply(tw(5_000, 2, TwOp::Cancel, TcpState::TimeWait), &mut out);
        // No follow-up arrives: the next poll resolves both.
        m.resolve_due(10_000_000, &mut out);
        assert_eq!(
            kinds(&out),
            vec!["enter", "enter", "exit:reused", "exit:killed"]
        );
        assert_eq!(out[2].ts_ns, 1_000, "the exit keeps the cancel's time");
        assert_eq!(m.live(), 0);
    }

    #[test]
    fn kworker_cancel_is_a_kill() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(kworker_cancel(1_000, 1, TcpState::TimeWait), &mut out);
        m.flush(&mut out);
        assert_eq!(kinds(&out), vec!["enter", "exit:killed"]);
    }

    #[test]
    fn a_kworker_cancel_then_the_expiry_is_one_expiry() {
        // Seen on 6.1 under the timer hooks: the cancel before the handler ran in a kworker.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::FinWait2), &mut out);
        m.apply(
            kworker_cancel(1_000_000_000, 1, TcpState::FinWait2),
            &mut out,
        );
        m.apply(
            tw(1_000_000_100, 1, TwOp::Expire, TcpState::FinWait2),
            &mut out,
        );
        assert_eq!(kinds(&out), vec!["enter", "exit:expired"]);
    }

    #[test]
    fn a_new_socket_at_a_recycled_address_is_a_new_enter() {
        // The slab reuses a freed timewait socket's address within milliseconds.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(tw(1_000, 1, TwOp::Cancel, TcpState::TimeWait), &mut out);
        m.apply(tw(5_000_000, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        assert_eq!(kinds(&out), vec!["enter", "exit:killed", "enter"]);
        assert_eq!(m.live(), 1);
    }

    #[test]
    fn tw_reuse_then_a_new_socket_in_the_same_memory_at_once_is_no_rearm() {
        // connect() takes a TIME_WAIT tuple (the cancel, in its task), and the new connection
        // closes and lands in the freed object well within the follow-up window.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        m.apply(
            task_tw(2_000_000_000, 1, TwOp::Cancel, TcpState::TimeWait),
            &mut out,
        );
        let mut next = tw(2_000_200_000, 1, TwOp::Start, TcpState::FinWait2);
        next.cookie = 10;
        m.apply(next, &mut out);
        assert_eq!(kinds(&out), vec!["enter", "exit:reused", "enter"]);
        assert_eq!(out[2].cookie, 10);
        assert_eq!(m.live(), 1);
        // A seeded socket has no cookie; the new one has: still two sockets.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        m.seed(1, origin(), None);
        let mut c = tw(100, 1, TwOp::Cancel, TcpState::TimeWait);
        (c.cookie, c.softirq) = (0, false);
        m.apply(c, &mut out);
        m.apply(tw(200, 1, TwOp::Start, TcpState::TimeWait), &mut out);
        assert_eq!(kinds(&out), vec!["exit:reused", "enter"]);
        // Neither has a cookie: the tuple decides.
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        let mut a = tw(100, 1, TwOp::Cancel, TcpState::TimeWait);
        a.cookie = 0;
        let mut b = tw(150, 1, TwOp::Start, TcpState::TimeWait);
        b.cookie = 0;
        m.apply(a, &mut out);
        m.apply(b, &mut out);
        assert_eq!(kinds(&out), vec!["rearm:TIME_WAIT"]);
        a.ts_ns = 200;
        b.ts_ns = 250;
        b.local = "127.0.0.1:40001".parse().unwrap();
        m.apply(a, &mut out);
        m.apply(b, &mut out);
        assert_eq!(kinds(&out), vec!["rearm:TIME_WAIT", "exit:killed", "enter"]);
    }

    #[test]
    fn seeded_sockets_have_owner_and_unknown_age_untracked_are_counted() {
        let mut m = TwMachine::new();
        let owner = Owner {
            pid: 7,
            tid: 7,
            comm: Comm::new("nginx"),
            cgroup_id: 0,
            source: OwnerSource::Inventory,
        };
        m.seed(1, origin(), Some(owner));
        let mut out = Vec::new();
        m.apply(tw(100, 1, TwOp::Cancel, TcpState::TimeWait), &mut out);
        m.apply(tw(150, 1, TwOp::Expire, TcpState::TimeWait), &mut out);
        m.apply(tw(200, 3, TwOp::Cancel, TcpState::TimeWait), &mut out);
        m.apply(tw(250, 3, TwOp::Expire, TcpState::TimeWait), &mut out);
        assert_eq!(kinds(&out), vec!["exit:expired", "exit:expired"]);
        assert_eq!(out[0].owner.unwrap().pid, 7);
        match out[0].kind {
            EventKind::TimeWait { duration_ns, .. } => assert_eq!(duration_ns, None),
            _ => unreachable!(),
        }
        assert_eq!(m.untracked_exits, 1);
    }

    #[test]
    fn other_events_pass_through() {
        let mut m = TwMachine::new();
        let mut out = Vec::new();
        let mut e = tw(1, 1, TwOp::Start, TcpState::TimeWait);
        e.kind = EventKind::SockError { errno: 111 };
        m.apply(e, &mut out);
        assert_eq!(out, vec![e]);
    }
}
