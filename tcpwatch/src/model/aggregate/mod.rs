//! The aggregator: events in (time passed in), bounded state out. Per-socket timelines (LRU
//! capped, closed sockets kept for a retention window), listeners, the live timewait registry,
//! counters and histograms. Pure: no I/O, nothing of aya, netlink or /proc.
#[cfg(test)]
mod tests;
mod timeline;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashMap as HashMap;

use crate::model::slab::SlabMap;

use crate::model::event::{
    Event, EventKind, OverflowAction, OverflowSource, Owner, Queue, RetransmitKind, TcpState,
    TwExitReason,
};

/// Bounds and thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Timelines kept at most; the least recently active is evicted beyond it.
    pub max_sockets: usize,
    /// How long a closed socket's timeline stays visible after its end.
    pub retention_ns: u64,
    /// Timelines leaving after their retention are kept for `take_retired` (the daemon's
    /// recorder writes them down).
    pub keep_retired: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_sockets: 65_536,
            retention_ns: 60_000_000_000,
            keep_retired: false,
        }
    }
}

pub use timeline::*;

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
    /// When its LISTEN -> CLOSE was seen.
    pub closed_ns: Option<u64>,
    /// When a sample last listed it (samples list every live listener four times a second).
    pub sampled_ns: Option<u64>,
}

impl ListenerStats {
    /// Whether it still listens, as far as events and samples tell.
    pub fn is_open(&self) -> bool {
        self.closed_ns.is_none()
    }

    /// A listener leaves the model `retention_ns` after it closed, or after samples stopped
    /// listing it (a close whose event was lost, a namespace gone): it is shown, with its
    /// final counters, until then.
    fn retired(&self, now: u64, retention_ns: u64) -> bool {
        match (self.closed_ns, self.sampled_ns) {
            (Some(c), _) => c.saturating_add(retention_ns) <= now,
            (None, Some(s)) => s.saturating_add(retention_ns) <= now,
            // Known from events only (a replay): it stays until it closes.
            (None, None) => false,
        }
    }
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
    /// When closed listeners were last looked for.
    listeners_swept_ns: u64,
    /// Ended timelines past their retention, when `cfg.keep_retired`.
    retired: Vec<Timeline>,
}

/// Listeners are looked through for retired ones this often (not at every tick).
const LISTENER_SWEEP_NS: u64 = 1_000_000_000;

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
            listeners_swept_ns: 0,
            retired: Vec::new(),
        }
    }

    /// The ended timelines that left since the previous call (with `cfg.keep_retired`).
    pub fn take_retired(&mut self) -> Vec<Timeline> {
        std::mem::take(&mut self.retired)
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
        l.sampled_ns = Some(now);
    }

    /// Starts a new peak window for every listener (after a scrape: peaks since the last one).
    pub fn reset_listener_peaks(&mut self) {
        for l in self.listeners.values_mut().flatten() {
            l.accept_peak = l.accept_now;
            l.syn_peak = l.syn_now;
        }
    }

    /// Every listener seen, each member of an SO_REUSEPORT group on its own.
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerStats> {
        self.listeners.values().flatten()
    }

    /// Listeners that have not closed.
    pub fn listener_count(&self) -> usize {
        self.listeners().filter(|l| l.is_open()).count()
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
            closed_ns: None,
            sampled_ns: None,
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
                if old == TcpState::Listen && new == TcpState::Close {
                    self.listener_closed(ev);
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
                max,
                count,
                source,
                action,
            } => {
                let (netns, local, cookie, ts) = (ev.netns, ev.local, ev.cookie, ev.ts_ns);
                let l = self.listener(netns, local, cookie, ts);
                if ev.owner.is_some() {
                    l.owner = ev.owner;
                }
                // The limit the queue had then: where no sample ever gave one (a replay),
                // the overflow's own record does.
                if let Some(m) = max
                    && l.sampled_ns.is_none()
                {
                    l.accept_max = m;
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
    /// The listener a LISTEN -> CLOSE event is about closed now.
    fn listener_closed(&mut self, ev: &Event) {
        if let Some(g) = self.listeners.get_mut(&(ev.netns, ev.local)) {
            for l in g
                .iter_mut()
                .filter(|l| l.cookie == ev.cookie || ev.cookie == 0 || l.cookie == 0)
            {
                l.closed_ns = Some(ev.ts_ns);
            }
        }
    }

    /// Drops listeners that closed (or left the samples) more than the retention ago.
    fn retire_listeners(&mut self, now_ns: u64) {
        if now_ns < self.listeners_swept_ns.saturating_add(LISTENER_SWEEP_NS) {
            return;
        }
        self.listeners_swept_ns = now_ns;
        let retention = self.cfg.retention_ns;
        self.listeners.retain(|_, g| {
            g.retain(|l| !l.retired(now_ns, retention));
            !g.is_empty()
        });
        if self.listeners.capacity() > 64 && self.listeners.len() * 4 < self.listeners.capacity() {
            self.listeners.shrink_to_fit();
        }
    }

    pub fn tick(&mut self, now_ns: u64) {
        self.retire_listeners(now_ns);
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
                let t = self.sockets.remove(&key);
                if self.cfg.keep_retired {
                    self.retired.extend(t);
                }
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
