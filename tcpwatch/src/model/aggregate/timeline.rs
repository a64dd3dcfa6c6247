//! One socket's history as the aggregator keeps it (transitions, retransmits with their
//! intervals, resets, errors, its TIME_WAIT phase), inline and fixed-size, and the log2
//! histograms of handshakes and lifetimes.
use std::net::SocketAddr;

use crate::model::event::{Event, Family, Owner, RetransmitKind, TcpState, TwExitReason};

/// A fixed-capacity ring: the last `N` items and how many there were in all. Inline, so a
/// timeline's size does not depend on its history.
#[derive(Clone, Copy, Debug)]
pub struct Ring<T: Copy + Default, const N: usize> {
    items: [T; N],
    next: usize,
    pub total: u32,
}

impl<T: Copy + Default, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Ring {
            items: [T::default(); N],
            next: 0,
            total: 0,
        }
    }
}

impl<T: Copy + Default, const N: usize> Ring<T, N> {
    pub fn push(&mut self, v: T) {
        self.items[self.next] = v;
        self.next = (self.next + 1) % N;
        self.total = self.total.saturating_add(1);
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let n = (self.total as usize).min(N);
        let start = if (self.total as usize) <= N {
            0
        } else {
            self.next
        };
        (0..n).map(move |i| &self.items[(start + i) % N])
    }

    pub fn last(&self) -> Option<&T> {
        if self.total == 0 {
            None
        } else {
            Some(&self.items[(self.next + N - 1) % N])
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub old: TcpState,
    pub new: TcpState,
    pub prev_state_ns: Option<u64>,
}

impl Default for Transition {
    fn default() -> Self {
        Transition {
            ts_ns: 0,
            old: TcpState::Close,
            new: TcpState::Close,
            prev_state_ns: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransRec {
    pub ts_ns: u64,
    pub kind: Option<RetransmitKind>,
    pub nth: u32,
    pub interval_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwPhase {
    pub enter_ns: u64,
    pub substate: Option<TcpState>,
    pub exit: Option<(u64, TwExitReason)>,
}

/// Everything known about one socket, from its first event to the end of its TIME_WAIT.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub cookie: u64,
    pub skaddr: u64,
    pub netns: u32,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub owner: Option<Owner>,
    pub first_ns: u64,
    pub last_ns: u64,
    pub state: Option<TcpState>,
    pub state_since_ns: u64,
    pub transitions: Ring<Transition, 12>,
    /// Retransmits by kind: syn, synack, data, fin.
    pub retrans: [u32; 4],
    pub last_retrans: Ring<RetransRec, 6>,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub errors: Ring<i32, 4>,
    /// Whether this socket closed first (went FIN_WAIT1), once known.
    pub closed_first: Option<bool>,
    pub closed_ns: Option<u64>,
    pub timewait: Option<TwPhase>,
    /// Last activity (the aggregator's event sequence number).
    pub(super) seq: u64,
    /// The sequence number its entry in the touch log carries.
    pub(super) queued: u64,
}

pub(super) fn rkind(k: RetransmitKind) -> usize {
    match k {
        RetransmitKind::Syn => 0,
        RetransmitKind::SynAck => 1,
        RetransmitKind::Data => 2,
        RetransmitKind::Fin => 3,
    }
}

impl Timeline {
    pub(super) fn new(ev: &Event, seq: u64) -> Timeline {
        Timeline {
            cookie: ev.cookie,
            skaddr: ev.skaddr,
            netns: ev.netns,
            family: ev.family,
            local: ev.local,
            remote: ev.remote,
            owner: ev.owner,
            first_ns: ev.ts_ns,
            last_ns: ev.ts_ns,
            state: None,
            state_since_ns: ev.ts_ns,
            transitions: Ring::default(),
            retrans: [0; 4],
            last_retrans: Ring::default(),
            resets_sent: 0,
            resets_received: 0,
            errors: Ring::default(),
            closed_first: None,
            closed_ns: None,
            timewait: None,
            seq,
            queued: seq,
        }
    }

    pub fn retransmits(&self, k: RetransmitKind) -> u32 {
        self.retrans[rkind(k)]
    }

    /// Ended: closed without a timewait socket, or the timewait socket left.
    pub fn ended_ns(&self) -> Option<u64> {
        match self.timewait {
            Some(TwPhase {
                exit: Some((t, _)), ..
            }) => Some(t),
            Some(_) => None,
            None => self.closed_ns,
        }
    }
}

/// Power-of-two histogram: bucket i counts values in [2^i, 2^(i+1)) of its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    pub buckets: [u64; 40],
    pub count: u64,
    pub sum: u64,
}

impl Default for Log2Hist {
    fn default() -> Self {
        Log2Hist {
            buckets: [0; 40],
            count: 0,
            sum: 0,
        }
    }
}

impl Log2Hist {
    pub fn add(&mut self, v: u64) {
        let i = (64 - v.max(1).leading_zeros() as usize - 1).min(39);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
    }

    /// Upper bound of the bucket holding the q-quantile (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return 1u64 << (i + 1);
            }
        }
        1 << 40
    }
}
