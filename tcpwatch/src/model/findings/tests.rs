//! Findings from synthetic aggregator histories and listings: what fires, with which
//! severity, count, owner and wording.
use std::net::SocketAddr;

use crate::model::aggregate::{Aggregator, Config as AggConfig};
use crate::model::event::{Owner, RetransmitKind, TcpState};
use crate::model::findings::Finding;
use crate::model::snapshot::*;
use crate::model::system::{Counters, SockRec};
use crate::testkit::{snapshot_input, test_rec};
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
        ..test_rec(TcpState::Listen, 1, l, SocketAddr::from(([0, 0, 0, 0], 0)))
    };
    let inv = vec![listener(7, 70, 0), listener(8, 80, 3)];
    let mut agg = Aggregator::new(AggConfig::default());
    let overflow = |cookie: u64, count: u64| crate::testkit::test_overflow(1, cookie, l, count);
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
    let s = build(&agg, &snapshot_input(Some(&inv)));
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
        ..test_rec(TcpState::Listen, 1, l, SocketAddr::from(([0, 0, 0, 0], 0)))
    };
    let syn_sent = |port: u16, remote: SocketAddr| SockRec {
        skaddr: u64::from(port),
        cookie: u64::from(port),
        retransmits: 2,
        ..test_rec(
            TcpState::SynSent,
            1,
            SocketAddr::from(([127, 0, 0, 1], port)),
            remote,
        )
    };
    let agg = Aggregator::new(AggConfig::default());
    // Full (3 queued of 2) with a history of drops, and a client of it stuck in SYN_SENT.
    let inv = vec![listener(3, 6), syn_sent(44458, l)];
    let s = build(&agg, &snapshot_input(Some(&inv)));
    let f = finding(&s, "accept_queue_full").expect("full queue found");
    assert_eq!((f.severity.name(), f.count), ("critical", 3));
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
    let s = build(&agg, &snapshot_input(Some(&inv)));
    assert!(finding(&s, "accept_queue_full").is_none());
    let stuck = finding(&s, "syn_sent_stuck").expect("stuck SYNs found");
    assert!(
        stuck.cause.starts_with("no SYN-ACK comes back"),
        "{}",
        stuck.cause
    );
}

#[test]
fn a_wildcard_listener_is_named_only_for_syns_to_this_host() {
    let any = SocketAddr::from(([0, 0, 0, 0], 9000));
    let full = SockRec {
        skaddr: 5,
        cookie: 5,
        accept_queue: 3,
        accept_max: 2,
        ..test_rec(
            TcpState::Listen,
            1,
            any,
            SocketAddr::from(([0, 0, 0, 0], 0)),
        )
    };
    let stuck_to = |remote: SocketAddr| SockRec {
        skaddr: 7,
        cookie: 7,
        retransmits: 1,
        ..test_rec(
            TcpState::SynSent,
            1,
            SocketAddr::from(([10, 0, 0, 1], 40000)),
            remote,
        )
    };
    let agg = Aggregator::new(AggConfig::default());
    // A remote host with the same port is not this listener.
    let inv = vec![full, stuck_to(SocketAddr::from(([10, 9, 9, 9], 9000)))];
    let cause = |inv: &[SockRec]| {
        let s = build(&agg, &snapshot_input(Some(inv)));
        finding(&s, "syn_sent_stuck").expect("stuck").cause.clone()
    };
    assert!(
        cause(&inv).starts_with("no SYN-ACK comes back"),
        "{}",
        cause(&inv)
    );
    // This host's own address (the client's local one), or loopback, is.
    let inv = vec![full, stuck_to(SocketAddr::from(([10, 0, 0, 1], 9000)))];
    assert!(
        cause(&inv).contains("listener 0.0.0.0:9000"),
        "{}",
        cause(&inv)
    );
    let inv = vec![full, stuck_to(SocketAddr::from(([127, 0, 0, 1], 9000)))];
    assert!(
        cause(&inv).contains("listener 0.0.0.0:9000"),
        "{}",
        cause(&inv)
    );
}

