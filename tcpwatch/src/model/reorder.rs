//! Merging per-CPU ring buffers back into time order. Each ring is nearly sorted, but a socket's
//! events can come from different CPUs, so drained records wait until they are older than a
//! hold-back horizon and are released sorted by timestamp.
use std::collections::VecDeque;

use super::event::Event;

/// How far behind the newest possible record a release stays: records are committed within
/// microseconds of their timestamp, so anything older than this is final.
pub const HOLD_NS: u64 = 10_000_000;

/// One time-ordered queue per ring, merged on release: each event is moved once.
pub struct Reorder {
    queues: Vec<VecDeque<Event>>,
}

impl Reorder {
    pub fn new(rings: usize) -> Self {
        Reorder {
            queues: (0..rings.max(1)).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Adds a record drained from `ring`. Records of one ring are in reservation order, which
    /// is time order except when a softirq interrupted a program on that CPU: such a record
    /// is inserted at its place.
    pub fn push(&mut self, ring: usize, ev: Event) {
        let last = self.queues.len() - 1;
        let q = &mut self.queues[ring.min(last)];
        match q.back() {
            Some(last) if last.ts_ns > ev.ts_ns => {
                let at = q.partition_point(|e| e.ts_ns <= ev.ts_ns);
                q.insert(at, ev);
            }
            _ => q.push_back(ev),
        }
    }

    pub fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// Moves every event with `ts_ns <= cut_ns` to `out`, in timestamp order; ties go to the
    /// lower ring, then arrival order.
    pub fn release(&mut self, cut_ns: u64, out: &mut Vec<Event>) {
        self.release_with(cut_ns, |e| out.push(e));
    }

    /// Like [`Reorder::release`], handing each event to `f` (no intermediate buffer).
    pub fn release_with(&mut self, cut_ns: u64, mut f: impl FnMut(Event)) {
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (i, q) in self.queues.iter().enumerate() {
                if let Some(e) = q.front()
                    && e.ts_ns <= cut_ns
                    && best.is_none_or(|(_, t)| e.ts_ns < t)
                {
                    best = Some((i, e.ts_ns));
                }
            }
            let Some((i, _)) = best else { break };
            if let Some(e) = self.queues[i].pop_front() {
                f(e);
            }
        }
    }

    /// Everything, at shutdown.
    pub fn release_all(&mut self, out: &mut Vec<Event>) {
        self.release(u64::MAX, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{EventKind, Family, TcpState};

    fn ev(ts: u64, cookie: u64) -> Event {
        Event {
            ts_ns: ts,
            cookie,
            skaddr: 0,
            netns: 1,
            family: Family::Inet,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            owner: None,
            softirq: false,
            kind: EventKind::State {
                old: TcpState::Close,
                new: TcpState::SynSent,
                prev_state_ns: None,
            },
        }
    }

    #[test]
    fn merges_two_rings_and_holds_back_the_recent() {
        let mut r = Reorder::new(2);
        for (ts, c) in [(10, 1), (30, 1), (50, 2)] {
            r.push(0, ev(ts, c));
        }
        for (ts, c) in [(20, 2), (40, 1), (60, 2)] {
            r.push(1, ev(ts, c));
        }
        let mut out = Vec::new();
        r.release(45, &mut out);
        assert_eq!(
            out.iter().map(|e| e.ts_ns).collect::<Vec<_>>(),
            vec![10, 20, 30, 40]
        );
        assert_eq!(r.len(), 2);
        // A late record from ring 0 that is still above the old cut merges in order.
        r.push(0, ev(55, 3));
        r.release_all(&mut out);
        assert_eq!(
            out.iter().map(|e| e.ts_ns).collect::<Vec<_>>(),
            vec![10, 20, 30, 40, 50, 55, 60]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut r = Reorder::new(1);
        r.push(0, ev(5, 1));
        r.push(0, ev(5, 2));
        r.push(0, ev(5, 3));
        let mut out = Vec::new();
        r.release(5, &mut out);
        assert_eq!(
            out.iter().map(|e| e.cookie).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn a_record_out_of_order_within_its_ring_is_placed() {
        let mut r = Reorder::new(1);
        for ts in [10, 30, 20, 40] {
            r.push(0, ev(ts, ts));
        }
        let mut out = Vec::new();
        r.release_all(&mut out);
        assert_eq!(
            out.iter().map(|e| e.ts_ns).collect::<Vec<_>>(),
            vec![10, 20, 30, 40]
        );
    }
}
