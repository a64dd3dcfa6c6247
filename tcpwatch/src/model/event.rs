//! The decoded event model every output consumes: plain data, no kernel or wire types.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Names of `enum sk_rst_reason` values, from the kernel's BTF at start or from a capture's
/// records: the numbering changes between kernels, the names do not. Cheap to clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RstReasons(std::sync::Arc<[(u32, Box<str>)]>);

impl RstReasons {
    pub fn new(names: Vec<(u32, String)>) -> RstReasons {
        RstReasons(
            names
                .into_iter()
                .map(|(v, n)| (v, n.into_boxed_str()))
                .collect(),
        )
    }

    pub fn name(&self, v: u32) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == v).map(|(_, s)| &**s)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every (code, name), to send the table elsewhere.
    pub fn entries(&self) -> Vec<(u32, String)> {
        self.0.iter().map(|(v, n)| (*v, n.to_string())).collect()
    }
}

/// An owner as outputs show it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
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

/// Kernel TCP states, with the kernel's names (without `TCP_`).
#[derive(
    serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
}

impl TcpState {
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    pub fn from_kernel(v: u8) -> Option<TcpState> {
        if (1..=12).contains(&v) {
            Some(Self::ALL[v as usize - 1])
        } else {
            None
        }
    }

    pub fn as_kernel(self) -> u8 {
        self as u8 + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    pub fn from_name(s: &str) -> Option<TcpState> {
        let norm = s.to_ascii_uppercase().replace('-', "_");
        Self::ALL.into_iter().find(|st| st.name() == norm)
    }
}

/// Address family of a socket.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Inet,
    Inet6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Inet6 => "inet6",
        }
    }
}

/// Where the owner of an event came from. The task running when a softirq event fires is never
/// used: only a task-context sighting, a listener's owner, or the inventory.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// Seen acting on the socket in task context (connect, listen, close, …).
    Task,
    /// An accepted child: the listener's owner.
    Listener,
    /// Sockets that existed before tcpwatch started: from `/proc/*/fd`.
    Inventory,
}

impl OwnerSource {
    pub fn name(self) -> &'static str {
        match self {
            OwnerSource::Task => "task",
            OwnerSource::Listener => "listener",
            OwnerSource::Inventory => "inventory",
        }
    }
}

/// The process a socket belongs to.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// tgid (process id).
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub source: OwnerSource,
}

/// A task's comm: up to 16 bytes, not necessarily UTF-8, kept inline so decoding never allocates.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn new(s: &str) -> Comm {
        let mut b = [0u8; 16];
        let n = s.len().min(15);
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(b)
    }

    pub fn as_bytes(&self) -> &[u8] {
        let n = self.0.iter().position(|&c| c == 0).unwrap_or(16);
        &self.0[..n]
    }

    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string_lossy())
    }
}

/// Kind of a retransmitted segment.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetransmitKind {
    Syn,
    SynAck,
    Data,
    Fin,
}

impl RetransmitKind {
    pub fn name(self) -> &'static str {
        match self {
            RetransmitKind::Syn => "syn",
            RetransmitKind::SynAck => "synack",
            RetransmitKind::Data => "data",
            RetransmitKind::Fin => "fin",
        }
    }
}

/// Why a timewait socket ended.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwExitReason {
    Expired,
    Reused,
    Killed,
}

impl TwExitReason {
    pub fn name(self) -> &'static str {
        match self {
            TwExitReason::Expired => "expired",
            TwExitReason::Reused => "reused",
            TwExitReason::Killed => "killed",
        }
    }
}

/// A raw timewait-timer observation, before [`crate::model::timewait::TwMachine`] turns it
/// into enter / re-arm / exit.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwOp {
    Start,
    Cancel,
    Expire,
    /// Seen where the kernel re-arms (fentry), not inferred from a cancel and a start.
    Rearm,
    /// Seen where the kernel takes the socket off early (fentry): final, needs no follow-up.
    Deschedule,
}

/// How an overflow was observed.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverflowSource {
    /// `kfree_skb` with `TCP_LISTEN_OVERFLOW`: one final ACK dropped, as it happened.
    Packet,
    /// The listener's drop counter and the netns counters between two samples: every listen
    /// drop, including SYN-time ones no event exists for.
    Counters,
}

impl OverflowSource {
    pub fn name(self) -> &'static str {
        match self {
            OverflowSource::Packet => "kfree_skb",
            OverflowSource::Counters => "counters",
        }
    }
}

/// What the kernel did with the packets that did not fit.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverflowAction {
    Dropped,
    /// SYN queue full with `tcp_syncookies`: answered with cookies instead of dropped.
    Cookies,
}