#[test]
fn an_overflow_says_which_packets_met_the_full_queue_and_what_the_kernel_did() {
    use crate::model::event::{Event, EventKind, OverflowAction, OverflowSource, Queue};
    let l = SocketAddr::from(([127, 0, 0, 1], 9100));
    let mut agg = Aggregator::new(AggConfig::default());
    // 5 drops by the counters, 2 of them final ACKs seen one by one.
    agg.apply(&crate::testkit::test_overflow(1, 5, l, 5));
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
            ..crate::testkit::test_overflow(1, 5, l, 1)
        });
    }
    let mut inp = snapshot_input(None);
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
    agg.apply(&crate::testkit::test_overflow(1, 4, l, 1));
    let s = build(&agg, &snapshot_input(None));
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
    let mut rec = test_rec(
        TcpState::Established,
        1,
        SocketAddr::from(([10, 0, 0, 1], 40001)),
        SocketAddr::from(([10, 0, 0, 2], 443)),
    );
    rec.cookie = 1;
    let inv = vec![rec];
    let s = build(&agg, &snapshot_input(Some(&inv)));
    assert!(
        finding(&s, "retransmit_storm").is_none(),
        "{:?}",
        s.findings
    );
    let f = finding(&s, "data_retransmits").expect("the loss is still reported");
    assert_eq!((f.severity.name(), f.count), ("info", 1));
    // The same socket now in its fourth timeout in a row, as the kernel counts them.
    let mut stalled = inv.clone();
    stalled[0].retransmits = 4;
    let s = build(&agg, &snapshot_input(Some(&stalled)));
    let f = finding(&s, "retransmit_storm").expect("storm");
    assert_eq!((f.severity.name(), f.count), ("warning", 1));
    assert!(finding(&s, "data_retransmits").is_none());
    assert_eq!(f.governed_by[0].name, "net.ipv4.tcp_retries2");
}

#[test]
fn an_abort_after_retransmits_is_a_critical_storm() {
    let mut agg = Aggregator::new(AggConfig::default());
    retransmitting(&mut agg, 2, &[200 * MS, 600 * MS, 1400 * MS], true);
    let s = build(&agg, &snapshot_input(Some(&[])));
    let f = finding(&s, "retransmit_storm").expect("storm");
    assert_eq!((f.severity.name(), f.count), ("critical", 1));
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
    let s = build(&agg, &snapshot_input(None));
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
    let s = build(&agg, &with_counters(snapshot_input(Some(&[])), &counters));
    let ids: Vec<&str> = s.findings.iter().map(|f| f.id.name()).collect();
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
    assert_eq!((f.severity.name(), f.count), ("warning", 1));
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
    let mut inp = with_counters(snapshot_input(Some(&[])), &counters);
    inp.namespaces[0].sockstat.orphan = 70_000;
    inp.namespaces[0]
        .sysctls
        .insert("net.ipv4.tcp_max_orphans".into(), "65536".into());
    let s = build(&agg, &inp);
    let f = finding(&s, "reset_on_close").unwrap();
    assert_eq!((f.count, f.examples.len()), (3, 0));
    let f = finding(&s, "reset_on_memory").unwrap();
    assert_eq!((f.severity.name(), f.count), ("critical", 2));
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
    let s = build(&agg, &snapshot_input(None));
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
fn the_catalogue_has_every_finding_once() {
    use crate::model::findings::{CATALOGUE, FindingId};
    assert_eq!(CATALOGUE.len(), FindingId::ALL.len());
    for id in FindingId::ALL {
        assert_eq!(CATALOGUE.iter().filter(|e| e.id == *id).count(), 1, "{id}");
        assert!(!id.entry().severities.is_empty(), "{id}");
    }
}

#[test]
fn the_readme_table_is_the_catalogue() {
    let readme = include_str!("../../../../README.md");
    let table = crate::model::findings::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's findings table differs from the catalogue; it should read:\n{table}"
    );
}
