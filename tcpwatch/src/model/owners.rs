//! Userspace owner resolution for what the kernel side cannot know: sockets and listeners that
//! existed before tcpwatch attached (seeded from the inventory) and children of such listeners.
use std::collections::VecDeque;
use std::net::SocketAddr;

use rustc_hash::FxHashMap as HashMap;

use super::event::{Event, EventKind, Owner, OwnerSource, TcpState, TwOp};

#[derive(Default)]
pub struct OwnerBook {
    /// Pre-existing sockets by cookie; entries leave when the socket closes.
    by_cookie: HashMap<u64, Owner>,
    /// Listener owners by (netns, local port), for the children of listeners older than
    /// tcpwatch (the kernel side names a newer listener's exactly, from cloned socket
    /// storage): with SO_REUSEPORT any member's, as a child does not say which member took it.
    listeners: HashMap<(u32, u16), Owner>,
    /// Listener owners by cookie, for the listener's own events (overflows, SYN-ACK
    /// retransmits): exact for each member of an SO_REUSEPORT group.
    listener_sockets: HashMap<u64, ((u32, u16), Owner)>,
    /// Owners of sockets on their way to TIME_WAIT (FIN_WAIT1/2, CLOSING), for the timewait
    /// socket that takes over: it carries the same cookie but no owner, and its timer is armed
    /// just *before* the full socket's last transition to CLOSE.
    closing: HashMap<SockId, Owner>,
    /// Sockets that reached CLOSE, with the time: dropped from `closing` after a grace period.
    closed_order: VecDeque<(u64, SockId)>,
}

/// A socket by cookie, or by netns and 4-tuple where no cookie was taken (the classic state
/// tracepoint has no cookie helper; its timewait socket then has none either). A 4-tuple is
/// unique among live sockets of a namespace, which is all the closing book needs.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum SockId {
    Cookie(u64),
    Tuple(u32, SocketAddr, SocketAddr),
}

impl SockId {
    fn of(ev: &Event) -> SockId {
        if ev.cookie != 0 {
            SockId::Cookie(ev.cookie)
        } else {
            SockId::Tuple(ev.netns, ev.local, ev.remote)
        }
    }
}

/// How long a closed socket's owner is kept for a timewait socket that appears late.
const CLOSING_KEEP_NS: u64 = 2_000_000_000;

impl OwnerBook {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn seed_socket(&mut self, cookie: u64, owner: Owner) {
        if cookie != 0 {
            self.by_cookie.insert(
                cookie,
                Owner {
                    source: OwnerSource::Inventory,
                    ..owner
                },
            );
        }
    }

    pub fn seed_listener(&mut self, netns: u32, port: u16, cookie: u64, owner: Owner) {
        let o = Owner {
            source: OwnerSource::Inventory,
            ..owner
        };
        self.listeners.insert((netns, port), o);
        if cookie != 0 {
            self.listener_sockets.insert(cookie, ((netns, port), o));
        }
    }

