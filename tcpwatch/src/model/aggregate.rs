//! The aggregator: events in (time passed in), bounded state out. Per-socket timelines (LRU
//! capped, closed sockets kept for a retention window), listeners, the live timewait registry,
//! counters and histograms. Pure: no I/O, nothing of aya, netlink or /proc.
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashMap as HashMap;

use super::slab::SlabMap;

use super::event::{
    Event, EventKind, Family, OverflowAction, OverflowSource, Owner, Queue, RetransmitKind,
    TcpState, TwExitReason,
};

/// Bounds and thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Timelines kept at most; the least recently active is evicted beyond it.
    pub max_sockets: usize,
    /// How long a closed socket's timeline stays visible after its end.
    pub retention_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_sockets: 65_536,
            retention_ns: 60_000_000_000,
        }
    }
}

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
    seq: u64,
    /// The sequence number its entry in the touch log carries.
    queued: u64,
}

fn rkind(k: RetransmitKind) -> usize {
    match k {
        RetransmitKind::Syn => 0,
        RetransmitKind::SynAck => 1,
        RetransmitKind::Data => 2,
        RetransmitKind::Fin => 3,
    }
}

impl Timeline {
    fn new(ev: &Event, seq: u64) -> Timeline {
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

/// A listener and what happened to it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListenerStats {
    pub netns: u32,
    pub local: SocketAddr,
    pub cookie: u64,
    pub owner: Option<Owner>,
    pub accept_now: u32,
    pub accept_max: u32,
    pub accept_peak: u32,
    pub syn_now: u32,
    pub syn_peak: u32,
    /// The listener's own drop counter at the last sample.
    pub drops: u64,
    /// Drops since the aggregator started, by queue, and syncookies sent.
    pub overflow_accept: u64,
    pub overflow_syn: u64,
    pub syncookies: u64,
    /// Final-ACK overflows reported as they happened (a subset of `overflow_accept`).
    pub overflow_packets: u64,
    pub synack_retransmits: u64,
    pub last_ns: u64,
}

/// One sample of a listener's queues and drop counter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListenerSample {
    pub netns: u32,
    pub local: SocketAddr,
    pub cookie: u64,
    pub owner: Option<Owner>,
    pub accept_now: u32,
    pub accept_max: u32,
    pub syn_now: u32,
    pub drops: u64,
}

/// A timewait socket as the registry keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TwEntry {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `None` when it existed before tcpwatch started.
    pub enter_ns: Option<u64>,
    pub substate: Option<TcpState>,
    pub owner: Option<Owner>,
}

/// Totals since the aggregator started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub events: u64,
    pub transitions: u64,
    /// Retransmits the kernel made, by kind (SYN, SYN-ACK, data, FIN).
    pub retrans: [u64; 4],
    /// Segments they carried: what the kernel adds to `RetransSegs`.
    pub retrans_segs: u64,
    /// Retransmit attempts the kernel gave up before sending (counted nowhere else).
    pub retrans_not_sent: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub errors: HashMap<i32, u64>,
    pub tw_enter: u64,
    pub tw_exit: [u64; 3],
    pub evicted: u64,
}

/// Resets grouped by who sent them and why: per namespace, direction, the kernel's reason code
/// (sent) or the state they hit (received), and whether a socket answered (sent without one:
/// nothing matched the segment).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResetKey {
    pub netns: u32,
    pub sent: bool,
    pub reason: Option<u32>,
    pub state: Option<TcpState>,
    pub no_socket: bool,
}

/// What the reset findings name: how many, the first owner seen, a few connections.
#[derive(Clone, Debug, Default)]
pub struct ResetStats {
    pub count: u64,
    pub owner: Option<Owner>,
    pub examples: Vec<(SocketAddr, SocketAddr)>,
}

/// Reset groups kept at most (reasons and states are few; namespaces can be many): resets of
/// further groups still count in the totals.
pub const RESET_GROUPS_MAX: usize = 1024;
const RESET_EXAMPLES: usize = 5;

