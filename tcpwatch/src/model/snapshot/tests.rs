//! The snapshot's composition: states, TIME_WAIT owners and drift, owners, loss.
use std::net::SocketAddr;

use super::*;
use crate::model::Loss;
use crate::model::aggregate::{Aggregator, Config as AggConfig};
use crate::model::event::Owner;
use crate::model::event::TcpState;
use crate::model::system::SockRec;
use crate::testkit::{ns_input, snapshot_input, test_rec};
fn tw(netns: u32, port: u16) -> SockRec {
    SockRec {
        skaddr: u64::from(port),
        cookie: u64::from(port),
        substate: Some(TcpState::TimeWait),
        ..test_rec(
            TcpState::TimeWait,
            netns,
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], 80)),
        )
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
        namespaces: vec![ns_input(1, 2), ns_input(2, 3)],
        loss: Loss::default(),
        home_netns: 1,
        thresholds: Thresholds::default(),
        sockets_filtered: false,
        reasons: crate::testkit::rst_reasons(),
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
        let mut x = test_rec(st, 1, a(l), a(r));
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
    let s = build(&agg, &snapshot_input(Some(&inv)));
    type Row<'a> = (u32, u64, Vec<(&'a str, u64)>);
    let got: Vec<Row> = s
        .owners
        .iter()
        .map(|o| {
            (
                o.pid,
                o.sockets,
                o.states.iter().map(|(k, v)| (k.as_ref(), *v)).collect(),
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
    let s = build(&agg, &snapshot_input(None));
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
    let mut listener = test_rec(TcpState::Listen, 1, a(80), a(0));
    listener.owner = Some(who(20, "nginx"));
    let mut inv = vec![listener];
    for (l, r) in [(40001, 5432), (80, 50000), (80, 50001), (40002, 5432)] {
        inv.push(test_rec(TcpState::TimeWait, 1, a(l), a(r)));
    }
    let s = build(&agg, &snapshot_input(Some(&inv)));
    let got: Vec<(u32, &str, u64, &str)> = s
        .time_wait
        .by_owner
        .iter()
        .map(|o| (o.pid, o.comm.as_str(), o.count, o.source.as_ref()))
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
    let mut n = ns_input(1, 1);
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
        reasons: crate::testkit::rst_reasons(),
    };
    let snap = build(&Aggregator::new(AggConfig::default()), &input);
    assert_eq!(snap.loss.decode_errors, 3);
}

#[test]
fn the_json_contract_reads_back_as_it_was_written() {
    // A daemon's clients read snapshots back: every field the golden document has must
    // survive the way there and back.
    let golden = include_str!("../../../tests/golden/snapshot.json");
    let snap: Snapshot = serde_json::from_str(golden).expect("the golden snapshot reads back");
    assert!(!snap.findings.is_empty() && !snap.sockets.is_empty());
    let again = serde_json::to_value(&snap).unwrap();
    let want: serde_json::Value = serde_json::from_str(golden).unwrap();
    assert_eq!(again, want);
}
