//! The snapshot's views: the JSON contract every output renders (adding a field is fine,
//! renaming or removing one breaks users), and the input a snapshot is made from.
use std::collections::BTreeMap;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::model::Loss;
use crate::model::aggregate::Log2Hist;
pub use crate::model::event::OwnerView;
use crate::model::event::RstReasons;
use crate::model::findings::catalogue::Finding;
use crate::model::system::{Counters, SockRec, Sockstat};

/// What the snapshot is made from, besides the aggregator.
/// A name from a fixed vocabulary (states, kinds, errno names): borrowed where the snapshot
/// is built, owned where it is read back (a daemon's client).
pub type Name = Cow<'static, str>;

pub struct Input<'a> {
    pub now_ns: u64,
    /// How long events were watched (0 for an instant snapshot).
    pub window_ns: u64,
    pub host: String,
    pub kernel: String,
    pub hooks: Vec<HookView>,
    /// The inventory taken at `now_ns`; `None` when there is none (a replay): states and
    /// listeners then come from the events alone.
    pub inventory: Option<&'a [SockRec]>,
    pub namespaces: Vec<NsInput>,
    pub loss: Loss,
    /// tcpwatch's own namespace: its sysctls and counters are the top-level ones unless
    /// exactly one other namespace is watched.
    pub home_netns: u32,
    pub thresholds: Thresholds,
    /// Only some sockets of each namespace are shown (port, owner or family filters, or a
    /// command's own sockets): the namespace's counters cannot be counts of them.
    pub sockets_filtered: bool,
    /// Names of the reset reasons the events carry.
    pub reasons: RstReasons,
}

#[derive(Clone)]
pub struct NsInput {
    pub inode: u32,
    pub counters_now: Counters,
    pub counters_start: Counters,
    pub sysctls: BTreeMap<String, String>,
    pub sockstat: Sockstat,
    /// Records of this namespace's listing that did not decode (shown with the loss figures).
    pub decode_errors: u64,
}