pub struct Aggregator {
    pub cfg: Config,
    sockets: SlabMap<Timeline>,
    /// (seq, key), one per timeline, oldest first: pushed when the timeline is made, pushed
    /// again with its last activity when eviction finds it was active since (a CLOCK
    /// approximation of least recently used, so an event costs no log entry); entries of
    /// removed timelines are stale and skipped.
    touch: VecDeque<(u64, u64)>,
    /// Ended sockets, in end order, for retention.
    ended: VecDeque<(u64, u64)>,
    seq: u64,
    /// By (netns, local address); the members of an SO_REUSEPORT group share the address and
    /// are told apart by their socket cookie, one entry each.
    listeners: HashMap<(u32, SocketAddr), Vec<ListenerStats>>,
    pub timewait: SlabMap<TwEntry>,
    pub resets: HashMap<ResetKey, ResetStats>,
    pub totals: Totals,
    pub handshake_us: Log2Hist,
    pub lifetime_ms: Log2Hist,
    pub first_ns: Option<u64>,
    pub last_ns: u64,
}

/// Which socket an event belongs to: the cookie where the hook gives one, else the address.
pub fn key_of(ev: &Event) -> u64 {
    if ev.cookie != 0 { ev.cookie } else { ev.skaddr }
}

impl Aggregator {
    pub fn new(cfg: Config) -> Self {
        Aggregator {
            cfg,
            sockets: SlabMap::with_slots(cfg.max_sockets + 1),
            touch: VecDeque::new(),
            ended: VecDeque::new(),
            seq: 0,
            listeners: HashMap::default(),
            timewait: SlabMap::default(),
            resets: HashMap::default(),
            totals: Totals::default(),
            handshake_us: Log2Hist::default(),
            lifetime_ms: Log2Hist::default(),
            first_ns: None,
            last_ns: 0,
        }
    }

    pub fn sockets(&self) -> impl Iterator<Item = &Timeline> {
        self.sockets.values()
    }

    pub fn socket(&self, key: u64) -> Option<&Timeline> {
        self.sockets.get(&key)
    }

    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Bytes the socket table can use at most (the documented bound): one slab slot per
    /// timeline (allocated once for the cap + 1), the index (a key, a slot number and a
    /// control byte per bucket; hashbrown sizes it to a power of two at most 8/7 of the
    /// entries), plus the touch and end logs, compacted at 4x and 2x the table. With the
    /// default 65 536 sockets: see `BENCHMARKS.md`.
    pub fn socket_bound_bytes(cfg: &Config) -> usize {
        let buckets = ((cfg.max_sockets + 1) * 8 / 7 + 1).next_power_of_two();
        (cfg.max_sockets + 1) * SlabMap::<Timeline>::slot_bytes()
            + buckets * (16 + 1)
            + (6 * cfg.max_sockets + 2048) * 16 * 2
    }

    fn count_reset(
        &mut self,
        ev: &Event,
        sent: bool,
        state: Option<TcpState>,
        reason: Option<u32>,
    ) {
        let key = ResetKey {
            netns: ev.netns,
            sent,
            reason: if sent { reason } else { None },
            state: if sent { None } else { state },
            no_socket: sent && ev.cookie == 0 && ev.skaddr == 0,
        };
        if self.resets.len() >= RESET_GROUPS_MAX && !self.resets.contains_key(&key) {
            return;
        }
        let r = self.resets.entry(key).or_default();
        r.count += 1;
        if r.owner.is_none() {
            r.owner = ev.owner;
        }
        if r.examples.len() < RESET_EXAMPLES && !r.examples.contains(&(ev.local, ev.remote)) {
            r.examples.push((ev.local, ev.remote));
        }
    }

    /// A timewait socket from the inventory.
    pub fn seed_timewait(&mut self, tw: u64, e: TwEntry) {
        self.timewait.get_or_insert_with(tw, || e);
    }

    /// A listener as sampled (inventory or the 4 Hz sampler).
    pub fn observe_listener(&mut self, s: &ListenerSample, now: u64) {
        let l = self.listener(s.netns, s.local, s.cookie, now);
        l.accept_now = s.accept_now;
        l.accept_max = s.accept_max;
        l.syn_now = s.syn_now;
        l.accept_peak = l.accept_peak.max(s.accept_now);
        l.syn_peak = l.syn_peak.max(s.syn_now);
        l.drops = s.drops;
        if s.owner.is_some() {
            l.owner = s.owner;
        }
        l.last_ns = now;
    }

    /// Starts a new peak window for every listener (after a scrape: peaks since the last one).
    pub fn reset_listener_peaks(&mut self) {
        for l in self.listeners.values_mut().flatten() {
            l.accept_peak = l.accept_now;
            l.syn_peak = l.syn_now;
        }
    }

    /// Forgets listeners not seen since `before` (closed).
    pub fn drop_listeners_before(&mut self, before: u64) {
        self.listeners.retain(|_, g| {
            g.retain(|l| l.last_ns >= before);
            !g.is_empty()
        });
    }

