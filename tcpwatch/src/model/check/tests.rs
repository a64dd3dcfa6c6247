//! check's judgement over synthetic runs: each assertion passing and failing, and the verdict.
use super::*;
use crate::model::event::{Comm, Family, OverflowAction, OverflowSource, OwnerSource, Queue};

const MS: u64 = 1_000_000;

fn owner(pid: u32) -> Option<Owner> {
    Some(Owner {
        pid,
        tid: pid,
        comm: Comm::new("app"),
        cgroup_id: 7,
        source: OwnerSource::Task,
    })
}

fn ev(ts: u64, sk: u64, lport: u16, rport: u16, kind: EventKind) -> Event {
    Event {
        ts_ns: ts,
        cookie: sk,
        skaddr: sk,
        netns: 1,
        family: Family::Inet,
        local: format!("127.0.0.1:{lport}").parse().unwrap(),
        remote: format!("127.0.0.1:{rport}").parse().unwrap(),
        owner: owner(100),
        softirq: false,
        kind,
    }
}

fn st(old: TcpState, new: TcpState) -> EventKind {
    EventKind::State {
        old,
        new,
        prev_state_ns: None,
    }
}

fn rt(kind: RetransmitKind, nth: u32) -> EventKind {
    EventKind::Retransmit {
        kind,
        state: None,
        nth,
        interval_ns: None,
        err: 0,
        segs: 1,
        accept_queue: None,
        syn_queue: None,
    }
}

fn tw(enter: bool) -> EventKind {
    EventKind::TimeWait {
        enter,
        substate: Some(TcpState::TimeWait),
        reason: None,
        duration_ns: None,
    }
}

fn all_limits() -> Limits {
    Limits {
        retransmits: vec![(None, 0), (Some(RetransmitKind::Syn), 1)],
        no_listen_overflow: true,
        max_resets: Some(0),
        max_time_wait: Some(1),
        close_wait_leak_ns: Some(2_000 * MS),
        max_syn_sent_ns: Some(500 * MS),
    }
}

fn passed(a: &[Assertion]) -> Vec<(String, bool)> {
    a.iter().map(|a| (a.name.clone(), a.passed)).collect()
}

#[test]
fn clean_connection_passes_everything() {
    let mut c = Checker::new();
    use TcpState::*;
    c.apply(&ev(0, 1, 0, 80, st(Close, SynSent)));
    c.apply(&ev(MS, 1, 40000, 80, st(SynSent, Established)));
    c.apply(&ev(2 * MS, 1, 40000, 80, st(Established, FinWait1)));
    c.apply(&ev(3 * MS, 1, 40000, 80, st(FinWait1, FinWait2)));
    c.apply(&ev(3 * MS, 1, 40000, 80, st(FinWait2, Close)));
    c.apply(&ev(3 * MS, 9, 40000, 80, tw(true)));
    let (obs, a) = c.finish(&all_limits(), 10 * MS);
    assert!(a.iter().all(|a| a.passed), "{a:#?}");
    assert_eq!(a.len(), 7);
    assert_eq!(obs.time_wait_peak, 1);
    assert_eq!(obs.sockets, 2);
    assert_eq!(obs.syn_sent_longest[0].ms, 1.0);
    assert_eq!(obs.syn_sent_longest[0].local, "127.0.0.1:40000");
    assert_eq!(obs.retransmits["syn"], 0);
    assert_eq!(
        Verdict::decide(&a, &Loss::default(), false, true),
        Verdict::Pass
    );
}

#[test]
fn slow_connect_with_syn_retransmits_fails_three_ways() {
    use TcpState::*;
    let mut c = Checker::new();
    c.apply(&ev(0, 1, 0, 80, st(Close, SynSent)));
    c.apply(&ev(1000 * MS, 1, 40000, 80, rt(RetransmitKind::Syn, 1)));
    c.apply(&ev(2000 * MS, 1, 40000, 80, rt(RetransmitKind::Syn, 2)));
    c.apply(&ev(2100 * MS, 1, 40000, 80, st(SynSent, Established)));
    let (_, a) = c.finish(&all_limits(), 3000 * MS);
    assert_eq!(
        passed(&a),
        vec![
            ("--max-retransmits 0".into(), false),
            ("--max-retransmits syn=1".into(), false),
            ("--no-listen-overflow".into(), true),
            ("--max-resets 0".into(), true),
            ("--max-time-wait 1".into(), true),
            ("--close-wait-leak 2".into(), true),
            ("--max-syn-sent-ms 500".into(), false),
        ]
    );
    assert_eq!(a[0].observed, "syn 2, synack 0, data 0, fin 0");
    assert_eq!(
        a[1].details,
        ["2 retransmit(s) on 127.0.0.1:40000 -> 127.0.0.1:80 (100/app)"]
    );
    assert_eq!(
        a[6].details,
        [
            "connect 127.0.0.1:40000 -> 127.0.0.1:80 (100/app) 2100.0 ms in SYN_SENT with 2 SYN retransmit(s)"
        ]
    );
    // Lost events cannot undo a failure.
    let loss = Loss {
        kernel_dropped: 3,
        ..Loss::default()
    };
    assert_eq!(Verdict::decide(&a, &loss, false, true), Verdict::Fail);
    assert_eq!(Verdict::Fail.exit_code(), 1);
}