/// When a finding fires.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// A CLOSE_WAIT socket idle this long means the application did not close it.
    pub close_wait_secs: u64,
    /// Fraction of the ephemeral port range in use toward one destination.
    pub port_pressure: f64,
    /// RTO timeouts in a row, without an ACK making progress, that make a storm (the count
    /// `tcp_retries2` caps).
    pub retransmit_storm: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            close_wait_secs: 10,
            port_pressure: 0.5,
            retransmit_storm: 3,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HookView {
    pub signal: String,
    pub hook: Option<String>,
    pub note: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct QueueView {
    pub now: u32,
    pub max: u32,
    pub peak: u32,
}

impl QueueView {
    /// Full as the kernel judges an accept queue: it holds more than its limit.
    pub fn is_full(&self) -> bool {
        self.now > self.max
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ListenerView {
    pub netns: u32,
    pub addr: String,
    pub port: u16,
    /// The socket cookie (0 where the source has none): the members of an SO_REUSEPORT
    /// group share the address, each has its own queues, drops and owner.
    pub cookie: u64,
    pub owner: Option<OwnerView>,
    pub accept_queue: QueueView,
    pub syn_queue: QueueView,
    /// The listener's drop counter since it was created, as `ss -tlm` shows it (every listen
    /// drop, a final-ACK overflow twice); the overflow counts count each drop once.
    pub drops: u64,
    /// In the observed window: drops by queue, syncookies sent, final-ACK drops seen one by one.
    pub overflows: OverflowsView,
    pub synack_retransmits: u64,
}

/// `ADDR:PORT` as a socket address is written, the IPv6 address in brackets (`[::]:80`, not
/// the ambiguous `:::80`).
pub fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct OverflowsView {
    pub accept: u64,
    pub syn: u64,
    pub syncookies: u64,
    pub final_ack_packets: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PortCount {
    pub netns: u32,
    pub port: u16,
    pub count: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OwnerStates {
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
    pub states: BTreeMap<Name, u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OwnerCount {
    pub pid: u32,
    pub comm: String,
    pub count: u64,
    /// How it is known: `closed` (seen closing), `listener` (on its listening port).
    pub source: Name,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RemoteCount {
    pub netns: u32,
    pub addr: String,
    pub port: u16,
    pub count: u64,
}

/// Ephemeral ports in use from one local address toward one remote endpoint (each needs its
/// own local port: TIME_WAIT included), against `ip_local_port_range`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Headroom {
    pub netns: u32,
    pub local_addr: String,
    pub remote_addr: String,
    pub remote_port: u16,
    pub in_use: u64,
    pub time_wait: u64,
    pub range: u64,
    pub free: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TimeWaitView {
    pub total: u64,
    /// FIN_WAIT2-substate timewait sockets (orphans waiting for the peer's FIN).
    pub fin_wait2: u64,
    pub by_local_port: Vec<PortCount>,
    pub by_remote: Vec<RemoteCount>,
    /// Who closed them: the owner seen closing the socket (events), else the listener on
    /// whose port it is (a server closed first). The kernel keeps no owner for them.
    pub by_owner: Vec<OwnerCount>,
    /// Those neither way attributes (an instant snapshot of client-side TIME_WAIT).
    pub owner_unknown: u64,
    pub port_headroom: Vec<Headroom>,
    /// sockstat `tw` per namespace against what tcpwatch tracks (health).
    pub drift: Vec<Drift>,
    pub entered: u64,
    pub exited: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Drift {
    pub netns: u32,
    pub sockstat: u64,
    pub tracked: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct HistView {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    /// Log2 buckets as (upper bound, count), non-empty ones only.
    pub buckets: Vec<(u64, u64)>,
}

impl From<&Log2Hist> for HistView {
    fn from(h: &Log2Hist) -> Self {
        HistView {
            count: h.count,
            p50: h.quantile(0.5),
            p90: h.quantile(0.9),
            p99: h.quantile(0.99),
            buckets: h
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (1u64 << (i + 1), *n))
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Histograms {
    pub handshake_us: HistView,
    pub lifetime_ms: HistView,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TransitionView {
    pub ts_ns: u64,
    /// The same moment as Unix time (ns), where the output knows the clock (not in a replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ns: Option<i64>,
    pub old: Name,
    pub new: Name,
    pub prev_state_ns: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SocketView {
    pub cookie: u64,
    pub netns: u32,
    pub family: Name,
    pub local: String,
    pub remote: String,
    pub owner: Option<OwnerView>,
    pub state: Option<Name>,
    pub state_for_ns: u64,
    pub closed_first: Option<bool>,
    pub transitions: Vec<TransitionView>,
    pub retransmits: BTreeMap<Name, u32>,
    pub retransmit_intervals_ns: Vec<u64>,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub errors: Vec<Name>,
    pub time_wait: Option<TwView>,
}

impl SocketView {
    /// Gives every timeline entry its wall-clock time as well.
    pub fn stamp_wall(&mut self, clock: &crate::model::time::Clock) {
        let wall = |t: u64| clock.wall_ns(t) as i64;
        for t in &mut self.transitions {
            t.wall_ns = Some(wall(t.ts_ns));
        }
        if let Some(tw) = &mut self.time_wait {
            tw.entered_wall_ns = Some(wall(tw.entered_ns));
        }
    }

    /// Moves its times by `delta_ns` (a recorded timeline onto this boot's clock).
    pub fn shift(&mut self, delta_ns: i64) {
        let mv = |t: u64| (t as i64).saturating_add(delta_ns).max(0) as u64;
        for t in &mut self.transitions {
            t.ts_ns = mv(t.ts_ns);
        }
        if let Some(tw) = &mut self.time_wait {
            tw.entered_ns = mv(tw.entered_ns);
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TwView {
    pub substate: Option<Name>,
    pub entered_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_wall_ns: Option<i64>,
    pub exit: Option<Name>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct LossView {
    pub kernel_dropped: u64,
    pub kernel_dropped_by_type: BTreeMap<Name, u64>,
    pub kernel_skipped: u64,
    pub channel_dropped: u64,
    pub decode_errors: u64,
    pub timelines_evicted: u64,
    /// Events the daemon's recorder could not keep (its queue was full, or the disk
    /// failed); 0 outside the daemon.
    #[serde(default)]
    pub recorder_dropped: u64,
}

impl LossView {
    /// The pipeline's loss alone (no timeline evictions: those are the aggregator's).
    pub fn of(l: &Loss) -> LossView {
        LossView {
            kernel_dropped: l.kernel_dropped,
            kernel_dropped_by_type: l
                .kernel_dropped_by_type
                .nonzero()
                .map(|(k, n)| (k.into(), n))
                .collect(),
            kernel_skipped: l.kernel_skipped,
            channel_dropped: l.channel_dropped,
            decode_errors: l.decode_errors,
            timelines_evicted: 0,
            recorder_dropped: 0,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NamespaceView {
    pub netns: u32,
    pub sockstat_tw: u64,
    pub sockstat_inuse: u64,
    /// Orphaned sockets (closed by their application, still in the kernel): host-wide, the
    /// same in every namespace, against `net.ipv4.tcp_max_orphans`.
    pub sockstat_orphan: u64,
    pub counters: BTreeMap<String, u64>,
    pub sysctls: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    pub version: u32,
    pub ts_ns: u64,
    pub window_s: f64,
    pub host: String,
    pub kernel: String,
    pub hooks: Vec<HookView>,
    /// Sockets per state as `ss -tan` counts them (a timewait socket by its substate, a
    /// request socket as SYN_RECV), TIME_WAIT included.
    pub states: BTreeMap<Name, u64>,
    /// Sockets per owning process and state, the most first (the tally people make of
    /// `ss -tanp`); timewait sockets, which no process holds, are in `time_wait.by_owner`.
    pub owners: Vec<OwnerStates>,
    pub listeners: Vec<ListenerView>,
    pub time_wait: TimeWaitView,
    /// Kernel MIB deltas over the window (TcpExt/Tcp, the watched or home namespace).
    pub counters: BTreeMap<String, u64>,
    pub sysctls: BTreeMap<String, String>,
    pub namespaces: Vec<NamespaceView>,
    pub retransmits: BTreeMap<Name, u64>,
    /// Segments those retransmits carried: what the kernel counts in `RetransSegs`.
    pub retransmitted_segments: u64,
    /// Retransmit attempts the kernel gave up before sending (not in `retransmits`).
    pub retransmits_not_sent: u64,
    pub resets: BTreeMap<Name, u64>,
    pub errors: BTreeMap<Name, u64>,
    pub histograms: Histograms,
    /// Timelines worth a look: retransmits, resets, errors, stuck states (at most 200).
    pub sockets: Vec<SocketView>,
    pub findings: Vec<Finding>,
    pub loss: LossView,
}

impl Snapshot {
    /// Gives the socket timelines' entries their wall-clock times (the output's clock: the
    /// model keeps monotonic time only).
    pub fn stamp_wall(&mut self, clock: &crate::model::time::Clock) {
        for v in &mut self.sockets {
            v.stamp_wall(clock);
        }
    }
}