    /// Every listener seen, each member of an SO_REUSEPORT group on its own.
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerStats> {
        self.listeners.values().flatten()
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.values().map(Vec::len).sum()
    }

    /// The listener at `local` with `cookie`; a caller without a cookie (0: the /proc
    /// inventory) gets the address's first one.
    pub fn listener_stats(
        &self,
        netns: u32,
        local: SocketAddr,
        cookie: u64,
    ) -> Option<&ListenerStats> {
        let g = self.listeners.get(&(netns, local))?;
        if cookie == 0 {
            return g.first();
        }
        g.iter().find(|l| l.cookie == cookie)
    }

    fn listener(
        &mut self,
        netns: u32,
        local: SocketAddr,
        cookie: u64,
        now: u64,
    ) -> &mut ListenerStats {
        let g = self.listeners.entry((netns, local)).or_default();
        // A record without a cookie (a fallback hook) goes to the address's first listener;
        // the first record with one claims an entry made without.
        let at = if cookie == 0 {
            (!g.is_empty()).then_some(0)
        } else {
            g.iter()
                .position(|l| l.cookie == cookie)
                .or_else(|| g.iter().position(|l| l.cookie == 0))
        };
        if let Some(i) = at {
            let l = &mut g[i];
            if l.cookie == 0 {
                l.cookie = cookie;
            }
            return l;
        }
        g.push(ListenerStats {
            netns,
            local,
            cookie,
            owner: None,
            accept_now: 0,
            accept_max: 0,
            accept_peak: 0,
            syn_now: 0,
            syn_peak: 0,
            drops: 0,
            overflow_accept: 0,
            overflow_syn: 0,
            syncookies: 0,
            overflow_packets: 0,
            synack_retransmits: 0,
            last_ns: now,
        });
        let last = g.len() - 1;
        &mut g[last]
    }

    fn timeline(&mut self, ev: &Event) -> &mut Timeline {
        self.seq += 1;
        let seq = self.seq;
        let key = key_of(ev);
        let touch = &mut self.touch;
        let t = self.sockets.get_or_insert_with(key, || {
            touch.push_back((seq, key));
            Timeline::new(ev, seq)
        });
        t.seq = seq;
        t.last_ns = ev.ts_ns;
        if ev.owner.is_some() {
            t.owner = ev.owner;
        }
        if ev.local.port() != 0 {
            t.local = ev.local;
        }
        if ev.remote.port() != 0 {
            t.remote = ev.remote;
        }
        t
    }