#[test]
fn connect_still_pending_at_the_end_counts_until_then() {
    use TcpState::*;
    let mut c = Checker::new();
    c.apply(&ev(0, 1, 0, 80, st(Close, SynSent)));
    let (obs, a) = c.finish(&all_limits(), 800 * MS);
    assert!(obs.syn_sent_longest[0].ongoing);
    assert!(!a[6].passed);
    assert!(
        a[6].details[0].ends_with("still connecting"),
        "{:?}",
        a[6].details
    );
}

#[test]
fn close_wait_leak_open_and_closed() {
    use TcpState::*;
    let mut c = Checker::new();
    // Closed after 1 s: fine. Another still open after 3 s: a leak.
    c.apply(&ev(0, 1, 80, 40000, st(Established, CloseWait)));
    c.apply(&ev(1000 * MS, 1, 80, 40000, st(CloseWait, LastAck)));
    c.apply(&ev(0, 2, 80, 40001, st(Established, CloseWait)));
    let (obs, a) = c.finish(&all_limits(), 3000 * MS);
    let cw = a
        .iter()
        .find(|a| a.name.starts_with("--close-wait-leak"))
        .unwrap();
    assert!(!cw.passed);
    assert_eq!(cw.observed, "longest 3.0 s");
    assert_eq!(
        cw.details,
        [
            "127.0.0.1:80 -> 127.0.0.1:40001 (100/app) 3.0 s in CLOSE_WAIT: the peer closed, the application has not called close()"
        ]
    );
    assert_eq!(obs.close_wait_longest.len(), 2);
}

#[test]
fn overflows_are_summed_per_listener() {
    let mut c = Checker::new();
    for (i, src) in [OverflowSource::Packet, OverflowSource::Counters]
        .into_iter()
        .enumerate()
    {
        c.apply(&ev(
            i as u64,
            50,
            8080,
            0,
            EventKind::Overflow {
                queue: Queue::Accept,
                len: Some(3),
                max: Some(2),
                count: 5,
                source: src,
                action: OverflowAction::Dropped,
            },
        ));
    }
    let (obs, a) = c.finish(&all_limits(), MS);
    assert_eq!(obs.overflows.len(), 1);
    assert_eq!(obs.overflows[0].count, 10);
    let o = a.iter().find(|a| a.name == "--no-listen-overflow").unwrap();
    assert!(!o.passed);
    assert_eq!(
        o.details,
        ["listener 127.0.0.1:8080 (100/app): 10 accept queue overflow(s) (queue 3/2), dropped"]
    );
    // Overflow events are about the listener, not a socket of their own.
    assert_eq!(obs.sockets, 0);
}

#[test]
fn time_wait_peak_and_resets() {
    let mut c = Checker::new();
    c.apply(&ev(0, 1, 1, 80, tw(true)));
    c.apply(&ev(1, 2, 2, 80, tw(true)));
    c.apply(&ev(2, 1, 1, 80, tw(false)));
    c.apply(&ev(3, 3, 3, 80, tw(true)));
    c.apply(&ev(
        4,
        4,
        4,
        80,
        EventKind::Reset {
            sent: false,
            state: Some(TcpState::SynSent),
            reason: None,
        },
    ));
    let (obs, a) = c.finish(&all_limits(), 10);
    assert_eq!((obs.time_wait_entered, obs.time_wait_peak), (3, 2));
    let t = a.iter().find(|a| a.name == "--max-time-wait 1").unwrap();
    assert_eq!(
        (t.passed, t.observed.as_str()),
        (false, "peak 2 (3 entered)")
    );
    let r = a.iter().find(|a| a.name == "--max-resets 0").unwrap();
    assert!(!r.passed);
    assert_eq!(
        r.details,
        ["received 127.0.0.1:4 -> 127.0.0.1:80 (100/app) in SYN_SENT"]
    );
}

#[test]
fn verdict_order() {
    let ok = [Assertion {
        name: "x".into(),
        limit: String::new(),
        observed: String::new(),
        passed: true,
        details: vec![],
        findings: vec![],
        governed_by: vec![],
    }];
    let loss = Loss {
        channel_dropped: 1,
        ..Loss::default()
    };
    assert_eq!(
        Verdict::decide(&ok, &loss, false, true),
        Verdict::Inconclusive
    );
    assert_eq!(Verdict::decide(&ok, &loss, true, true), Verdict::Pass);
    assert_eq!(
        Verdict::decide(&ok, &loss, true, false),
        Verdict::CommandFailed
    );
    assert_eq!(
        Verdict::decide(&ok, &loss, false, false),
        Verdict::CommandFailed
    );
    assert_eq!(
        Verdict::decide(&[], &Loss::default(), false, false).exit_code(),
        3
    );
    assert_eq!(Verdict::Inconclusive.exit_code(), 4);
}
