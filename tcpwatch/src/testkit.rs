//! Fixtures the unit tests share: model values built the way the kernel and the collector
//! would make them, so each test states only what it is about.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use crate::model::Loss;
use crate::model::event::{
    Event, EventKind, Family, OverflowAction, OverflowSource, Queue, RstReasons, TcpState,
};
use crate::model::findings::{Finding, FindingId, Governor, Severity};
use crate::model::snapshot::{
    Input, ListenerView, NsInput, OverflowsView, OwnerView, QueueView, SocketView, Thresholds,
};
use crate::model::system::{Counters, SockRec, Sockstat};

/// The reset-reason table the unit tests use.
pub fn rst_reasons() -> RstReasons {
    RstReasons::new(
        [
            (0, "NOT_SPECIFIED"),
            (1, "NO_SOCKET"),
            (8, "TCP_ABORT_ON_DATA"),
            (9, "TCP_TIMEWAIT_SOCKET"),
            (11, "TCP_ABORT_ON_CLOSE"),
            (12, "TCP_ABORT_ON_LINGER"),
            (13, "TCP_ABORT_ON_MEMORY"),
            (14, "TCP_STATE"),
        ]
        .into_iter()
        .map(|(v, n)| (v, n.to_string()))
        .collect(),
    )
}

/// An event of socket `cookie` between 10.0.0.1:40000 and 10.0.0.2:80 in namespace 1, owner
/// unknown.
pub fn test_event(ts_ns: u64, cookie: u64, kind: EventKind) -> Event {
    Event {
        ts_ns,
        cookie,
        skaddr: 0xffff_0000 + cookie,
        netns: 1,
        family: Family::Inet,
        local: "10.0.0.1:40000".parse().expect("an address"),
        remote: "10.0.0.2:80".parse().expect("an address"),
        owner: None,
        softirq: false,
        kind,
    }
}

/// The unit tests' listener overflow: `count` accept-queue drops (3 queued of 2) seen from
/// the counters on `local` in namespace 1, owner unknown.
pub fn test_overflow(ts_ns: u64, cookie: u64, local: SocketAddr, count: u64) -> Event {
    Event {
        ts_ns,
        cookie,
        skaddr: cookie,
        netns: 1,
        family: if local.is_ipv4() {
            Family::Inet
        } else {
            Family::Inet6
        },
        local,
        remote: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        owner: None,
        softirq: false,
        kind: EventKind::Overflow {
            queue: Queue::Accept,
            len: Some(3),
            max: Some(2),
            count,
            source: OverflowSource::Counters,
            action: OverflowAction::Dropped,
        },
    }
}

/// A test record: a socket of `state` in `netns` between `local` and `remote`, the rest zero.
pub fn test_rec(state: TcpState, netns: u32, local: SocketAddr, remote: SocketAddr) -> SockRec {
    SockRec {
        skaddr: 0,
        cookie: 0,
        netns,
        family: if local.is_ipv4() {
            Family::Inet
        } else {
            Family::Inet6
        },
        state,
        substate: None,
        local,
        remote,
        ino: 0,
        uid: 0,
        listener: 0,
        accept_queue: 0,
        accept_max: 0,
        syn_queue: 0,
        syn_young: 0,
        drops: 0,
        retransmits: 0,
        probes: 0,
        last_pkt_ns: 0,
        owner: None,
    }
}

/// The outputs' test fixture: a listener whose accept queue overflowed (owner `srv`, pid 42;
/// 3 queued of 2, SYN queue peak 1; 24 drops, all accept overflows).
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

pub fn conn(cookie: u64, state: &'static str, local: &str, comm: &str, pid: u32) -> SocketView {
    SocketView {
        cookie,
        netns: 1,
        family: "inet".into(),
        local: local.into(),
        remote: "10.0.0.2:80".into(),
        owner: Some(OwnerView {
            pid,
            comm: comm.into(),
        }),
        state: Some(state.into()),
        state_for_ns: cookie * 1_000_000_000,
        closed_first: None,
        transitions: vec![],
        retransmits: BTreeMap::new(),
        retransmit_intervals_ns: vec![],
        resets_sent: 0,
        resets_received: 0,
        errors: vec![],
        time_wait: None,
    }
}

/// A namespace's input with `tw` timewait sockets in sockstat and nothing else.
pub fn ns_input(inode: u32, tw: u64) -> NsInput {
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

/// A snapshot input at 60 s after 10 s of events in namespace 1 (tcpwatch's own).
pub fn snapshot_input(inv: Option<&[SockRec]>) -> Input<'_> {
    Input {
        now_ns: 60_000_000_000,
        window_ns: 10_000_000_000,
        host: String::new(),
        kernel: String::new(),
        hooks: vec![],
        inventory: inv,
        namespaces: vec![ns_input(1, 0)],
        loss: Loss::default(),
        home_netns: 1,
        thresholds: Thresholds::default(),
        sockets_filtered: false,
        reasons: rst_reasons(),
    }
}

/// The outputs' finding fixture: listener 127.0.0.1:8080 in namespace 7 overflowed.
pub fn overflow_finding(examples: Vec<String>) -> Finding {
    Finding {
        id: FindingId::AcceptQueueOverflow,
        severity: Severity::Critical,
        netns: 7,
        what: "listener 127.0.0.1:8080 dropped 24 handshake packet(s) with its accept queue full (peak 3/2)".into(),
        cause: "slow accept()".into(),
        governed_by: vec![Governor {
            name: "net.core.somaxconn".into(),
            value: Some("4096".into()),
        }],
        owner: None,
        count: 24,
        examples,
    }
}