    /// Feeds one event (events arrive in time order; duplicates and reorders are tolerated).
    pub fn apply(&mut self, ev: &Event) {
        self.totals.events += 1;
        self.first_ns.get_or_insert(ev.ts_ns);
        self.last_ns = self.last_ns.max(ev.ts_ns);
        match ev.kind {
            EventKind::State {
                old,
                new,
                prev_state_ns,
            } => {
                self.totals.transitions += 1;
                if old == TcpState::SynSent
                    && new == TcpState::Established
                    && let Some(d) = prev_state_ns
                {
                    self.handshake_us.add(d / 1000);
                }
                let t = self.timeline(ev);
                let tr = Transition {
                    ts_ns: ev.ts_ns,
                    old,
                    new,
                    prev_state_ns,
                };
                // The same transition twice in a row is a duplicate record, not a new fact.
                if t.transitions.last() == Some(&tr) {
                    return;
                }
                t.transitions.push(tr);
                if ev.ts_ns >= t.state_since_ns || t.state.is_none() {
                    t.state = Some(new);
                    t.state_since_ns = ev.ts_ns;
                }
                if new == TcpState::FinWait1
                    || (old == TcpState::Established && new == TcpState::Close)
                {
                    t.closed_first.get_or_insert(true);
                }
                if new == TcpState::CloseWait {
                    t.closed_first.get_or_insert(false);
                }
                if new == TcpState::Close {
                    t.closed_ns = Some(ev.ts_ns);
                    let life = ev.ts_ns.saturating_sub(t.first_ns) / 1_000_000;
                    let in_tw = t.timewait.is_some_and(|p| p.exit.is_none());
                    let key = key_of(ev);
                    self.lifetime_ms.add(life);
                    if !in_tw {
                        self.ended.push_back((ev.ts_ns, key));
                    }
                }
            }
            EventKind::Retransmit {
                kind,
                nth,
                interval_ns,
                accept_queue,
                syn_queue,
                segs,
                ..
            } => {
                if segs == 0 {
                    self.totals.retrans_not_sent += 1;
                    return;
                }
                self.totals.retrans[rkind(kind)] += 1;
                self.totals.retrans_segs += segs as u64;
                if kind == RetransmitKind::SynAck {
                    // The event's socket is the listener; its local address is the listener's.
                    let (netns, local, cookie, ts) = (ev.netns, ev.local, ev.cookie, ev.ts_ns);
                    let l = self.listener(netns, local, cookie, ts);
                    l.synack_retransmits += 1;
                    l.accept_peak = l.accept_peak.max(accept_queue.unwrap_or(0));
                    l.syn_peak = l.syn_peak.max(syn_queue.unwrap_or(0));
                    if ev.owner.is_some() {
                        l.owner = ev.owner;
                    }
                    return;
                }
                let t = self.timeline(ev);
                t.retrans[rkind(kind)] += 1;
                t.last_retrans.push(RetransRec {
                    ts_ns: ev.ts_ns,
                    kind: Some(kind),
                    nth,
                    interval_ns,
                });
            }
            EventKind::Reset {
                sent,
                state,
                reason,
            } => {
                if sent {
                    self.totals.resets_sent += 1;
                } else {
                    self.totals.resets_received += 1;
                }
                self.count_reset(ev, sent, state, reason);
                if ev.cookie == 0 && ev.skaddr == 0 {
                    return; // a reset for a closed port: no socket to file it under
                }
                let t = self.timeline(ev);
                if sent {
                    t.resets_sent += 1;
                } else {
                    t.resets_received += 1;
                }
            }
            EventKind::SockError { errno } => {
                *self.totals.errors.entry(errno).or_insert(0) += 1;
                self.timeline(ev).errors.push(errno);
            }
            EventKind::TimeWait {
                enter,
                substate,
                reason,
                ..
            } => {
                let tw = ev.skaddr;
                if enter {
                    self.totals.tw_enter += 1;
                    self.timewait.insert(
                        tw,
                        TwEntry {
                            netns: ev.netns,
                            local: ev.local,
                            remote: ev.remote,
                            enter_ns: Some(ev.ts_ns),
                            substate,
                            owner: ev.owner,
                        },
                    );
                } else {
                    let r = reason.unwrap_or(TwExitReason::Expired);
                    self.totals.tw_exit[match r {
                        TwExitReason::Expired => 0,
                        TwExitReason::Reused => 1,
                        TwExitReason::Killed => 2,
                    }] += 1;
                    self.timewait.remove(&tw);
                }
                if ev.cookie == 0 {
                    return;
                }
                let key = key_of(ev);
                let t = self.timeline(ev);
                if enter {
                    t.timewait = Some(TwPhase {
                        enter_ns: ev.ts_ns,
                        substate,
                        exit: None,
                    });
                } else if let Some(p) = &mut t.timewait {
                    p.exit = Some((ev.ts_ns, reason.unwrap_or(TwExitReason::Expired)));
                    self.ended.push_back((ev.ts_ns, key));
                }
            }
            EventKind::TimeWaitRearm { substate } => {
                if let Some(e) = self.timewait.get_mut(&ev.skaddr) {
                    e.substate = substate;
                }
                if ev.cookie != 0
                    && let Some(t) = self.sockets.get_mut(&ev.cookie)
                    && let Some(p) = &mut t.timewait
                {
                    p.substate = substate;
                }
            }
            EventKind::Overflow {
                queue,
                len,
                count,
                source,
                action,
                ..
            } => {
                let (netns, local, cookie, ts) = (ev.netns, ev.local, ev.cookie, ev.ts_ns);
                let l = self.listener(netns, local, cookie, ts);
                if ev.owner.is_some() {
                    l.owner = ev.owner;
                }
                match (source, action, queue) {
                    (OverflowSource::Packet, _, _) => l.overflow_packets += count,
                    (OverflowSource::Counters, OverflowAction::Cookies, _) => l.syncookies += count,
                    (OverflowSource::Counters, OverflowAction::Dropped, Queue::Accept) => {
                        l.overflow_accept += count
                    }
                    (OverflowSource::Counters, OverflowAction::Dropped, Queue::Syn) => {
                        l.overflow_syn += count
                    }
                }
                let v = len.unwrap_or(0);
                match queue {
                    Queue::Accept => l.accept_peak = l.accept_peak.max(v),
                    Queue::Syn => l.syn_peak = l.syn_peak.max(v),
                }
            }
            EventKind::TwTimer { .. } => {}
        }
        self.evict();
    }