impl OverflowAction {
    pub fn name(self) -> &'static str {
        match self {
            OverflowAction::Dropped => "dropped",
            OverflowAction::Cookies => "cookies",
        }
    }
}

/// Which listener queue overflowed.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    Accept,
    Syn,
}

impl Queue {
    pub fn name(self) -> &'static str {
        match self {
            Queue::Accept => "accept",
            Queue::Syn => "syn",
        }
    }
}

/// What happened.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum EventKind {
    State {
        old: TcpState,
        new: TcpState,
        /// Time spent in `old`; `None` when the kernel had not seen the socket before.
        prev_state_ns: Option<u64>,
    },
    Retransmit {
        kind: RetransmitKind,
        /// The socket's state when it retransmitted.
        state: Option<TcpState>,
        /// 1-based count of retransmits of this socket (or of this request, for SYN-ACKs).
        nth: u32,
        /// Time since the previous retransmit of the same socket.
        interval_ns: Option<u64>,
        /// The kernel's error for this transmission attempt (0 = sent).
        err: i32,
        /// Segments the kernel counted in `RetransSegs` for it; 0 for an attempt it gave up
        /// before sending (which `nth` and the totals do not count).
        segs: u32,
        /// SYN-ACKs: the listener's accept and SYN queue lengths at that moment.
        accept_queue: Option<u32>,
        syn_queue: Option<u32>,
    },
    Reset {
        sent: bool,
        state: Option<TcpState>,
        /// The kernel's `sk_rst_reason` where given.
        reason: Option<u32>,
    },
    SockError {
        errno: i32,
    },
    TimeWait {
        enter: bool,
        /// FIN_WAIT2 or TIME_WAIT.
        substate: Option<TcpState>,
        reason: Option<TwExitReason>,
        /// For exits: time since the enter.
        duration_ns: Option<u64>,
    },
    TimeWaitRearm {
        substate: Option<TcpState>,
    },
    /// Raw timer record of a timewait socket; consumed by the timewait machine.
    TwTimer {
        op: TwOp,
        substate: Option<TcpState>,
        /// The cancel ran in a kworker (netns teardown), not in the task that reused the tuple.
        kworker: bool,
    },
    Overflow {
        queue: Queue,
        /// Queue length and limit at the moment of the drop (or of the sample), where known.
        len: Option<u32>,
        max: Option<u32>,
        /// Drops (or cookies) this event stands for: 1 for a kernel event, the per-listener
        /// count since the previous sample for counter-based ones.
        count: u64,
        source: OverflowSource,
        action: OverflowAction,
    },
}

impl EventKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::State { .. } => "state",
            EventKind::Retransmit { .. } => "retransmit",
            EventKind::Reset { .. } => "reset",
            EventKind::SockError { .. } => "error",
            EventKind::TimeWait { .. } | EventKind::TimeWaitRearm { .. } => "timewait",
            EventKind::TwTimer { .. } => "twtimer",
            EventKind::Overflow { .. } => "overflow",
        }
    }
}

/// One observed TCP event, with the socket it belongs to and that socket's owner.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Event {
    /// CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// Socket cookie, 0 when unknown.
    pub cookie: u64,
    /// Kernel address of the socket: a key only.
    pub skaddr: u64,
    pub netns: u32,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub owner: Option<Owner>,
    /// The event ran in softirq context.
    pub softirq: bool,
    pub kind: EventKind,
}

/// Builds a `SocketAddr` from wire bytes (network order) and a host-order port.
pub fn socket_addr(family: Family, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = match family {
        Family::Inet => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        Family::Inet6 => {
            let v6 = Ipv6Addr::from(*addr);
            IpAddr::V6(v6)
        }
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_numbers_match_the_kernel() {
        assert_eq!(TcpState::from_kernel(1), Some(TcpState::Established));
        assert_eq!(TcpState::from_kernel(6), Some(TcpState::TimeWait));
        assert_eq!(TcpState::from_kernel(10), Some(TcpState::Listen));
        assert_eq!(TcpState::from_kernel(12), Some(TcpState::NewSynRecv));
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
        for s in TcpState::ALL {
            assert_eq!(TcpState::from_kernel(s.as_kernel()), Some(s));
            assert_eq!(TcpState::from_name(s.name()), Some(s));
        }
        assert_eq!(TcpState::from_name("time-wait"), Some(TcpState::TimeWait));
    }

    #[test]
    fn comm_is_trimmed_at_nul() {
        let c = Comm(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(c.as_bytes(), b"curl");
        assert_eq!(Comm::new("a-very-long-command-name").as_bytes().len(), 15);
    }
}
