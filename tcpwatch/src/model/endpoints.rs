//! The endpoints a socket had, for the reports the kernel makes after clearing them:
//! `tcp_disconnect` (a `connect(AF_UNSPEC)`, an aborted connect) moves the socket to CLOSE,
//! zeroes its remote port (and an unbound local address), then reports the error. Without
//! this the `error` event reads `10.0.0.1:0` as if that were the peer.
use std::collections::VecDeque;
use std::net::SocketAddr;

use rustc_hash::FxHashMap as HashMap;

use super::event::{Event, EventKind, TcpState};

/// How long, and how many, closed sockets are remembered: the report follows the transition
/// in the same system call, so a little is plenty and the memory stays small at any churn.
const KEEP_NS: u64 = 2_000_000_000;
const KEEP_MAX: usize = 4096;

#[derive(Default)]
pub struct EndpointBook {
    closed: HashMap<u64, (SocketAddr, SocketAddr)>,
    order: VecDeque<(u64, u64)>,
}

impl EndpointBook {
    /// Learns from a transition to CLOSE; gives an error report without a remote endpoint
    /// the one its socket had.
    pub fn apply(&mut self, ev: &mut Event) {
        if ev.cookie == 0 {
            return;
        }
        match ev.kind {
            EventKind::State {
                new: TcpState::Close,
                ..
            } if ev.remote.port() != 0 => {
                while self.order.len() >= KEEP_MAX
                    || self
                        .order
                        .front()
                        .is_some_and(|&(ts, _)| ts.saturating_add(KEEP_NS) < ev.ts_ns)
                {
                    if let Some((_, c)) = self.order.pop_front() {
                        self.closed.remove(&c);
                    }
                }
                if self
                    .closed
                    .insert(ev.cookie, (ev.local, ev.remote))
                    .is_none()
                {
                    self.order.push_back((ev.ts_ns, ev.cookie));
                }
            }
            EventKind::SockError { .. } if ev.remote.port() == 0 => {
                if let Some(&(local, remote)) = self.closed.get(&ev.cookie) {
                    ev.local = local;
                    ev.remote = remote;
                }
            }
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.closed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.closed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::test_event;

    fn at(mut e: Event, ts: u64, local: &str, remote: &str) -> Event {
        e.ts_ns = ts;
        e.local = local.parse().unwrap();
        e.remote = remote.parse().unwrap();
        e
    }

    fn close(cookie: u64, ts: u64) -> Event {
        at(
            test_event(
                ts,
                cookie,
                EventKind::State {
                    old: TcpState::Established,
                    new: TcpState::Close,
                    prev_state_ns: None,
                },
            ),
            ts,
            "10.0.0.2:40000",
            "10.0.0.1:80",
        )
    }

    fn error(cookie: u64, ts: u64) -> Event {
        at(
            test_event(ts, cookie, EventKind::SockError { errno: 104 }),
            ts,
            "0.0.0.0:40000",
            "10.0.0.1:0",
        )
    }

    #[test]
    fn a_report_after_the_disconnect_gets_the_endpoints_back() {
        let mut b = EndpointBook::default();
        b.apply(&mut close(7, 100));
        let mut e = error(7, 200);
        b.apply(&mut e);
        assert_eq!(e.remote.to_string(), "10.0.0.1:80");
        assert_eq!(e.local.to_string(), "10.0.0.2:40000");
        // Another socket's report is left as the kernel made it.
        let mut e = error(8, 200);
        b.apply(&mut e);
        assert_eq!(e.remote.to_string(), "10.0.0.1:0");
    }

    #[test]
    fn the_book_stays_small() {
        let mut b = EndpointBook::default();
        for c in 1..20_000u64 {
            b.apply(&mut close(c, c * 1000));
        }
        assert!(b.len() <= KEEP_MAX);
        // And forgets after its time.
        b.apply(&mut close(1_000_000, 60_000_000_000));
        assert_eq!(b.len(), 1);
        let mut e = error(19_999, 60_000_000_001);
        b.apply(&mut e);
        assert_eq!(e.remote.port(), 0);
    }
}