    pub fn len(&self) -> usize {
        self.by_cookie.len()
            + self.listeners.len()
            + self.listener_sockets.len()
            + self.closing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `ev.owner` when the kernel did not know it, and learns from events that carry one.
    pub fn resolve(&mut self, ev: &mut Event) {
        let key = (ev.netns, ev.local.port());
        self.expire_closed(ev.ts_ns);
        if ev.owner.is_none() {
            ev.owner = self.lookup(ev, key);
        }
        if let EventKind::TwTimer {
            op: TwOp::Start, ..
        } = ev.kind
            && let Some(o) = self.closing.remove(&SockId::of(ev))
        {
            ev.owner.get_or_insert(o);
        }
        if let EventKind::State { old, new, .. } = ev.kind {
            if matches!(
                new,
                TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing
            ) && let Some(o) = ev.owner
            {
                self.closing.insert(SockId::of(ev), o);
            }
            if new == TcpState::Listen
                && let Some(o) = ev.owner
            {
                self.listeners.insert(key, o);
                if ev.cookie != 0 {
                    self.listener_sockets.insert(ev.cookie, (key, o));
                }
            }
            if new == TcpState::Close {
                let id = SockId::of(ev);
                if self.closing.contains_key(&id) {
                    self.closed_order.push_back((ev.ts_ns, id));
                }
                self.by_cookie.remove(&ev.cookie);
                if old == TcpState::Listen {
                    self.listener_sockets.remove(&ev.cookie);
                    // Another member of its SO_REUSEPORT group may still listen.
                    match self.listener_sockets.values().find(|(k, _)| *k == key) {
                        Some((_, o)) => self.listeners.insert(key, *o),
                        None => self.listeners.remove(&key),
                    };
                }
            }
        }
    }

    fn expire_closed(&mut self, now: u64) {
        while let Some(&(ts, id)) = self.closed_order.front() {
            if ts.saturating_add(CLOSING_KEEP_NS) >= now {
                break;
            }
            self.closed_order.pop_front();
            self.closing.remove(&id);
        }
    }

    fn lookup(&self, ev: &Event, key: (u32, u16)) -> Option<Owner> {
        if let Some(o) = self.by_cookie.get(&ev.cookie).filter(|_| ev.cookie != 0) {
            return Some(*o);
        }
        let listener_side = match ev.kind {
            EventKind::State { old, .. } => old == TcpState::Listen,
            EventKind::Overflow { .. } => true,
            EventKind::Retransmit { kind, .. } => kind == super::event::RetransmitKind::SynAck,
            _ => false,
        };
        if listener_side {
            let own = match ev.kind {
                EventKind::Overflow { .. } | EventKind::Retransmit { .. } => self
                    .listener_sockets
                    .get(&ev.cookie)
                    .filter(|_| ev.cookie != 0)
                    .map(|(_, o)| o),
                _ => None,
            };
            return own.or_else(|| self.listeners.get(&key)).map(|o| Owner {
                source: OwnerSource::Listener,
                ..*o
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Comm, Family};

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            tid: pid,
            comm: Comm::new(comm),
            cgroup_id: 0,
            source: OwnerSource::Task,
        }
    }

    fn state(cookie: u64, local: &str, old: TcpState, new: TcpState, o: Option<Owner>) -> Event {
        Event {
            ts_ns: 1,
            cookie,
            skaddr: cookie,
            netns: 7,
            family: Family::Inet,
            local: local.parse().unwrap(),
            remote: "10.0.0.2:50000".parse().unwrap(),
            owner: o,
            softirq: o.is_none(),
            kind: EventKind::State {
                old,
                new,
                prev_state_ns: None,
            },
        }
    }

    /// curl (pid 42) closing its socket from `local`: ESTABLISHED -> FIN_WAIT1 in its task.
    fn curl_closes(cookie: u64, local: &str) -> Event {
        state(
            cookie,
            local,
            TcpState::Established,
            TcpState::FinWait1,
            Some(owner(42, "curl")),
        )
    }

    /// The timewait timer of the socket at `local` armed (no owner known to the kernel).
    fn tw_start(cookie: u64, local: &str, sub: TcpState) -> Event {
        let mut t = state(cookie, local, TcpState::Close, TcpState::Close, None);
        t.kind = EventKind::TwTimer {
            op: TwOp::Start,
            substate: Some(sub),
            kworker: false,
        };
        t
    }

    #[test]
    fn kernel_owner_is_kept() {
        let mut b = OwnerBook::new();
        b.seed_socket(5, owner(1, "other"));
        let mut e = state(
            5,
            "10.0.0.1:80",
            TcpState::Established,
            TcpState::FinWait1,
            Some(owner(9, "nginx")),
        );
        b.resolve(&mut e);
        assert_eq!(e.owner.unwrap().pid, 9);
    }

    #[test]
    fn preexisting_socket_gets_its_inventory_owner_until_close() {
        let mut b = OwnerBook::new();
        b.seed_socket(5, owner(100, "redis"));
        let mut e = state(
            5,
            "10.0.0.1:6379",
            TcpState::Established,
            TcpState::CloseWait,
            None,
        );
        b.resolve(&mut e);
        let o = e.owner.unwrap();
        assert_eq!((o.pid, o.source), (100, OwnerSource::Inventory));
        let mut e = state(5, "10.0.0.1:6379", TcpState::LastAck, TcpState::Close, None);
        b.resolve(&mut e);
        assert!(e.owner.is_some());
        assert!(b.is_empty(), "closed sockets are forgotten");
        let mut e = state(
            5,
            "10.0.0.1:6379",
            TcpState::Established,
            TcpState::CloseWait,
            None,
        );
        b.resolve(&mut e);
        assert_eq!(e.owner, None, "a recycled cookie does not inherit");
    }

    #[test]
    fn child_of_preexisting_listener_takes_listener_owner() {
        let mut b = OwnerBook::new();
        b.seed_listener(7, 80, 0, owner(300, "nginx"));
        let mut e = state(8, "10.0.0.1:80", TcpState::Listen, TcpState::SynRecv, None);
        b.resolve(&mut e);
        let o = e.owner.unwrap();
        assert_eq!((o.pid, o.source), (300, OwnerSource::Listener));
        // A softirq event of a non-child on the same port is not guessed.
        let mut e = state(
            9,
            "10.0.0.1:80",
            TcpState::Established,
            TcpState::CloseWait,
            None,
        );
        b.resolve(&mut e);
        assert_eq!(e.owner, None);
        // Another netns with the same port is someone else.
        let mut e = state(10, "10.0.0.1:80", TcpState::Listen, TcpState::SynRecv, None);
        e.netns = 8;
        b.resolve(&mut e);
        assert_eq!(e.owner, None);
    }

    #[test]
    fn without_cookies_the_timewait_socket_is_matched_by_its_tuple() {
        // The classic state tracepoint gives no cookie; fentry timewait records then have none.
        let mut b = OwnerBook::new();
        b.resolve(&mut curl_closes(0, "10.0.0.1:40000"));
        let mut other = tw_start(0, "10.0.0.1:40001", TcpState::FinWait2);
        b.resolve(&mut other);
        assert_eq!(other.owner, None, "another tuple is another socket");
        let mut t = tw_start(0, "10.0.0.1:40000", TcpState::FinWait2);
        b.resolve(&mut t);
        assert_eq!(t.owner.unwrap().pid, 42);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn timewait_socket_takes_the_closing_sockets_owner() {
        let mut b = OwnerBook::new();
        b.resolve(&mut curl_closes(5, "10.0.0.1:40000"));
        let mut c = state(
            5,
            "10.0.0.1:40000",
            TcpState::FinWait1,
            TcpState::FinWait2,
            None,
        );
        b.resolve(&mut c);
        // The timewait timer is armed before the full socket's FIN_WAIT2 -> CLOSE.
        let mut t = tw_start(5, "10.0.0.1:40000", TcpState::TimeWait);
        t.ts_ns = 2;
        b.resolve(&mut t);
        assert_eq!(t.owner.unwrap().pid, 42);
        assert_eq!(b.len(), 0, "used once");
        // A close without a timewait socket: the owner is dropped after the grace period.
        b.resolve(&mut curl_closes(6, "10.0.0.1:40001"));
        let mut c = state(
            6,
            "10.0.0.1:40001",
            TcpState::FinWait1,
            TcpState::Close,
            Some(owner(42, "curl")),
        );
        b.resolve(&mut c);
        assert_eq!(b.len(), 1);
        let mut later = state(7, "10.0.0.1:1", TcpState::Close, TcpState::SynSent, None);
        later.ts_ns = 5_000_000_000;
        b.resolve(&mut later);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn listeners_learned_from_events_and_forgotten_on_close() {
        let mut b = OwnerBook::new();
        let mut l = state(
            1,
            "0.0.0.0:8080",
            TcpState::Close,
            TcpState::Listen,
            Some(owner(50, "srv")),
        );
        b.resolve(&mut l);
        let mut c = state(2, "0.0.0.0:8080", TcpState::Listen, TcpState::SynRecv, None);
        b.resolve(&mut c);
        assert_eq!(c.owner.unwrap().pid, 50);
        let mut l = state(
            1,
            "0.0.0.0:8080",
            TcpState::Listen,
            TcpState::Close,
            Some(owner(50, "srv")),
        );
        b.resolve(&mut l);
        let mut c = state(3, "0.0.0.0:8080", TcpState::Listen, TcpState::SynRecv, None);
        b.resolve(&mut c);
        assert_eq!(c.owner, None);
    }

    #[test]
    fn reuseport_members_keep_their_own_owners() {
        let mut b = OwnerBook::new();
        b.seed_listener(1, 8080, 10, owner(10, "old"));
        for (cookie, pid) in [(11, 11), (12, 12)] {
            let mut l = state(
                cookie,
                "0.0.0.0:8080",
                TcpState::Close,
                TcpState::Listen,
                Some(owner(pid, "worker")),
            );
            b.resolve(&mut l);
        }
        let overflow = |cookie: u64| {
            let mut e = state(
                cookie,
                "0.0.0.0:8080",
                TcpState::Listen,
                TcpState::Listen,
                None,
            );
            e.kind = EventKind::Overflow {
                queue: crate::model::event::Queue::Accept,
                len: None,
                max: None,
                count: 1,
                source: crate::model::event::OverflowSource::Counters,
                action: crate::model::event::OverflowAction::Dropped,
            };
            e
        };
        for cookie in [10, 11, 12] {
            let mut e = overflow(cookie);
            b.resolve(&mut e);
            assert_eq!(e.owner.map(|o| o.pid), Some(cookie as u32));
        }
        // The latest listen() closes: children go to a member still listening.
        let mut l = state(12, "0.0.0.0:8080", TcpState::Listen, TcpState::Close, None);
        b.resolve(&mut l);
        let mut c = state(
            20,
            "0.0.0.0:8080",
            TcpState::Listen,
            TcpState::SynRecv,
            None,
        );
        b.resolve(&mut c);
        assert!(
            matches!(c.owner.map(|o| o.pid), Some(10 | 11)),
            "{:?}",
            c.owner
        );
    }
}