    /// Time passes: drops ended timelines past the retention window.
    pub fn tick(&mut self, now_ns: u64) {
        while let Some(&(t, key)) = self.ended.front() {
            if t.saturating_add(self.cfg.retention_ns) > now_ns {
                break;
            }
            self.ended.pop_front();
            if self
                .sockets
                .get(&key)
                .and_then(Timeline::ended_ns)
                .is_some_and(|e| e == t)
            {
                self.sockets.remove(&key);
            }
        }
        self.compact_touch();
    }

    fn evict(&mut self) {
        while self.sockets.len() > self.cfg.max_sockets {
            let Some((seq, key)) = self.touch.pop_front() else {
                break;
            };
            let Some(t) = self.sockets.get_mut(&key) else {
                continue;
            };
            if t.queued != seq {
                continue;
            }
            // The timeline of the event being applied is active whatever its log entry says
            // (a new one's entry carries its creation): it is never the one to go.
            if t.seq == seq && (t.seq != self.seq || self.cfg.max_sockets == 0) {
                self.sockets.remove(&key);
                self.totals.evicted += 1;
            } else {
                // Active since it was queued: a second chance, behind the others.
                t.queued = t.seq;
                self.touch.push_back((t.seq, key));
            }
        }
        self.compact_touch();
    }

    /// Keeps the touch and end logs within a constant factor of the table.
    fn compact_touch(&mut self) {
        let sockets = &self.sockets;
        if self.touch.len() > 4 * sockets.len() + 1024 {
            self.touch
                .retain(|(seq, key)| sockets.get(key).is_some_and(|t| t.queued == *seq));
        }
        if self.ended.len() > 2 * sockets.len() + 1024 {
            self.ended
                .retain(|(t, key)| sockets.get(key).and_then(Timeline::ended_ns) == Some(*t));
        }
    }

    /// Live timewait sockets by (netns, local port) and by (netns, remote endpoint).
    pub fn timewait_by_local_port(&self) -> HashMap<(u32, u16), u64> {
        let mut m: HashMap<(u32, u16), u64> = HashMap::default();
        for e in self.timewait.values() {
            *m.entry((e.netns, e.local.port())).or_insert(0) += 1;
        }
        m
    }

