//! The snapshot every output renders: the kernel's socket inventory (exact, like `ss`), the
//! aggregator's history, counters and sysctls per namespace, and findings that name what was
//! seen, the likely cause, and the sysctl or code that governs it. Pure composition.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashSet;
use serde::Serialize;

use super::Loss;
use super::aggregate::{Aggregator, ListenerStats, Log2Hist, ResetKey, ResetStats, Timeline};
use super::event::{Owner, RetransmitKind, RstReasons, TcpState, TwExitReason};
use super::system::errno_name;
use crate::model::system::{Counters, Sockstat};
use crate::model::system::{SockRec, ss_state};

/// What the snapshot is made from, besides the aggregator.
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

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct HookView {
    pub signal: String,
    pub hook: Option<String>,
    pub note: Option<String>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct OwnerView {
    pub pid: u32,
    pub comm: String,
}

impl From<&Owner> for OwnerView {
    fn from(o: &Owner) -> Self {
        OwnerView {
            pid: o.pid,
            comm: o.comm.to_string_lossy(),
        }
    }
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Default)]
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

#[derive(Serialize, Clone, Debug, PartialEq)]
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

/// The outputs' test fixture: a listener whose accept queue overflowed (owner `srv`, pid 42;
/// 3 queued of 2, SYN queue peak 1; 24 drops, all accept overflows).
#[cfg(test)]
pub fn overflowing_listener(netns: u32, port: u16) -> ListenerView {
    ListenerView {
        netns,
        addr: "127.0.0.1".into(),
        port,
        cookie: u64::from(port),
        owner: Some(OwnerView {
            pid: 42,
            comm: "srv".into(),
        }),
        accept_queue: QueueView {
            now: 3,
            max: 2,
            peak: 3,
        },
        syn_queue: QueueView {
            now: 0,
            max: 2,
            peak: 1,
        },
        drops: 24,
        overflows: OverflowsView {
            accept: 24,
            ..OverflowsView::default()
        },
        synack_retransmits: 0,
    }
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct OverflowsView {
    pub accept: u64,
    pub syn: u64,
    pub syncookies: u64,
    pub final_ack_packets: u64,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PortCount {
    pub netns: u32,
    pub port: u16,
    pub count: u64,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct OwnerStates {
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
    pub states: BTreeMap<&'static str, u64>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct OwnerCount {
    pub pid: u32,
    pub comm: String,
    pub count: u64,
    /// How it is known: `closed` (seen closing), `listener` (on its listening port).
    pub source: &'static str,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct RemoteCount {
    pub netns: u32,
    pub addr: String,
    pub port: u16,
    pub count: u64,
}

/// Ephemeral ports in use from one local address toward one remote endpoint (each needs its
/// own local port: TIME_WAIT included), against `ip_local_port_range`.
#[derive(Serialize, Clone, Debug, PartialEq)]
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

#[derive(Serialize, Clone, Debug, PartialEq, Default)]
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

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Drift {
    pub netns: u32,
    pub sockstat: u64,
    pub tracked: u64,
}

#[derive(Serialize, Clone, Debug, PartialEq, Default)]
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

#[derive(Serialize, Clone, Debug, PartialEq, Default)]
pub struct Histograms {
    pub handshake_us: HistView,
    pub lifetime_ms: HistView,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TransitionView {
    pub ts_ns: u64,
    pub old: &'static str,
    pub new: &'static str,
    pub prev_state_ns: Option<u64>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct SocketView {
    pub cookie: u64,
    pub netns: u32,
    pub family: &'static str,
    pub local: String,
    pub remote: String,
    pub owner: Option<OwnerView>,
    pub state: Option<&'static str>,
    pub state_for_ns: u64,
    pub closed_first: Option<bool>,
    pub transitions: Vec<TransitionView>,
    pub retransmits: BTreeMap<&'static str, u32>,
    pub retransmit_intervals_ns: Vec<u64>,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub errors: Vec<&'static str>,
    pub time_wait: Option<TwView>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TwView {
    pub substate: Option<&'static str>,
    pub entered_ns: u64,
    pub exit: Option<&'static str>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Governor {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Finding {
    pub id: &'static str,
    pub severity: &'static str,
    pub netns: u32,
    pub what: String,
    pub cause: String,
    pub governed_by: Vec<Governor>,
    pub owner: Option<OwnerView>,
    pub count: u64,
    /// A few sockets or listeners it is about (`local -> remote`).
    pub examples: Vec<String>,
}

#[derive(Serialize, Clone, Debug, PartialEq, Default)]
pub struct LossView {
    pub kernel_dropped: u64,
    pub kernel_dropped_by_type: BTreeMap<&'static str, u64>,
    pub kernel_skipped: u64,
    pub channel_dropped: u64,
    pub decode_errors: u64,
    pub timelines_evicted: u64,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
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

#[derive(Serialize, Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    pub version: u32,
    pub ts_ns: u64,
    pub window_s: f64,
    pub host: String,
    pub kernel: String,
    pub hooks: Vec<HookView>,
    /// Sockets per state as `ss -tan` counts them (a timewait socket by its substate, a
    /// request socket as SYN_RECV), TIME_WAIT included.
    pub states: BTreeMap<&'static str, u64>,
    /// Sockets per owning process and state, the most first (the tally people make of
    /// `ss -tanp`); timewait sockets, which no process holds, are in `time_wait.by_owner`.
    pub owners: Vec<OwnerStates>,
    pub listeners: Vec<ListenerView>,
    pub time_wait: TimeWaitView,
    /// Kernel MIB deltas over the window (TcpExt/Tcp, the watched or home namespace).
    pub counters: BTreeMap<String, u64>,
    pub sysctls: BTreeMap<String, String>,
    pub namespaces: Vec<NamespaceView>,
    pub retransmits: BTreeMap<&'static str, u64>,
    /// Segments those retransmits carried: what the kernel counts in `RetransSegs`.
    pub retransmitted_segments: u64,
    /// Retransmit attempts the kernel gave up before sending (not in `retransmits`).
    pub retransmits_not_sent: u64,
    pub resets: BTreeMap<&'static str, u64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub histograms: Histograms,
    /// Timelines worth a look: retransmits, resets, errors, stuck states (at most 200).
    pub sockets: Vec<SocketView>,
    pub findings: Vec<Finding>,
    pub loss: LossView,
}

const TOP: usize = 10;

fn gov(sysctls: &BTreeMap<String, String>, name: &str) -> Governor {
    Governor {
        name: name.to_string(),
        value: sysctls.get(name).cloned(),
    }
}

fn code(what: &str) -> Governor {
    Governor {
        name: what.to_string(),
        value: None,
    }
}

/// Timelines of sockets that still exist: what a capture says is open now.
fn live_timelines(agg: &Aggregator) -> impl Iterator<Item = &Timeline> {
    agg.sockets()
        .filter(|t| t.ended_ns().is_none() && t.state != Some(TcpState::Close))
}

/// Sockets by owner and state: the listing's owners, or in a replay the live timelines'.
fn owner_states(agg: &Aggregator, inventory: Option<&[SockRec]>) -> Vec<OwnerStates> {
    let mut by: BTreeMap<(u32, String), BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut add = |o: &Owner, st: TcpState| {
        *by.entry((o.pid, o.comm.to_string_lossy()))
            .or_default()
            .entry(st.name())
            .or_insert(0) += 1;
    };
    match inventory {
        Some(inv) => {
            for r in inv.iter().filter(|r| r.state != TcpState::TimeWait) {
                if let Some(o) = &r.owner {
                    add(o, ss_state(r));
                }
            }
        }
        None => {
            for t in live_timelines(agg) {
                if let (Some(o), Some(st)) = (&t.owner, t.state) {
                    add(o, st);
                }
            }
        }
    }
    let mut v: Vec<OwnerStates> = by
        .into_iter()
        .map(|((pid, comm), states)| OwnerStates {
            pid,
            comm,
            sockets: states.values().sum(),
            states,
        })
        .collect();
    v.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
    v.truncate(TOP);
    v
}

/// TIME_WAIT by who closed it: the timewait registry knows the owner of sockets seen closing;
/// a timewait socket on a listening port is the server side of a connection its listener
/// accepted, closed first by the server.
fn time_wait_owners(agg: &Aggregator, inv: &[SockRec], tws: &[&SockRec]) -> (Vec<OwnerCount>, u64) {
    use rustc_hash::FxHashMap;
    let closed: FxHashMap<(u32, SocketAddr, SocketAddr), Owner> = agg
        .timewait
        .values()
        .filter_map(|e| Some(((e.netns, e.local, e.remote), e.owner?)))
        .collect();
    let listeners: FxHashMap<(u32, u16), Owner> = inv
        .iter()
        .filter(|r| r.state == TcpState::Listen)
        .filter_map(|r| Some(((r.netns, r.local.port()), r.owner?)))
        .collect();
    let mut counts: BTreeMap<(u32, String, &'static str), u64> = BTreeMap::new();
    let mut unknown = 0;
    for r in tws {
        let known = closed
            .get(&(r.netns, r.local, r.remote))
            .map(|o| (o, "closed"))
            .or_else(|| {
                listeners
                    .get(&(r.netns, r.local.port()))
                    .map(|o| (o, "listener"))
            });
        match known {
            Some((o, source)) => {
                *counts
                    .entry((o.pid, o.comm.to_string_lossy(), source))
                    .or_insert(0) += 1
            }
            None => unknown += 1,
        }
    }
    let mut v: Vec<OwnerCount> = counts
        .into_iter()
        .map(|((pid, comm, source), count)| OwnerCount {
            pid,
            comm,
            count,
            source,
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
    v.truncate(TOP);
    (v, unknown)
}

/// Resets explained, per namespace. What made this host send them comes from the kernel's
/// counters (exact on every kernel) or, in a capture, from the reason on each reset (6.10+),
/// which also names the sockets; resets received are told apart by the state they hit.
fn reset_findings<'a>(
    agg: &Aggregator,
    input: &Input<'_>,
    s: &Snapshot,
    sysctls_of: &dyn Fn(u32) -> &'a BTreeMap<String, String>,
) -> Vec<Finding> {
    use std::collections::BTreeSet;
    let named = |k: &ResetKey, names: &[&str]| {
        k.reason
            .and_then(|r| input.reasons.name(r))
            .is_some_and(|n| names.contains(&n))
    };
    let mut nets: BTreeSet<u32> = agg.resets.keys().map(|k| k.netns).collect();
    nets.extend(s.namespaces.iter().map(|n| n.netns));
    // Host-wide sysctls exist only in the initial namespace: whichever namespace has them.
    let global = |netns: u32, name: &str| -> Governor {
        let value = std::iter::once(netns)
            .chain(std::iter::once(input.home_netns))
            .chain(input.namespaces.iter().map(|n| n.inode))
            .find_map(|ns| sysctls_of(ns).get(name).cloned());
        Governor {
            name: name.to_string(),
            value,
        }
    };
    let mut out = Vec::new();
    for netns in nets {
        let ns = s.namespaces.iter().find(|n| n.netns == netns);
        // Where the kernel gives no reason (older kernels) its counters stand in for the
        // events, but they count the whole namespace: not under a socket filter.
        let counter = |name: &str| {
            if input.sockets_filtered {
                return 0;
            }
            ns.and_then(|n| n.counters.get(name)).copied().unwrap_or(0)
        };
        let groups: Vec<(&ResetKey, &ResetStats)> = {
            let mut g: Vec<_> = agg
                .resets
                .iter()
                .filter(|(k, _)| k.netns == netns)
                .collect();
            g.sort_by_key(|(k, _)| **k);
            g
        };
        // Count, first owner and examples of the groups `pick` selects.
        let gather = |pick: &dyn Fn(&ResetKey) -> bool| {
            let mut n = 0;
            let mut owner = None;
            let mut ex: Vec<String> = Vec::new();
            for (_, r) in groups.iter().filter(|(k, _)| pick(k)) {
                n += r.count;
                owner = owner.or(r.owner);
                for (l, rm) in &r.examples {
                    if ex.len() < 5 {
                        ex.push(tuple(l, rm));
                    }
                }
            }
            (n, owner, ex)
        };
        let sc = sysctls_of(netns);

        let (ev, owner, examples) = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_CLOSE"]));
        let n = counter("TcpExt:TCPAbortOnClose").max(ev);
        if n > 0 {
            out.push(Finding {
                id: "reset_on_close",
                severity: "warning",
                netns,
                what: format!("{n} connection(s) reset by close() with received data still unread"),
                cause: "the application closed a socket before reading what the peer had sent: the kernel answers with RST instead of FIN (RFC 2525), and the peer gets ECONNRESET, often losing its last response".into(),
                governed_by: vec![code(
                    "the application: read to EOF (or shutdown(SHUT_WR) and drain) before close()",
                )],
                owner: owner.as_ref().map(OwnerView::from),
                count: n,
                examples,
            });
        }
        // A zero-linger close resets with the generic TCP_STATE reason: examples, not a count.
        let (_, owner, examples) =
            gather(&|k| k.sent && (named(k, &["TCP_ABORT_ON_DATA"]) || (named(k, &["TCP_STATE"]))));
        let specific = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_DATA"])).0;
        let n = counter("TcpExt:TCPAbortOnData").max(specific);
        if n > 0 {
            out.push(Finding {
                id: "abortive_close",
                severity: "info",
                netns,
                what: format!("{n} connection(s) aborted with RST: closed with a zero SO_LINGER, or data arrived after close()"),
                cause: "an abortive close by design (SO_LINGER on with a 0 s timeout skips FIN and TIME_WAIT), or a peer that kept sending after this side had closed".into(),
                governed_by: vec![code("the application: SO_LINGER {on, 0}, or its shutdown order")],
                owner: owner.as_ref().map(OwnerView::from),
                count: n,
                examples,
            });
        }
        let (ev, owner, examples) = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_MEMORY"]));
        let n = counter("TcpExt:TCPAbortOnMemory").max(ev);
        if n > 0 {
            let orphans = ns.map_or(0, |n| n.sockstat_orphan);
            out.push(Finding {
                id: "reset_on_memory",
                severity: "critical",
                netns,
                what: format!("{n} connection(s) reset by the kernel for lack of memory ({orphans} orphaned sockets now)"),
                cause: "orphaned sockets (closed, still sending) beyond net.ipv4.tcp_max_orphans, or TCP memory past its limit in net.ipv4.tcp_mem: the kernel logs \"too many orphaned sockets\" or \"out of memory -- consider tuning tcp_mem\" and resets".into(),
                governed_by: vec![
                    global(netns, "net.ipv4.tcp_max_orphans"),
                    global(netns, "net.ipv4.tcp_mem"),
                    gov(sc, "net.ipv4.tcp_orphan_retries"),
                ],
                owner: owner.as_ref().map(OwnerView::from),
                count: n,
                examples,
            });
        }
        let (n, owner, examples) = gather(&|k| !k.sent && k.state == Some(TcpState::SynSent));
        if n > 0 {
            out.push(Finding {
                id: "connect_refused",
                severity: "warning",
                netns,
                what: format!("{n} connection attempt(s) refused: the SYN was answered with RST"),
                cause: "nothing listens on the destination port (the service is down, not started yet, or the port is wrong), or a firewall rejects with tcp-reset".into(),
                governed_by: vec![code("a listener at the destination")],
                owner: owner.as_ref().map(OwnerView::from),
                count: n,
                examples,
            });
        }
        let (n, owner, examples) = gather(&|k| {
            !k.sent
                && !matches!(
                    k.state,
                    Some(TcpState::SynSent | TcpState::TimeWait | TcpState::Close) | None
                )
        });
        if n > 0 {
            out.push(Finding {
                id: "peer_resets",
                severity: "info",
                netns,
                what: format!("{n} connection(s) reset by the peer (ECONNRESET)"),
                cause: "the peer aborted: its application closed with unread data or a zero SO_LINGER, or it restarted; or a firewall, NAT or load balancer on the path dropped the connection's state after an idle timeout".into(),
                governed_by: vec![
                    code("the peer's application"),
                    gov(sc, "net.ipv4.tcp_keepalive_time"),
                ],
                owner: owner.as_ref().map(OwnerView::from),
                count: n,
                examples,
            });
        }
        let (n, _, examples) = gather(&|k| {
            k.sent
                && (named(k, &["NO_SOCKET"])
                    || (k.no_socket && k.reason.and_then(|r| input.reasons.name(r)).is_none()))
        });
        if n > 0 {
            out.push(Finding {
                id: "reset_no_socket",
                severity: "info",
                netns,
                what: format!("{n} segment(s) answered with RST: no socket here for them"),
                cause: "nothing listens on the port (connection refused), or the connection is already gone on this side and its peer still sends".into(),
                governed_by: vec![code("a listener on that port")],
                owner: None,
                count: n,
                examples,
            });
        }
    }
    out
}

fn tuple(local: &SocketAddr, remote: &SocketAddr) -> String {
    format!("{local} -> {remote}")
}

pub fn socket_view(t: &Timeline, now: u64) -> SocketView {
    let names = ["syn", "synack", "data", "fin"];
    SocketView {
        cookie: t.cookie,
        netns: t.netns,
        family: t.family.name(),
        local: t.local.to_string(),
        remote: t.remote.to_string(),
        owner: t.owner.as_ref().map(OwnerView::from),
        state: t.state.map(TcpState::name),
        state_for_ns: now.saturating_sub(t.state_since_ns),
        closed_first: t.closed_first,
        transitions: t
            .transitions
            .iter()
            .map(|x| TransitionView {
                ts_ns: x.ts_ns,
                old: x.old.name(),
                new: x.new.name(),
                prev_state_ns: x.prev_state_ns,
            })
            .collect(),
        retransmits: names
            .iter()
            .zip(t.retrans)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (*k, n))
            .collect(),
        retransmit_intervals_ns: t
            .last_retrans
            .iter()
            .filter_map(|r| r.interval_ns)
            .collect(),
        resets_sent: t.resets_sent,
        resets_received: t.resets_received,
        errors: t.errors.iter().map(|e| errno_name(*e)).collect(),
        time_wait: t.timewait.map(|p| TwView {
            substate: p.substate.map(TcpState::name),
            entered_ns: p.enter_ns,
            exit: p.exit.map(|(_, r)| r.name()),
        }),
    }
}

fn notable(t: &Timeline) -> bool {
    t.retrans.iter().any(|n| *n > 0)
        || t.resets_sent + t.resets_received > 0
        || t.errors.total > 0
        || matches!(
            t.state,
            Some(TcpState::CloseWait | TcpState::SynSent | TcpState::FinWait2 | TcpState::LastAck)
        )
}

/// Builds the snapshot.
pub fn build(agg: &Aggregator, input: &Input<'_>) -> Snapshot {
    let now = input.now_ns;
    let mut s = Snapshot {
        version: 1,
        ts_ns: now,
        window_s: input.window_ns as f64 / 1e9,
        host: input.host.clone(),
        kernel: input.kernel.clone(),
        hooks: input.hooks.clone(),
        ..Snapshot::default()
    };
    for st in TcpState::ALL {
        if !matches!(st, TcpState::Close | TcpState::NewSynRecv) {
            s.states.insert(st.name(), 0);
        }
    }
    let inv: &[SockRec] = input.inventory.unwrap_or(&[]);
    if input.inventory.is_some() {
        for r in inv {
            *s.states.entry(ss_state(r).name()).or_insert(0) += 1;
        }
    } else {
        // From the events: every timeline that has not ended, by its current state, and the
        // timewait registry by substate.
        for t in live_timelines(agg) {
            if let Some(st) = t.state {
                *s.states.entry(st.name()).or_insert(0) += 1;
            }
        }
        for e in agg.timewait.values() {
            *s.states
                .entry(e.substate.unwrap_or(TcpState::TimeWait).name())
                .or_insert(0) += 1;
        }
        *s.states.entry(TcpState::Listen.name()).or_insert(0) += agg.listener_count() as u64;
    }
    s.owners = owner_states(agg, input.inventory);

    // Namespaces: the top-level counters and sysctls are the watched one's when only one is
    // watched, else tcpwatch's own.
    let main_ns = if input.namespaces.len() == 1 {
        input.namespaces[0].inode
    } else {
        input.home_netns
    };
    for n in &input.namespaces {
        let d = n.counters_now.delta(&n.counters_start);
        let counters: BTreeMap<String, u64> =
            d.0.into_iter()
                .filter(|(k, v)| *v > 0 && (k.starts_with("TcpExt:") || k.starts_with("Tcp:")))
                .collect();
        if n.inode == main_ns {
            s.counters = counters.clone();
            s.sysctls = n.sysctls.clone();
        }
        s.namespaces.push(NamespaceView {
            netns: n.inode,
            sockstat_tw: n.sockstat.tw,
            sockstat_inuse: n.sockstat.inuse,
            sockstat_orphan: n.sockstat.orphan,
            counters,
            sysctls: n.sysctls.clone(),
        });
    }
    let sysctls_of = |netns: u32| -> &BTreeMap<String, String> {
        static EMPTY: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
        input
            .namespaces
            .iter()
            .find(|n| n.inode == netns)
            .map_or_else(|| EMPTY.get_or_init(BTreeMap::new), |n| &n.sysctls)
    };

    // Listeners: the inventory's now, the aggregator's window.
    let mut shown: FxHashSet<(u32, SocketAddr, u64)> = FxHashSet::default();
    for r in inv.iter().filter(|r| r.state == TcpState::Listen) {
        let a = agg.listener_stats(r.netns, r.local, r.cookie);
        shown.extend(a.map(|a| (a.netns, a.local, a.cookie)));
        s.listeners.push(ListenerView {
            netns: r.netns,
            addr: r.local.ip().to_string(),
            port: r.local.port(),
            cookie: r.cookie,
            owner: r
                .owner
                .as_ref()
                .or(a.and_then(|a| a.owner.as_ref()))
                .map(OwnerView::from),
            accept_queue: QueueView {
                now: r.accept_queue,
                max: r.accept_max,
                peak: a.map_or(0, |a| a.accept_peak).max(r.accept_queue),
            },
            syn_queue: QueueView {
                now: r.syn_queue,
                max: r.accept_max,
                peak: a.map_or(0, |a| a.syn_peak).max(r.syn_queue),
            },
            drops: r.drops as u64,
            overflows: a.map_or_else(OverflowsView::default, |a| OverflowsView {
                accept: a.overflow_accept,
                syn: a.overflow_syn,
                syncookies: a.syncookies,
                final_ack_packets: a.overflow_packets,
            }),
            synack_retransmits: a.map_or(0, |a| a.synack_retransmits),
        });
    }
    // Without an inventory (a replay or a check run), the listeners the window's events and
    // samples saw, with their last sampled queues; with one, also those that overflowed or
    // retransmitted in the window and are gone now (a restarted server's old socket).
    let busy = |a: &ListenerStats| {
        a.overflow_accept
            + a.overflow_syn
            + a.syncookies
            + a.overflow_packets
            + a.synack_retransmits
            > 0
    };
    for a in agg.listeners() {
        if input.inventory.is_none() || (busy(a) && !shown.contains(&(a.netns, a.local, a.cookie)))
        {
            s.listeners.push(ListenerView {
                netns: a.netns,
                addr: a.local.ip().to_string(),
                port: a.local.port(),
                cookie: a.cookie,
                owner: a.owner.as_ref().map(OwnerView::from),
                accept_queue: QueueView {
                    now: a.accept_now,
                    max: a.accept_max,
                    peak: a.accept_peak,
                },
                syn_queue: QueueView {
                    now: a.syn_now,
                    max: a.accept_max,
                    peak: a.syn_peak,
                },
                drops: a.drops,
                overflows: OverflowsView {
                    accept: a.overflow_accept,
                    syn: a.overflow_syn,
                    syncookies: a.syncookies,
                    final_ack_packets: a.overflow_packets,
                },
                synack_retransmits: a.synack_retransmits,
            });
        }
    }
    s.listeners
        .sort_by(|a, b| (a.netns, a.port, &a.addr).cmp(&(b.netns, b.port, &b.addr)));

    // TIME_WAIT from the inventory (exact), by local port and remote endpoint.
    let tws: Vec<&SockRec> = inv
        .iter()
        .filter(|r| r.state == TcpState::TimeWait)
        .collect();
    s.time_wait.total = tws.len() as u64;
    s.time_wait.fin_wait2 = tws
        .iter()
        .filter(|r| r.substate == Some(TcpState::FinWait2))
        .count() as u64;
    let mut by_port: BTreeMap<(u32, u16), u64> = BTreeMap::new();
    let mut by_remote: BTreeMap<(u32, IpAddr, u16), u64> = BTreeMap::new();
    for r in &tws {
        *by_port.entry((r.netns, r.local.port())).or_insert(0) += 1;
        *by_remote
            .entry((r.netns, r.remote.ip(), r.remote.port()))
            .or_insert(0) += 1;
    }
    let mut ports: Vec<PortCount> = by_port
        .into_iter()
        .map(|((netns, port), count)| PortCount { netns, port, count })
        .collect();
    ports.sort_by(|a, b| b.count.cmp(&a.count).then(a.port.cmp(&b.port)));
    ports.truncate(TOP);
    s.time_wait.by_local_port = ports;
    let mut remotes: Vec<RemoteCount> = by_remote
        .into_iter()
        .map(|((netns, ip, port), count)| RemoteCount {
            netns,
            addr: ip.to_string(),
            port,
            count,
        })
        .collect();
    remotes.sort_by_key(|r| std::cmp::Reverse(r.count));
    remotes.truncate(TOP);
    s.time_wait.by_remote = remotes;
    let (by_owner, unknown) = time_wait_owners(agg, inv, &tws);
    s.time_wait.by_owner = by_owner;
    s.time_wait.owner_unknown = unknown;
    for n in &input.namespaces {
        // An instant snapshot follows no events: what it tracks is what it just listed.
        let tracked = if input.window_ns == 0 {
            tws.iter().filter(|r| r.netns == n.inode).count() as u64
        } else {
            agg.timewait.values().filter(|e| e.netns == n.inode).count() as u64
        };
        s.time_wait.drift.push(Drift {
            netns: n.inode,
            sockstat: n.sockstat.tw,
            tracked,
        });
    }
    s.time_wait.entered = agg.totals.tw_enter;
    for (i, r) in [
        TwExitReason::Expired,
        TwExitReason::Reused,
        TwExitReason::Killed,
    ]
    .into_iter()
    .enumerate()
    {
        s.time_wait
            .exited
            .insert(r.name().to_string(), agg.totals.tw_exit[i]);
    }

    // Port headroom: connections from one local address to one remote endpoint each hold a
    // local port, TIME_WAIT ones included.
    // Only client-side sockets draw from the ephemeral range: a socket whose local port is a
    // listener's is the server side.
    let listening: std::collections::HashSet<(u32, u16)> = inv
        .iter()
        .filter(|r| r.state == TcpState::Listen)
        .map(|r| (r.netns, r.local.port()))
        .collect();
    let mut use_by: BTreeMap<(u32, IpAddr, IpAddr, u16), (u64, u64)> = BTreeMap::new();
    for r in inv
        .iter()
        .filter(|r| !matches!(r.state, TcpState::Listen | TcpState::NewSynRecv))
    {
        if r.remote.port() == 0 || listening.contains(&(r.netns, r.local.port())) {
            continue;
        }
        let e = use_by
            .entry((r.netns, r.local.ip(), r.remote.ip(), r.remote.port()))
            .or_insert((0, 0));
        e.0 += 1;
        if r.state == TcpState::TimeWait {
            e.1 += 1;
        }
    }
    for ((netns, laddr, raddr, rport), (in_use, tw)) in use_by {
        let Some((lo, hi)) = crate::model::system::port_range(sysctls_of(netns)) else {
            continue;
        };
        let range = (hi.saturating_sub(lo) as u64) + 1;
        if in_use < 16 {
            continue;
        }
        s.time_wait.port_headroom.push(Headroom {
            netns,
            local_addr: laddr.to_string(),
            remote_addr: raddr.to_string(),
            remote_port: rport,
            in_use,
            time_wait: tw,
            range,
            free: range.saturating_sub(in_use),
        });
    }
    s.time_wait
        .port_headroom
        .sort_by_key(|h| std::cmp::Reverse(h.in_use));
    s.time_wait.port_headroom.truncate(TOP);

    // Totals from events.
    for (i, k) in ["syn", "synack", "data", "fin"].iter().enumerate() {
        s.retransmits.insert(k, agg.totals.retrans[i]);
    }
    s.retransmitted_segments = agg.totals.retrans_segs;
    s.retransmits_not_sent = agg.totals.retrans_not_sent;
    s.resets.insert("sent", agg.totals.resets_sent);
    s.resets.insert("received", agg.totals.resets_received);
    for (e, n) in &agg.totals.errors {
        *s.errors.entry(errno_name(*e)).or_insert(0) += n;
    }
    s.histograms = Histograms {
        handshake_us: (&agg.handshake_us).into(),
        lifetime_ms: (&agg.lifetime_ms).into(),
    };
    let mut notable_socks: Vec<&Timeline> = agg.sockets().filter(|t| notable(t)).collect();
    notable_socks.sort_by_key(|t| std::cmp::Reverse(t.last_ns));
    s.sockets = notable_socks
        .iter()
        .take(200)
        .map(|t| socket_view(t, now))
        .collect();
    s.loss = LossView {
        kernel_dropped: input.loss.kernel_dropped,
        kernel_dropped_by_type: input.loss.kernel_dropped_by_type.nonzero().collect(),
        kernel_skipped: input.loss.kernel_skipped,
        channel_dropped: input.loss.channel_dropped,
        decode_errors: input.loss.decode_errors
            + input
                .namespaces
                .iter()
                .map(|n| n.decode_errors)
                .sum::<u64>(),
        timelines_evicted: agg.totals.evicted,
    };
    s.findings = findings(agg, input, &s, &sysctls_of);
    s
}

/// RTO timeouts in a row at the end of a socket's retransmits, from their intervals: each
/// about twice the one before (the exponential backoff), the first at least the 200 ms
/// minimum RTO. Fast retransmits come closer together and break the run.
fn rto_backoff_run(t: &Timeline) -> u32 {
    let iv: Vec<u64> = t
        .last_retrans
        .iter()
        .filter(|r| matches!(r.kind, Some(RetransmitKind::Data | RetransmitKind::Fin)))
        .map(|r| r.interval_ns.unwrap_or(0))
        .collect();
    let mut run = 0;
    for w in iv.windows(2).rev() {
        let (a, b) = (w[0], w[1]);
        if a < 150_000_000 || b * 10 < a * 15 || b * 10 > a * 26 {
            break;
        }
        run += 1;
    }
    // Each doubling pair is one more timeout; the first interval also ended one.
    if run == 0 { 0 } else { run + 2 }
}

/// CLOSE_WAIT sockets of one owner: the sockets, the oldest idle time, the owner.
type Leak<'a> = (Vec<&'a SockRec>, u64, Option<Owner>);

fn findings<'a>(
    agg: &Aggregator,
    input: &Input<'_>,
    s: &Snapshot,
    sysctls_of: &dyn Fn(u32) -> &'a BTreeMap<String, String>,
) -> Vec<Finding> {
    let th = input.thresholds;
    let now = input.now_ns;
    let inv: &[SockRec] = input.inventory.unwrap_or(&[]);
    let mut out = Vec::new();

    // CLOSE_WAIT leaks, by owner: idle since the peer's FIN (the inventory's last-packet time,
    // or the transition if it was seen).
    let mut cw: BTreeMap<(u32, Option<u32>), Leak<'_>> = BTreeMap::new();
    for r in inv.iter().filter(|r| r.state == TcpState::CloseWait) {
        let seen = agg
            .sockets()
            .find(|t| t.cookie == r.cookie && t.cookie != 0)
            .map(|t| t.state_since_ns);
        let since = seen.or((r.last_pkt_ns != 0).then_some(r.last_pkt_ns));
        let Some(since) = since else { continue };
        let age = now.saturating_sub(since);
        if age < th.close_wait_secs * 1_000_000_000 {
            continue;
        }
        let e = cw
            .entry((r.netns, r.owner.map(|o| o.pid)))
            .or_insert((Vec::new(), 0, r.owner));
        e.0.push(r);
        e.1 = e.1.max(age);
    }
    for ((netns, _), (socks, oldest, owner)) in cw {
        let who = owner.map_or("an unknown process".to_string(), |o| {
            format!("{} (pid {})", o.comm.to_string_lossy(), o.pid)
        });
        out.push(Finding {
            id: "close_wait_leak",
            severity: "warning",
            netns,
            what: format!(
                "{} socket(s) in CLOSE_WAIT owned by {who}, the oldest idle for {} s",
                socks.len(),
                oldest / 1_000_000_000
            ),
            cause: "the peer closed its side and the application never called close() on these sockets: a descriptor leak in the owner's code".into(),
            governed_by: vec![code("application code: close() after read() returns 0"), gov(sysctls_of(netns), "net.ipv4.tcp_keepalive_time")],
            owner: owner.as_ref().map(OwnerView::from),
            count: socks.len() as u64,
            examples: socks.iter().take(5).map(|r| tuple(&r.local, &r.remote)).collect(),
        });
    }

    // Orphaned FIN_WAIT2: timewait sockets waiting for the peer's FIN.
    let mut fw2: BTreeMap<u32, u64> = BTreeMap::new();
    for r in inv
        .iter()
        .filter(|r| r.state == TcpState::TimeWait && r.substate == Some(TcpState::FinWait2))
    {
        *fw2.entry(r.netns).or_insert(0) += 1;
    }
    for (netns, n) in fw2 {
        if n < 16 {
            continue;
        }
        out.push(Finding {
            id: "orphaned_fin_wait2",
            severity: "info",
            netns,
            what: format!("{n} closed socket(s) waiting in FIN_WAIT2 for the peer's FIN"),
            cause: "this side closed, the peer acknowledged but has not closed its end yet".into(),
            governed_by: vec![gov(sysctls_of(netns), "net.ipv4.tcp_fin_timeout")],
            owner: None,
            count: n,
            examples: vec![],
        });
    }

    // SYN_SENT with SYN retransmits: the peer does not answer.
    let stuck: Vec<&Timeline> = agg
        .sockets()
        .filter(|t| t.retransmits(RetransmitKind::Syn) > 0 && t.state == Some(TcpState::SynSent))
        .collect();
    let stuck_inv: Vec<&SockRec> = inv
        .iter()
        .filter(|r| r.state == TcpState::SynSent && r.retransmits > 0)
        .collect();
    let n = stuck.len().max(stuck_inv.len());
    if n > 0 {
        let netns = stuck
            .first()
            .map(|t| t.netns)
            .or(stuck_inv.first().map(|r| r.netns))
            .unwrap_or(0);
        let sc = sysctls_of(netns);
        let mut ex: Vec<String> = stuck
            .iter()
            .take(5)
            .map(|t| tuple(&t.local, &t.remote))
            .collect();
        if ex.is_empty() {
            ex = stuck_inv
                .iter()
                .take(5)
                .map(|r| tuple(&r.local, &r.remote))
                .collect();
        }
        // The peer may be a listener of this very namespace that is refusing SYNs: say so
        // rather than leave the operator to suspect the network.
        let remotes: Vec<(u32, SocketAddr)> = stuck
            .iter()
            .map(|t| (t.netns, t.remote))
            .chain(stuck_inv.iter().map(|r| (r.netns, r.remote)))
            .collect();
        let refusing = s.listeners.iter().find(|l| {
            let busy = l.accept_queue.is_full() || l.overflows.accept + l.overflows.syn > 0;
            busy && remotes.iter().any(|(ns, r)| {
                *ns == l.netns
                    && r.port() == l.port
                    && (l.addr == r.ip().to_string() || l.addr == "0.0.0.0" || l.addr == "::")
            })
        });
        let cause = match refusing {
            Some(l) => format!(
                "the peer is listener {} in this namespace and its queues are full ({} of {} queued for accept()): the kernel drops the SYNs it cannot queue and the clients retry",
                endpoint(&l.addr, l.port),
                l.accept_queue.now,
                l.accept_queue.max
            ),
            None => "no SYN-ACK comes back: the peer or a firewall drops the SYN, the port is filtered, or the listener's queues are full".into(),
        };
        out.push(Finding {
            id: "syn_sent_stuck",
            severity: "warning",
            netns,
            what: format!("{n} connection attempt(s) retransmitting their SYN"),
            cause,
            governed_by: vec![
                gov(sc, "net.ipv4.tcp_syn_retries"),
                gov(sc, "net.ipv4.tcp_syn_linear_timeouts"),
            ],
            owner: stuck
                .first()
                .and_then(|t| t.owner.as_ref())
                .map(OwnerView::from),
            count: n as u64,
            examples: ex,
        });
    }

    // Listener overflows.
    let final_ack_hook = input
        .hooks
        .iter()
        .any(|h| h.signal == "accept overflow at final ACK" && h.hook.is_some());
    for l in &s.listeners {
        // The kernel refuses new handshakes while the accept queue is full.
        let full_now = l.accept_queue.is_full();
        if l.overflows.accept + l.overflows.syn + l.overflows.syncookies == 0 && !full_now {
            continue;
        }
        let sc = sysctls_of(l.netns);
        // One member of an SO_REUSEPORT group can overflow while the others keep up (a
        // stuck worker): say which socket of how many, the owner names it.
        let group = s
            .listeners
            .iter()
            .filter(|o| (o.netns, o.port, &o.addr) == (l.netns, l.port, &l.addr))
            .count();
        let name = if group > 1 {
            format!(
                "{} (one of {group} SO_REUSEPORT sockets)",
                endpoint(&l.addr, l.port)
            )
        } else {
            endpoint(&l.addr, l.port)
        };
        let somaxconn: Option<u32> = sc.get("net.core.somaxconn").and_then(|v| v.parse().ok());
        if l.overflows.accept > 0 || full_now {
            let limit = match somaxconn {
                Some(m) if l.accept_queue.max >= m => format!(
                    "the accept queue limit {} is net.core.somaxconn ({m}), which capped the application's listen() backlog",
                    l.accept_queue.max
                ),
                Some(m) => format!(
                    "the accept queue limit {} is the application's listen() backlog (net.core.somaxconn is {m}); the kernel holds limit + 1",
                    l.accept_queue.max
                ),
                None => format!("the accept queue limit is {}", l.accept_queue.max),
            };
            let governed_by = vec![
                code("listen() backlog in the application"),
                gov(sc, "net.core.somaxconn"),
                gov(sc, "net.ipv4.tcp_abort_on_overflow"),
            ];
            // What the kernel does depends on which packet met the full queue: a SYN is
            // always dropped (the client retries it); a final ACK is dropped or reset.
            let reaction = match sc.get("net.ipv4.tcp_abort_on_overflow").map(String::as_str) {
                Some("1") => {
                    "a final ACK that finds it full is answered with a RST (tcp_abort_on_overflow = 1): the client's connect() has succeeded and its first read or write fails with ECONNRESET"
                }
                Some(_) => {
                    "a final ACK that finds it full is dropped (tcp_abort_on_overflow = 0): the client believes it is connected while the server retransmits its SYN-ACK until the queue has room"
                }
                None => {
                    "a final ACK that finds it full is dropped, or reset where tcp_abort_on_overflow = 1"
                }
            };
            let cause = format!(
                "the application does not call accept() fast enough; {limit}. A SYN that finds the queue full is dropped and the client retransmits it; {reaction}"
            );
            if l.overflows.accept > 0 {
                // Final ACKs are seen one by one where the kernel has the hook; the rest of
                // the listener's drops are then SYNs.
                let split = if final_ack_hook {
                    let acks = l.overflows.final_ack_packets.min(l.overflows.accept);
                    format!(
                        ": {} SYN(s), {acks} final ACK(s)",
                        l.overflows.accept - acks
                    )
                } else {
                    String::new()
                };
                out.push(Finding {
                    id: "accept_queue_overflow",
                    severity: "critical",
                    netns: l.netns,
                    what: format!(
                        "listener {name} dropped {} handshake packet(s) with its accept queue full (peak {}/{}){split}",
                        l.overflows.accept, l.accept_queue.peak, l.accept_queue.max
                    ),
                    cause,
                    governed_by,
                    owner: l.owner.clone(),
                    count: l.overflows.accept,
                    examples: vec![endpoint(&l.addr, l.port)],
                });
            } else {
                // Nothing dropped while watching (or nothing watched: a plain snapshot), but
                // the queue is full this instant and the socket's own drop counter says
                // whether it has been refusing connections before.
                let before = if l.drops > 0 {
                    format!(
                        "; it has dropped {} packet(s) since it started listening",
                        l.drops
                    )
                } else {
                    String::new()
                };
                out.push(Finding {
                    id: "accept_queue_full",
                    severity: if l.drops > 0 { "critical" } else { "warning" },
                    netns: l.netns,
                    what: format!(
                        "listener {name} has a full accept queue now ({}/{}): new SYNs are dropped until it accepts{before}",
                        l.accept_queue.now, l.accept_queue.max
                    ),
                    cause,
                    governed_by,
                    owner: l.owner.clone(),
                    count: u64::from(l.accept_queue.now),
                    examples: vec![endpoint(&l.addr, l.port)],
                });
            }
        }
        if l.overflows.syn > 0 || l.overflows.syncookies > 0 {
            let (what, sev) = if l.overflows.syn > 0 {
                (
                    format!(
                        "listener {name} dropped {} SYN(s): its SYN queue was full (peak {}/{})",
                        l.overflows.syn, l.syn_queue.peak, l.syn_queue.max
                    ),
                    "critical",
                )
            } else {
                (
                    format!(
                        "listener {name} answered {} SYN(s) with syncookies: its SYN queue was full",
                        l.overflows.syncookies
                    ),
                    "warning",
                )
            };
            out.push(Finding {
                id: "syn_queue_overflow",
                severity: sev,
                netns: l.netns,
                what,
                cause: "handshakes do not complete (final ACKs lost, a SYN flood, or slow clients) and requests pile up in the SYN queue".into(),
                governed_by: vec![gov(sc, "net.ipv4.tcp_syncookies"), gov(sc, "net.ipv4.tcp_max_syn_backlog"), gov(sc, "net.core.somaxconn")],
                owner: l.owner.clone(),
                count: l.overflows.syn + l.overflows.syncookies,
                examples: vec![endpoint(&l.addr, l.port)],
            });
        }
    }

    // TIME_WAIT pressure: ephemeral ports toward one destination, and bucket overflow.
    for h in &s.time_wait.port_headroom {
        if (h.in_use as f64) < th.port_pressure * h.range as f64 {
            continue;
        }
        let sc = sysctls_of(h.netns);
        out.push(Finding {
            id: "ephemeral_port_pressure",
            severity: if h.free < h.range / 10 { "critical" } else { "warning" },
            netns: h.netns,
            what: format!(
                "{} of {} ephemeral ports from {} to {} in use ({} in TIME_WAIT)",
                h.in_use,
                h.range,
                h.local_addr,
                endpoint(&h.remote_addr, h.remote_port),
                h.time_wait
            ),
            cause: "many short connections to one destination, each leaving a TIME_WAIT socket on the side that closed first".into(),
            governed_by: vec![
                gov(sc, "net.ipv4.ip_local_port_range"),
                Governor { name: "net.ipv4.tcp_tw_reuse (helps connecting clients only)".into(), value: sc.get("net.ipv4.tcp_tw_reuse").cloned() },
                gov(sc, "net.ipv4.tcp_max_tw_buckets"),
            ],
            owner: None,
            count: h.in_use,
            examples: vec![],
        });
    }
    for n in &s.namespaces {
        let over = n
            .counters
            .get("TcpExt:TCPTimeWaitOverflow")
            .copied()
            .unwrap_or(0);
        if over > 0 {
            let sc = sysctls_of(n.netns);
            out.push(Finding {
                id: "time_wait_bucket_overflow",
                severity: "warning",
                netns: n.netns,
                what: format!("{over} socket(s) closed without TIME_WAIT: the timewait table was full"),
                cause: "more TIME_WAIT sockets than net.ipv4.tcp_max_tw_buckets allows; late segments of those connections can now reach new ones".into(),
                governed_by: vec![gov(sc, "net.ipv4.tcp_max_tw_buckets")],
                owner: None,
                count: over,
                examples: vec![],
            });
        }
    }

    // Retransmit storms: RTO timeouts in a row with no ACK making progress, what
    // tcp_retries2 caps before the kernel aborts. Live sockets show the kernel's own count of
    // them (icsk_retransmits, zeroed by progress); ended ones abort with ETIMEDOUT; without an
    // inventory (a replay) a run of doubling intervals between retransmits shows it.
    let data_rt =
        |t: &Timeline| t.retransmits(RetransmitKind::Data) + t.retransmits(RetransmitKind::Fin);
    let mut storm: BTreeMap<u64, (u32, SocketAddr, SocketAddr, Option<Owner>)> = BTreeMap::new();
    for r in inv.iter().filter(|r| {
        !matches!(
            r.state,
            TcpState::SynSent | TcpState::SynRecv | TcpState::Listen | TcpState::TimeWait
        ) && u32::from(r.retransmits) >= th.retransmit_storm
    }) {
        storm.insert(r.cookie, (r.netns, r.local, r.remote, r.owner));
    }
    let mut aborted = 0;
    for t in agg.sockets().filter(|t| data_rt(t) > 0) {
        let gone = t.errors.iter().any(|e| *e == libc::ETIMEDOUT);
        let backoff = input.inventory.is_none()
            && t.ended_ns().is_none()
            && rto_backoff_run(t) >= th.retransmit_storm;
        if gone {
            aborted += 1;
        }
        if gone || backoff {
            storm.insert(t.cookie, (t.netns, t.local, t.remote, t.owner));
        }
    }
    if let Some((netns, _, _, owner)) = storm.values().next().copied() {
        let sc = sysctls_of(netns);
        out.push(Finding {
            id: "retransmit_storm",
            severity: if aborted > 0 { "critical" } else { "warning" },
            netns,
            what: format!(
                "{} connection(s) in retransmission timeouts without progress ({aborted} aborted with ETIMEDOUT)",
                storm.len()
            ),
            cause: "nothing this side sends is acknowledged: the peer is gone or unreachable, or the path drops everything; the RTO doubles at each retry".into(),
            governed_by: vec![gov(sc, "net.ipv4.tcp_retries2")],
            owner: owner.as_ref().map(OwnerView::from),
            count: storm.len() as u64,
            examples: storm
                .values()
                .take(5)
                .map(|(_, l, r, _)| tuple(l, r))
                .collect(),
        });
    }
    // Loss the connections recovered from: worth knowing, not an outage.
    let lossy: Vec<&Timeline> = agg
        .sockets()
        .filter(|t| {
            t.retransmits(RetransmitKind::Data) >= th.retransmit_storm
                && !storm.contains_key(&t.cookie)
        })
        .collect();
    if let Some(first) = lossy.first() {
        out.push(Finding {
            id: "data_retransmits",
            severity: "info",
            netns: first.netns,
            what: format!(
                "{} connection(s) retransmitted data and went on ({} retransmits)",
                lossy.len(),
                lossy.iter().map(|t| u64::from(data_rt(t))).sum::<u64>()
            ),
            cause: "segments were lost on the path or in a queue (congestion, a lossy link, a policer) and resent".into(),
            governed_by: vec![gov(sysctls_of(first.netns), "net.ipv4.tcp_congestion_control")],
            owner: first.owner.as_ref().map(OwnerView::from),
            count: lossy.len() as u64,
            examples: lossy.iter().take(5).map(|t| tuple(&t.local, &t.remote)).collect(),
        });
    }
    let ka: Vec<&Timeline> = agg
        .sockets()
        .filter(|t| {
            t.errors.iter().any(|e| *e == libc::ETIMEDOUT)
                && t.retransmits(RetransmitKind::Data) == 0
                && t.retransmits(RetransmitKind::Syn) == 0
        })
        .collect();
    if !ka.is_empty() {
        let netns = ka[0].netns;
        let sc = sysctls_of(netns);
        out.push(Finding {
            id: "keepalive_abort",
            severity: "warning",
            netns,
            what: format!("{} idle connection(s) aborted with ETIMEDOUT and no retransmits: keepalive probes went unanswered", ka.len()),
            cause: "the peer vanished (host down, NAT or firewall state expired) while the connection was idle".into(),
            governed_by: vec![
                gov(sc, "net.ipv4.tcp_keepalive_time"),
                gov(sc, "net.ipv4.tcp_keepalive_intvl"),
                gov(sc, "net.ipv4.tcp_keepalive_probes"),
                code("SO_KEEPALIVE / TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT in the application"),
            ],
            owner: ka[0].owner.as_ref().map(OwnerView::from),
            count: ka.len() as u64,
            examples: ka.iter().take(5).map(|t| tuple(&t.local, &t.remote)).collect(),
        });
    }

    out.extend(reset_findings(agg, input, s, sysctls_of));

    let lost = input.loss.total();
    if lost > 0 {
        out.push(Finding {
            id: "events_lost",
            severity: "warning",
            netns: 0,
            what: format!("{lost} event(s) were lost: counts from events are lower bounds"),
            cause: "the ring buffers filled faster than tcpwatch drained them".into(),
            governed_by: vec![code("tcpwatch --ring-mib")],
            owner: None,
            count: lost,
            examples: vec![],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Config as AggConfig;

    fn tw(netns: u32, port: u16) -> SockRec {
        SockRec {
            skaddr: u64::from(port),
            cookie: u64::from(port),
            substate: Some(TcpState::TimeWait),
            ..crate::model::system::test_rec(
                TcpState::TimeWait,
                netns,
                SocketAddr::from(([127, 0, 0, 1], port)),
                SocketAddr::from(([127, 0, 0, 1], 80)),
            )
        }
    }

    fn ns(inode: u32, tw: u64) -> NsInput {
        NsInput {
            inode,
            counters_now: Counters::default(),
            counters_start: Counters::default(),
            sysctls: BTreeMap::new(),
            sockstat: Sockstat {
                tw,
                ..Sockstat::default()
            },
            decode_errors: 0,
        }
    }

    #[test]
    fn timewait_drift_of_an_instant_snapshot_is_against_its_own_listing() {
        let inv = vec![tw(1, 40000), tw(1, 40001), tw(2, 40002)];
        let mut input = Input {
            now_ns: 5_000_000_000,
            window_ns: 0,
            host: "h".into(),
            kernel: "k".into(),
            hooks: vec![],
            inventory: Some(&inv),
            namespaces: vec![ns(1, 2), ns(2, 3)],
            loss: Loss::default(),
            home_netns: 1,
            thresholds: Thresholds::default(),
            sockets_filtered: false,
            reasons: crate::model::event::RstReasons::for_tests(),
        };
        let agg = Aggregator::new(AggConfig::default());
        let d: Vec<(u32, u64, u64)> = build(&agg, &input)
            .time_wait
            .drift
            .iter()
            .map(|d| (d.netns, d.sockstat, d.tracked))
            .collect();
        assert_eq!(d, vec![(1, 2, 2), (2, 3, 1)]);
        // Watching events, the tracked count is the event-driven one (none here).
        input.window_ns = 1_000_000_000;
        let tracked: Vec<u64> = build(&agg, &input)
            .time_wait
            .drift
            .iter()
            .map(|d| d.tracked)
            .collect();
        assert_eq!(tracked, vec![0, 0]);
    }

    fn input<'a>(inv: Option<&'a [SockRec]>) -> Input<'a> {
        Input {
            now_ns: 60_000_000_000,
            window_ns: 10_000_000_000,
            host: String::new(),
            kernel: String::new(),
            hooks: vec![],
            inventory: inv,
            namespaces: vec![ns(1, 0)],
            loss: Loss::default(),
            home_netns: 1,
            thresholds: Thresholds::default(),
            sockets_filtered: false,
            reasons: crate::model::event::RstReasons::for_tests(),
        }
    }

    /// Socket `cookie` retransmitting data at `at` (ns since its connect), then maybe aborted.
    fn retransmitting(agg: &mut Aggregator, cookie: u64, at: &[u64], abort: bool) {
        use crate::model::event::{Event, EventKind, Family};
        let ev = |ts: u64, kind: EventKind| Event {
            ts_ns: ts,
            cookie,
            skaddr: cookie,
            netns: 1,
            family: Family::Inet,
            local: SocketAddr::from(([10, 0, 0, 1], 40000 + cookie as u16)),
            remote: SocketAddr::from(([10, 0, 0, 2], 443)),
            owner: None,
            softirq: false,
            kind,
        };
        agg.apply(&ev(
            1,
            EventKind::State {
                old: TcpState::SynSent,
                new: TcpState::Established,
                prev_state_ns: None,
            },
        ));
        let mut prev = None;
        for (i, t) in at.iter().enumerate() {
            agg.apply(&ev(
                *t,
                EventKind::Retransmit {
                    kind: RetransmitKind::Data,
                    state: Some(TcpState::Established),
                    nth: i as u32 + 1,
                    interval_ns: prev.map(|p| t - p),
                    err: 0,
                    segs: 1,
                    accept_queue: None,
                    syn_queue: None,
                },
            ));
            prev = Some(*t);
        }
        if abort {
            agg.apply(&ev(
                at[at.len() - 1] + 1,
                EventKind::SockError {
                    errno: libc::ETIMEDOUT,
                },
            ));
        }
    }

    fn finding<'a>(s: &'a Snapshot, id: &str) -> Option<&'a Finding> {
        s.findings.iter().find(|f| f.id == id)
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn reuseport_members_overflow_on_their_own() {
        use crate::model::event::{Event, EventKind};
        let l = SocketAddr::from(([127, 0, 0, 1], 8080));
        let listener = |cookie: u64, pid: u32, queued: u32| SockRec {
            skaddr: cookie,
            cookie,
            accept_queue: queued,
            accept_max: 2,
            owner: Some(Owner {
                pid,
                tid: pid,
                comm: crate::model::event::Comm::new("worker"),
                cgroup_id: 0,
                source: crate::model::event::OwnerSource::Task,
            }),
            ..crate::model::system::test_rec(
                TcpState::Listen,
                1,
                l,
                SocketAddr::from(([0, 0, 0, 0], 0)),
            )
        };
        let inv = vec![listener(7, 70, 0), listener(8, 80, 3)];
        let mut agg = Aggregator::new(AggConfig::default());
        let overflow =
            |cookie: u64, count: u64| crate::model::event::test_overflow(1, cookie, l, count);
        agg.apply(&overflow(8, 5));
        // Gone before the listing: it overflowed in the window, so it still has a row; a
        // gone listener that did nothing has none.
        agg.apply(&overflow(9, 2));
        agg.apply(&Event {
            kind: EventKind::Retransmit {
                kind: RetransmitKind::SynAck,
                state: Some(TcpState::SynRecv),
                nth: 0,
                interval_ns: None,
                err: 0,
                segs: 0,
                accept_queue: None,
                syn_queue: None,
            },
            ..overflow(10, 0)
        });
        let s = build(&agg, &input(Some(&inv)));
        let rows: Vec<(u64, u64)> = s
            .listeners
            .iter()
            .map(|l| (l.cookie, l.overflows.accept))
            .collect();
        assert_eq!(rows, vec![(7, 0), (8, 5), (9, 2)]);
        let f: Vec<&Finding> = s
            .findings
            .iter()
            .filter(|f| f.id == "accept_queue_overflow")
            .collect();
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].count, 5);
        assert_eq!(f[0].owner.as_ref().map(|o| o.pid), Some(80));
        assert!(
            f[0].what
                .contains("127.0.0.1:8080 (one of 3 SO_REUSEPORT sockets)"),
            "{}",
            f[0].what
        );
        assert_eq!(s.states.get("LISTEN"), Some(&2), "states count the listing");
    }

    #[test]
    fn a_listener_full_right_now_is_a_finding_and_explains_stuck_syns() {
        let l = SocketAddr::from(([127, 0, 0, 1], 9000));
        let listener = |queued: u32, drops: u32| SockRec {
            skaddr: 5,
            cookie: 5,
            accept_queue: queued,
            accept_max: 2,
            drops,
            ..crate::model::system::test_rec(
                TcpState::Listen,
                1,
                l,
                SocketAddr::from(([0, 0, 0, 0], 0)),
            )
        };
        let syn_sent = |port: u16, remote: SocketAddr| SockRec {
            skaddr: u64::from(port),
            cookie: u64::from(port),
            retransmits: 2,
            ..crate::model::system::test_rec(
                TcpState::SynSent,
                1,
                SocketAddr::from(([127, 0, 0, 1], port)),
                remote,
            )
        };
        let agg = Aggregator::new(AggConfig::default());
        // Full (3 queued of 2) with a history of drops, and a client of it stuck in SYN_SENT.
        let inv = vec![listener(3, 6), syn_sent(44458, l)];
        let s = build(&agg, &input(Some(&inv)));
        let f = finding(&s, "accept_queue_full").expect("full queue found");
        assert_eq!((f.severity, f.count), ("critical", 3));
        assert!(
            f.what
                .contains("127.0.0.1:9000 has a full accept queue now (3/2)"),
            "{}",
            f.what
        );
        assert!(f.what.contains("dropped 6 packet(s)"), "{}", f.what);
        assert!(finding(&s, "accept_queue_overflow").is_none());
        let stuck = finding(&s, "syn_sent_stuck").expect("stuck SYNs found");
        assert!(
            stuck
                .cause
                .contains("listener 127.0.0.1:9000 in this namespace"),
            "{}",
            stuck.cause
        );

        // At its limit is not full (the kernel holds limit + 1), and a SYN_SENT toward
        // another address keeps the generic cause.
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 9000));
        let inv = vec![listener(2, 0), syn_sent(44460, elsewhere)];
        let s = build(&agg, &input(Some(&inv)));
        assert!(finding(&s, "accept_queue_full").is_none());
        let stuck = finding(&s, "syn_sent_stuck").expect("stuck SYNs found");
        assert!(
            stuck.cause.starts_with("no SYN-ACK comes back"),
            "{}",
            stuck.cause
        );
    }

    #[test]
    fn an_overflow_says_which_packets_met_the_full_queue_and_what_the_kernel_did() {
        use crate::model::event::{Event, EventKind, OverflowAction, OverflowSource, Queue};
        let l = SocketAddr::from(([127, 0, 0, 1], 9100));
        let mut agg = Aggregator::new(AggConfig::default());
        // 5 drops by the counters, 2 of them final ACKs seen one by one.
        agg.apply(&crate::model::event::test_overflow(1, 5, l, 5));
        for ts in [10, 20] {
            agg.apply(&Event {
                ts_ns: ts,
                kind: EventKind::Overflow {
                    queue: Queue::Accept,
                    len: Some(2),
                    max: Some(1),
                    count: 1,
                    source: OverflowSource::Packet,
                    action: OverflowAction::Dropped,
                },
                ..crate::model::event::test_overflow(1, 5, l, 1)
            });
        }
        let mut inp = input(None);
        inp.namespaces[0]
            .sysctls
            .insert("net.ipv4.tcp_abort_on_overflow".into(), "1".into());
        let s = build(&agg, &inp);
        let f = finding(&s, "accept_queue_overflow").unwrap();
        assert!(
            f.what.contains("dropped 5 handshake packet(s)"),
            "{}",
            f.what
        );
        assert!(
            !f.what.contains("SYN(s)"),
            "no split without the hook: {}",
            f.what
        );
        assert!(
            f.cause
                .contains("answered with a RST (tcp_abort_on_overflow = 1)"),
            "{}",
            f.cause
        );
        inp.hooks.push(HookView {
            signal: "accept overflow at final ACK".into(),
            hook: Some("tp_btf/kfree_skb".into()),
            note: None,
        });
        inp.namespaces[0]
            .sysctls
            .insert("net.ipv4.tcp_abort_on_overflow".into(), "0".into());
        let s = build(&agg, &inp);
        let f = finding(&s, "accept_queue_overflow").unwrap();
        assert!(f.what.ends_with(": 3 SYN(s), 2 final ACK(s)"), "{}", f.what);
        assert!(
            f.cause.contains("is dropped (tcp_abort_on_overflow = 0)"),
            "{}",
            f.cause
        );
    }

    #[test]
    fn ipv6_listeners_are_named_with_brackets() {
        let l: SocketAddr = "[::]:8200".parse().unwrap();
        let mut agg = Aggregator::new(AggConfig::default());
        agg.apply(&crate::model::event::test_overflow(1, 4, l, 1));
        let s = build(&agg, &input(None));
        let f = s
            .findings
            .iter()
            .find(|f| f.id == "accept_queue_overflow")
            .unwrap();
        assert!(
            f.what.starts_with("listener [::]:8200 dropped"),
            "{}",
            f.what
        );
        assert_eq!(f.examples, vec!["[::]:8200".to_string()]);
        assert_eq!(endpoint("10.0.0.1", 80), "10.0.0.1:80");
    }

    #[test]
    fn a_storm_is_timeouts_in_a_row_not_many_retransmits() {
        // A bulk transfer that recovered: fast retransmits in bursts, progress in between.
        let mut agg = Aggregator::new(AggConfig::default());
        retransmitting(
            &mut agg,
            1,
            &[1000 * MS, 1001 * MS, 1003 * MS, 2000 * MS, 2001 * MS],
            false,
        );
        let mut rec = crate::model::system::test_rec(
            TcpState::Established,
            1,
            SocketAddr::from(([10, 0, 0, 1], 40001)),
            SocketAddr::from(([10, 0, 0, 2], 443)),
        );
        rec.cookie = 1;
        let inv = vec![rec];
        let s = build(&agg, &input(Some(&inv)));
        assert!(
            finding(&s, "retransmit_storm").is_none(),
            "{:?}",
            s.findings
        );
        let f = finding(&s, "data_retransmits").expect("the loss is still reported");
        assert_eq!((f.severity, f.count), ("info", 1));
        // The same socket now in its fourth timeout in a row, as the kernel counts them.
        let mut stalled = inv.clone();
        stalled[0].retransmits = 4;
        let s = build(&agg, &input(Some(&stalled)));
        let f = finding(&s, "retransmit_storm").expect("storm");
        assert_eq!((f.severity, f.count), ("warning", 1));
        assert!(finding(&s, "data_retransmits").is_none());
        assert_eq!(f.governed_by[0].name, "net.ipv4.tcp_retries2");
    }

    #[test]
    fn an_abort_after_retransmits_is_a_critical_storm() {
        let mut agg = Aggregator::new(AggConfig::default());
        retransmitting(&mut agg, 2, &[200 * MS, 600 * MS, 1400 * MS], true);
        let s = build(&agg, &input(Some(&[])));
        let f = finding(&s, "retransmit_storm").expect("storm");
        assert_eq!((f.severity, f.count), ("critical", 1));
        assert!(finding(&s, "keepalive_abort").is_none());
    }

    #[test]
    fn a_replay_sees_a_storm_in_doubling_intervals() {
        let mut agg = Aggregator::new(AggConfig::default());
        // Timeouts at +200, +400, +800 ms: four in a row.
        retransmitting(
            &mut agg,
            3,
            &[1000 * MS, 1200 * MS, 1600 * MS, 2400 * MS],
            false,
        );
        // Retransmits at irregular times: no run.
        retransmitting(
            &mut agg,
            4,
            &[1000 * MS, 1300 * MS, 1310 * MS, 3000 * MS],
            false,
        );
        let s = build(&agg, &input(None));
        let f = finding(&s, "retransmit_storm").expect("storm");
        assert_eq!(f.count, 1);
        assert_eq!(
            f.examples,
            vec!["10.0.0.1:40003 -> 10.0.0.2:443".to_string()]
        );
        assert_eq!(finding(&s, "data_retransmits").map(|f| f.count), Some(1));
    }

    /// A reset event in namespace 1: `local` sent (or received) it in `state`.
    fn reset(
        agg: &mut Aggregator,
        sent: bool,
        state: Option<TcpState>,
        reason: Option<u32>,
        local: u16,
        remote: u16,
        pid: Option<u32>,
    ) {
        use crate::model::event::{Comm, Event, EventKind, Family, OwnerSource};
        let no_socket = sent && state.is_none();
        agg.apply(&Event {
            ts_ns: 1000 * MS,
            cookie: if no_socket { 0 } else { u64::from(local) },
            skaddr: if no_socket { 0 } else { u64::from(local) },
            netns: 1,
            family: Family::Inet,
            local: SocketAddr::from(([127, 0, 0, 1], local)),
            remote: SocketAddr::from(([127, 0, 0, 1], remote)),
            owner: pid.map(|pid| Owner {
                pid,
                tid: pid,
                comm: Comm::new("app"),
                cgroup_id: 0,
                source: OwnerSource::Task,
            }),
            softirq: pid.is_none(),
            kind: EventKind::Reset {
                sent,
                state,
                reason,
            },
        });
    }

    fn with_counters<'a>(mut input: Input<'a>, counters: &[(&str, u64)]) -> Input<'a> {
        input.namespaces[0].counters_now =
            Counters(counters.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        input
    }

    #[test]
    fn resets_are_explained_by_cause() {
        let mut agg = Aggregator::new(AggConfig::default());
        let (est, close) = (Some(TcpState::Established), Some(TcpState::Close));
        // A server closes with a request unread: its RST, and the client seeing it.
        reset(&mut agg, true, close, Some(11), 80, 40000, Some(7));
        reset(&mut agg, false, est, None, 40000, 80, Some(8));
        // A zero-linger close (the generic TCP_STATE reason) and what its peer sees.
        reset(&mut agg, true, close, Some(14), 40001, 80, Some(8));
        reset(
            &mut agg,
            false,
            Some(TcpState::CloseWait),
            None,
            80,
            40001,
            Some(7),
        );
        // A SYN to a closed port, both sides.
        reset(&mut agg, true, None, Some(1), 81, 40002, None);
        reset(
            &mut agg,
            false,
            Some(TcpState::SynSent),
            None,
            40002,
            81,
            Some(8),
        );
        let counters = [("TcpExt:TCPAbortOnClose", 1), ("TcpExt:TCPAbortOnData", 1)];
        let s = build(&agg, &with_counters(input(Some(&[])), &counters));
        let ids: Vec<&str> = s.findings.iter().map(|f| f.id).collect();
        assert_eq!(
            ids,
            [
                "reset_on_close",
                "abortive_close",
                "connect_refused",
                "peer_resets",
                "reset_no_socket"
            ]
        );
        let f = finding(&s, "reset_on_close").unwrap();
        assert_eq!((f.severity, f.count), ("warning", 1));
        assert_eq!(f.owner.as_ref().map(|o| o.pid), Some(7));
        assert_eq!(f.examples, ["127.0.0.1:80 -> 127.0.0.1:40000"]);
        let f = finding(&s, "abortive_close").unwrap();
        assert_eq!(
            (f.count, &f.examples[..]),
            (1, &["127.0.0.1:40001 -> 127.0.0.1:80".to_string()][..])
        );
        let f = finding(&s, "connect_refused").unwrap();
        assert_eq!((f.count, f.owner.as_ref().map(|o| o.pid)), (1, Some(8)));
        assert_eq!(f.examples, ["127.0.0.1:40002 -> 127.0.0.1:81"]);
        let f = finding(&s, "peer_resets").unwrap();
        assert_eq!(f.count, 2);
        let f = finding(&s, "reset_no_socket").unwrap();
        assert_eq!((f.count, f.owner.is_none()), (1, true));
        assert_eq!(f.examples, ["127.0.0.1:81 -> 127.0.0.1:40002"]);
    }

    #[test]
    fn reset_counts_come_from_the_kernel_counters_where_events_lack_reasons() {
        let mut agg = Aggregator::new(AggConfig::default());
        // A kernel without reset reasons (before 6.10): a reset without a socket is still a
        // segment nothing matched.
        reset(
            &mut agg,
            true,
            Some(TcpState::Close),
            None,
            80,
            40000,
            Some(7),
        );
        reset(&mut agg, true, None, None, 81, 40002, None);
        let counters = [
            ("TcpExt:TCPAbortOnClose", 3),
            ("TcpExt:TCPAbortOnMemory", 2),
        ];
        let mut inp = with_counters(input(Some(&[])), &counters);
        inp.namespaces[0].sockstat.orphan = 70_000;
        inp.namespaces[0]
            .sysctls
            .insert("net.ipv4.tcp_max_orphans".into(), "65536".into());
        let s = build(&agg, &inp);
        let f = finding(&s, "reset_on_close").unwrap();
        assert_eq!((f.count, f.examples.len()), (3, 0));
        let f = finding(&s, "reset_on_memory").unwrap();
        assert_eq!((f.severity, f.count), ("critical", 2));
        assert!(f.what.contains("70000 orphaned"), "{}", f.what);
        assert_eq!(
            (
                f.governed_by[0].name.as_str(),
                f.governed_by[0].value.as_deref()
            ),
            ("net.ipv4.tcp_max_orphans", Some("65536"))
        );
        assert_eq!(finding(&s, "reset_no_socket").map(|f| f.count), Some(1));
        assert!(finding(&s, "abortive_close").is_none());
        // Without counters (a capture), nothing is claimed the events do not show.
        let s = build(&agg, &input(None));
        assert!(finding(&s, "reset_on_close").is_none());
        assert!(finding(&s, "reset_on_memory").is_none());
        // Nor under a socket filter: the namespace's counters count other sockets too.
        inp.sockets_filtered = true;
        let s = build(&agg, &inp);
        assert!(finding(&s, "reset_on_close").is_none());
        assert!(finding(&s, "reset_on_memory").is_none());
        assert_eq!(finding(&s, "reset_no_socket").map(|f| f.count), Some(1));
    }

    #[test]
    fn sockets_by_owner_from_the_listing_or_the_events() {
        use crate::model::event::{Comm, Event, EventKind, Family, OwnerSource};
        let who = |pid| Owner {
            pid,
            tid: pid,
            comm: Comm::new(if pid == 1 { "db" } else { "app" }),
            cgroup_id: 0,
            source: OwnerSource::Task,
        };
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let rec = |st, l, r, pid: Option<u32>| {
            let mut x = crate::model::system::test_rec(st, 1, a(l), a(r));
            x.owner = pid.map(who);
            x
        };
        let inv = vec![
            rec(TcpState::Listen, 5432, 0, Some(1)),
            rec(TcpState::Established, 5432, 40000, Some(1)),
            rec(TcpState::Established, 40000, 5432, Some(2)),
            rec(TcpState::CloseWait, 5432, 40001, Some(1)),
            rec(TcpState::TimeWait, 40002, 5432, None),
        ];
        let agg = Aggregator::new(AggConfig::default());
        let s = build(&agg, &input(Some(&inv)));
        type Row<'a> = (u32, u64, Vec<(&'a str, u64)>);
        let got: Vec<Row> = s
            .owners
            .iter()
            .map(|o| {
                (
                    o.pid,
                    o.sockets,
                    o.states.iter().map(|(k, v)| (*k, *v)).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    3,
                    vec![("CLOSE_WAIT", 1), ("ESTABLISHED", 1), ("LISTEN", 1)]
                ),
                (2, 1, vec![("ESTABLISHED", 1)])
            ]
        );
        // A capture: the live timelines, closed ones left out.
        let mut agg = Aggregator::new(AggConfig::default());
        for (cookie, new) in [(7, TcpState::Established), (8, TcpState::Close)] {
            agg.apply(&Event {
                ts_ns: 5,
                cookie,
                skaddr: cookie,
                netns: 1,
                family: Family::Inet,
                local: a(40000 + cookie as u16),
                remote: a(80),
                owner: Some(who(2)),
                softirq: false,
                kind: EventKind::State {
                    old: TcpState::SynSent,
                    new,
                    prev_state_ns: None,
                },
            });
        }
        let s = build(&agg, &input(None));
        assert_eq!(s.owners.len(), 1);
        assert_eq!((s.owners[0].pid, s.owners[0].sockets), (2, 1));
    }

    #[test]
    fn time_wait_is_owned_by_its_closer_or_its_listener() {
        use crate::model::aggregate::TwEntry;
        use crate::model::event::{Comm, OwnerSource};
        let who = |pid, comm: &str| Owner {
            pid,
            tid: pid,
            comm: Comm::new(comm),
            cgroup_id: 0,
            source: OwnerSource::Task,
        };
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut agg = Aggregator::new(AggConfig::default());
        // A client's TIME_WAIT seen entering after its owner closed it.
        agg.seed_timewait(
            9,
            TwEntry {
                netns: 1,
                local: a(40001),
                remote: a(5432),
                enter_ns: Some(1),
                substate: Some(TcpState::TimeWait),
                owner: Some(who(10, "client")),
            },
        );
        let mut listener = crate::model::system::test_rec(TcpState::Listen, 1, a(80), a(0));
        listener.owner = Some(who(20, "nginx"));
        let mut inv = vec![listener];
        for (l, r) in [(40001, 5432), (80, 50000), (80, 50001), (40002, 5432)] {
            inv.push(crate::model::system::test_rec(
                TcpState::TimeWait,
                1,
                a(l),
                a(r),
            ));
        }
        let s = build(&agg, &input(Some(&inv)));
        let got: Vec<(u32, &str, u64, &str)> = s
            .time_wait
            .by_owner
            .iter()
            .map(|o| (o.pid, o.comm.as_str(), o.count, o.source))
            .collect();
        assert_eq!(
            got,
            [(20, "nginx", 2, "listener"), (10, "client", 1, "closed")]
        );
        assert_eq!(s.time_wait.owner_unknown, 1);
    }

    #[test]
    fn listing_records_that_did_not_decode_count_with_the_loss() {
        let inv = vec![tw(1, 40000)];
        let mut n = ns(1, 1);
        n.decode_errors = 2;
        let input = Input {
            now_ns: 1,
            window_ns: 0,
            host: String::new(),
            kernel: String::new(),
            hooks: vec![],
            inventory: Some(&inv),
            namespaces: vec![n],
            loss: Loss {
                decode_errors: 1,
                ..Loss::default()
            },
            home_netns: 1,
            thresholds: Thresholds::default(),
            sockets_filtered: false,
            reasons: crate::model::event::RstReasons::for_tests(),
        };
        let snap = build(&Aggregator::new(AggConfig::default()), &input);
        assert_eq!(snap.loss.decode_errors, 3);
    }
}