    pub fn timewait_by_remote(&self) -> HashMap<(u32, IpAddr, u16), u64> {
        let mut m: HashMap<(u32, IpAddr, u16), u64> = HashMap::default();
        for e in self.timewait.values() {
            *m.entry((e.netns, e.remote.ip(), e.remote.port()))
                .or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Comm, OwnerSource};

    fn owner(pid: u32) -> Owner {
        Owner {
            pid,
            tid: pid,
            comm: Comm::new("app"),
            cgroup_id: 0,
            source: OwnerSource::Task,
        }
    }

    fn ev(ts: u64, cookie: u64, kind: EventKind) -> Event {
        Event {
            ts_ns: ts,
            cookie,
            skaddr: 0xffff_0000 + cookie,
            netns: 1,
            family: Family::Inet,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            owner: Some(owner(7)),
            softirq: false,
            kind,
        }
    }

    fn st(old: TcpState, new: TcpState, prev: Option<u64>) -> EventKind {
        EventKind::State {
            old,
            new,
            prev_state_ns: prev,
        }
    }

    use TcpState::*;

    fn client_close_path(a: &mut Aggregator, c: u64, t0: u64) {
        a.apply(&ev(t0, c, st(Close, SynSent, None)));
        a.apply(&ev(
            t0 + 1_000_000,
            c,
            st(SynSent, Established, Some(1_000_000)),
        ));
        a.apply(&ev(
            t0 + 5_000_000,
            c,
            st(Established, FinWait1, Some(4_000_000)),
        ));
        a.apply(&ev(
            t0 + 5_100_000,
            c,
            st(FinWait1, FinWait2, Some(100_000)),
        ));
        a.apply(&ev(
            t0 + 5_100_100,
            c,
            EventKind::TimeWait {
                enter: true,
                substate: Some(FinWait2),
                reason: None,
                duration_ns: None,
            },
        ));
        a.apply(&ev(t0 + 5_100_200, c, st(FinWait2, Close, Some(100))));
    }

    fn data_rt(nth: u32, err: i32, segs: u32) -> EventKind {
        EventKind::Retransmit {
            kind: RetransmitKind::Data,
            state: Some(Established),
            nth,
            interval_ns: None,
            err,
            segs,
            accept_queue: None,
            syn_queue: None,
        }
    }

    #[test]
    fn retransmits_count_what_the_kernel_sent_and_their_segments() {
        let mut a = Aggregator::new(Config::default());
        a.apply(&ev(1_000, 3, st(SynSent, Established, Some(1))));
        a.apply(&ev(2_000, 3, data_rt(1, 0, 1)));
        // A skb of three segments, then an attempt given up (-EBUSY: still in the host queue).
        a.apply(&ev(3_000, 3, data_rt(2, 0, 3)));
        a.apply(&ev(4_000, 3, data_rt(2, -16, 0)));
        // Sent but refused below TCP (-EPERM from a firewall): the kernel still counted it.
        a.apply(&ev(5_000, 3, data_rt(3, -1, 1)));
        assert_eq!(a.totals.retrans[rkind(RetransmitKind::Data)], 3);
        assert_eq!(a.totals.retrans_segs, 5);
        assert_eq!(a.totals.retrans_not_sent, 1);
        assert_eq!(a.socket(3).unwrap().retransmits(RetransmitKind::Data), 3);
    }

    #[test]
    fn active_close_keeps_the_timeline_through_time_wait() {
        let mut a = Aggregator::new(Config::default());
        client_close_path(&mut a, 5, 1_000);
        let t = a.socket(5).unwrap();
        assert_eq!(
            t.transitions.iter().map(|t| t.new).collect::<Vec<_>>(),
            vec![SynSent, Established, FinWait1, FinWait2, Close]
        );
        assert_eq!(t.closed_first, Some(true));
        assert_eq!(t.timewait.unwrap().exit, None);
        assert_eq!(a.timewait.len(), 1);
        assert_eq!(a.handshake_us.count, 1);
        // TIME_WAIT keeps the timeline past the retention window.
        a.tick(10_000_000_000_000);
        assert!(a.socket(5).is_some());
        a.apply(&ev(
            70_000_000_000,
            5,
            EventKind::TimeWait {
                enter: false,
                substate: Some(TimeWait),
                reason: Some(TwExitReason::Expired),
                duration_ns: Some(1),
            },
        ));
        assert_eq!(a.timewait.len(), 0);
        a.tick(70_000_000_000 + a.cfg.retention_ns - 1);
        assert!(a.socket(5).is_some(), "retained");
        a.tick(70_000_000_000 + a.cfg.retention_ns);
        assert!(a.socket(5).is_none(), "gone after retention");
    }

    #[test]
    fn passive_close_and_abortive_close() {
        let mut a = Aggregator::new(Config::default());
        a.apply(&ev(1, 1, st(Listen, SynRecv, None)));
        a.apply(&ev(2, 1, st(SynRecv, Established, Some(1))));
        a.apply(&ev(3, 1, st(Established, CloseWait, Some(1))));
        a.apply(&ev(4, 1, st(CloseWait, LastAck, Some(1))));
        a.apply(&ev(5, 1, st(LastAck, Close, Some(1))));
        assert_eq!(a.socket(1).unwrap().closed_first, Some(false));
        assert_eq!(a.socket(1).unwrap().ended_ns(), Some(5));
        a.apply(&ev(1, 2, st(Close, SynSent, None)));
        a.apply(&ev(2, 2, st(SynSent, Established, Some(1))));
        a.apply(&ev(3, 2, st(Established, Close, Some(1))));
        assert_eq!(
            a.socket(2).unwrap().closed_first,
            Some(true),
            "SO_LINGER 0 closes first too"
        );
        a.apply(&ev(1, 3, st(Close, SynSent, None)));
        a.apply(&ev(2, 3, st(SynSent, Close, Some(1))));
        let t = a.socket(3).unwrap();
        assert_eq!(t.state, Some(Close));
        assert_eq!(t.closed_first, None, "refused: nobody closed");
        assert_eq!(a.lifetime_ms.count, 3);
    }

    #[test]
    fn duplicate_and_reordered_events() {
        let mut a = Aggregator::new(Config::default());
        let e = ev(10, 1, st(SynSent, Established, Some(5)));
        a.apply(&e);
        a.apply(&e);
        assert_eq!(
            a.socket(1).unwrap().transitions.total,
            1,
            "a duplicate is not a new transition"
        );
        // An older event arriving late does not move the current state back.
        a.apply(&ev(20, 1, st(Established, FinWait1, None)));
        a.apply(&ev(15, 1, st(Established, CloseWait, None)));
        assert_eq!(a.socket(1).unwrap().state, Some(FinWait1));
    }

    #[test]
    fn sockets_never_seen_opening() {
        let mut a = Aggregator::new(Config::default());
        let mut e = ev(5, 9, st(Established, CloseWait, None));
        e.owner = None;
        a.apply(&e);
        let t = a.socket(9).unwrap();
        assert_eq!(t.state, Some(CloseWait));
        assert_eq!(t.owner, None);
        assert_eq!(t.first_ns, 5);
    }

    #[test]
    fn eviction_at_capacity_drops_the_least_recently_active() {
        let mut a = Aggregator::new(Config {
            max_sockets: 3,
            retention_ns: 1,
        });
        for c in 1..=3 {
            a.apply(&ev(c, c, st(Close, SynSent, None)));
        }
        a.apply(&ev(10, 1, st(SynSent, Established, None))); // 1 is active again
        a.apply(&ev(11, 4, st(Close, SynSent, None)));
        assert!(a.socket(2).is_none(), "2 was the least recently active");
        assert!(a.socket(1).is_some() && a.socket(3).is_some() && a.socket(4).is_some());
        assert_eq!(a.totals.evicted, 1);
    }

    #[test]
    fn eviction_gives_the_active_a_second_chance() {
        let mut a = Aggregator::new(Config {
            max_sockets: 3,
            retention_ns: 1,
        });
        for c in 1..=3 {
            a.apply(&ev(c, c, st(Close, SynSent, None)));
        }
        // 1 and 2 are active again: 3 is the one to go, then (1 and 2 requeued behind 4) 4.
        a.apply(&ev(10, 1, st(SynSent, Established, None)));
        a.apply(&ev(11, 2, st(SynSent, Established, None)));
        a.apply(&ev(12, 4, st(Close, SynSent, None)));
        assert!(a.socket(3).is_none());
        a.apply(&ev(13, 5, st(Close, SynSent, None)));
        assert!(a.socket(4).is_none(), "4 was not active since it was made");
        assert!(a.socket(1).is_some() && a.socket(2).is_some() && a.socket(5).is_some());
        assert_eq!(a.totals.evicted, 2);
        assert_eq!(a.touch.len(), 3, "one log entry per timeline");
        // Every resident active again: the new one still stays, an older one goes.
        for c in [1, 2, 5] {
            a.apply(&ev(20 + c, c, st(SynSent, Established, None)));
        }
        a.apply(&ev(30, 6, st(Close, SynSent, None)));
        assert!(
            a.socket(6).is_some(),
            "the timeline just made is not evicted"
        );
        assert_eq!(a.socket_count(), 3);
        assert_eq!(a.totals.evicted, 3);
    }

    #[test]
    fn seed_then_live_timewait_events() {
        let mut a = Aggregator::new(Config::default());
        let e = ev(0, 0, st(Close, Close, None));
        a.seed_timewait(
            0xaa,
            TwEntry {
                netns: 1,
                local: e.local,
                remote: e.remote,
                enter_ns: None,
                substate: Some(TimeWait),
                owner: None,
            },
        );
        assert_eq!(a.timewait.len(), 1);
        let mut x = ev(
            5,
            0,
            EventKind::TimeWait {
                enter: false,
                substate: Some(TimeWait),
                reason: Some(TwExitReason::Expired),
                duration_ns: None,
            },
        );
        x.skaddr = 0xaa;
        a.apply(&x);
        assert_eq!(a.timewait.len(), 0, "a seeded socket leaves on its exit");
        assert_eq!(a.totals.tw_exit[0], 1);
    }

    #[test]
    fn timewait_maps_by_port_and_remote() {
        let mut a = Aggregator::new(Config::default());
        for c in 1..=3u64 {
            let mut e = ev(
                c,
                c,
                EventKind::TimeWait {
                    enter: true,
                    substate: Some(TimeWait),
                    reason: None,
                    duration_ns: None,
                },
            );
            e.local = SocketAddr::new(e.local.ip(), 40000 + c as u16);
            a.apply(&e);
        }
        let by_remote = a.timewait_by_remote();
        assert_eq!(by_remote[&(1, "10.0.0.2".parse().unwrap(), 80)], 3);
        assert_eq!(a.timewait_by_local_port().len(), 3);
    }

    #[test]
    fn reuseport_members_are_listeners_of_their_own() {
        let mut a = Aggregator::new(Config::default());
        let l: SocketAddr = "10.0.0.1:80".parse().unwrap();
        // A fallback hook without a cookie makes an entry; the first sample with one claims it.
        a.apply(&crate::testkit::test_overflow(5, 0, l, 1));
        for (cookie, pid) in [(3, 30), (4, 40)] {
            a.observe_listener(
                &ListenerSample {
                    netns: 1,
                    local: l,
                    cookie,
                    owner: Some(owner(pid)),
                    accept_now: 0,
                    accept_max: 2,
                    syn_now: 0,
                    drops: 0,
                },
                10,
            );
        }
        a.apply(&crate::testkit::test_overflow(20, 4, l, 7));
        a.apply(&crate::testkit::test_overflow(21, 3, l, 2));
        a.apply(&crate::testkit::test_overflow(22, 0, l, 1));
        assert_eq!(a.listener_count(), 2);
        let got = |cookie| {
            let s = a.listener_stats(1, l, cookie).unwrap();
            (s.owner.unwrap().pid, s.overflow_accept)
        };
        assert_eq!(
            got(3),
            (30, 1 + 2 + 1),
            "cookie-less records go to the first"
        );
        assert_eq!(got(4), (40, 7));
        assert!(a.listener_stats(1, l, 5).is_none());
        // A restarted server's new socket is another listener; the old one ages out.
        a.apply(&crate::testkit::test_overflow(30, 9, l, 1));
        assert_eq!(a.listener_count(), 3);
        a.drop_listeners_before(25);
        assert_eq!(a.listener_count(), 1);
        assert_eq!(a.listeners().next().unwrap().cookie, 9);
    }

    #[test]
    fn listeners_from_overflows_synacks_and_samples() {
        let mut a = Aggregator::new(Config::default());
        let l: SocketAddr = "10.0.0.1:80".parse().unwrap();
        a.observe_listener(
            &ListenerSample {
                netns: 1,
                local: l,
                cookie: 3,
                owner: Some(owner(9)),
                accept_now: 1,
                accept_max: 128,
                syn_now: 0,
                drops: 0,
            },
            10,
        );
        let mut o = ev(
            20,
            3,
            EventKind::Overflow {
                queue: Queue::Accept,
                len: Some(129),
                max: Some(128),
                count: 4,
                source: OverflowSource::Counters,
                action: OverflowAction::Dropped,
            },
        );
        o.local = l;
        o.owner = Some(owner(9));
        a.apply(&o);
        let mut s = ev(
            30,
            3,
            EventKind::Retransmit {
                kind: RetransmitKind::SynAck,
                state: Some(SynRecv),
                nth: 1,
                interval_ns: None,
                err: 0,
                segs: 1,
                accept_queue: Some(129),
                syn_queue: Some(3),
            },
        );
        s.local = l;
        s.owner = Some(owner(9));
        a.apply(&s);
        let ls = *a.listener_stats(1, l, 3).unwrap();
        assert_eq!(
            (
                ls.overflow_accept,
                ls.synack_retransmits,
                ls.accept_peak,
                ls.syn_peak
            ),
            (4, 1, 129, 3)
        );
        assert_eq!(ls.owner.unwrap().pid, 9);
        assert_eq!(
            a.socket_count(),
            0,
            "listener events make no socket timelines"
        );
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Log2Hist::default();
        for v in [1, 2, 3, 100, 1000] {
            h.add(v);
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.quantile(0.5), 4);
        assert_eq!(h.quantile(1.0), 1024);
        assert_eq!(Log2Hist::default().quantile(0.5), 0);
    }

    #[test]
    fn a_million_sockets_stay_within_the_bound() {
        let cfg = Config {
            max_sockets: 10_000,
            retention_ns: 1_000,
        };
        let mut a = Aggregator::new(cfg);
        for c in 1..=1_000_000u64 {
            a.apply(&ev(c, c, st(Close, SynSent, None)));
            if c % 3 == 0 {
                a.apply(&ev(c, c, st(SynSent, Close, None)));
            }
        }
        assert!(a.socket_count() <= cfg.max_sockets);
        assert!(
            a.touch.len() <= 4 * cfg.max_sockets + 1024 + 1,
            "touch log compacted: {}",
            a.touch.len()
        );
        assert!(
            a.ended.len() <= 2 * cfg.max_sockets + 1024 + 1,
            "end log compacted: {}",
            a.ended.len()
        );
        let bound = Aggregator::socket_bound_bytes(&cfg);
        let used = a.sockets.capacity() * SlabMap::<Timeline>::slot_bytes()
            + (a.sockets.index_capacity() * 8 / 7 + 1).next_power_of_two() * 17
            + (a.touch.capacity() + a.ended.capacity()) * 16;
        assert!(used <= bound, "used {used} vs documented bound {bound}");
        a.tick(2_000_000);
        assert!(a.ended.is_empty());
    }
}
