//! The aggregator fed synthetic event sequences: timelines, eviction, TIME_WAIT,
//! listeners, resets and the memory bound.
use super::*;
use crate::model::event::Family;
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
        ..Config::default()
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
        ..Config::default()
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
    // Samples stopped listing the old members: after the retention they are gone.
    a.tick(10 + Config::default().retention_ns);
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
        ..Config::default()
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

#[test]
fn closed_listeners_leave_the_model_after_the_retention() {
    let mut a = Aggregator::new(Config::default());
    let ret = Config::default().retention_ns;
    let sample = |port: u16, cookie: u64| ListenerSample {
        netns: 1,
        local: SocketAddr::from(([10, 0, 0, 1], port)),
        cookie,
        owner: Some(owner(7)),
        accept_now: 0,
        accept_max: 8,
        syn_now: 0,
        drops: 0,
    };
    // 300 k short-lived listeners, each sampled once, overflowed once and closed.
    let mut now = 1;
    for i in 0..300_000u64 {
        let port = 1024 + (i % 60_000) as u16;
        let local = SocketAddr::from(([10, 0, 0, 1], port));
        now += 1_000_000;
        a.observe_listener(&sample(port, i + 1), now);
        a.apply(&crate::testkit::test_overflow(now, i + 1, local, 1));
        let mut close = ev(now, i + 1, st(Listen, Close, None));
        close.local = local;
        a.apply(&close);
        a.tick(now);
    }
    // Only the last retention's worth are still there (300 s of closes, 60 s kept), and
    // none of them counts as listening.
    let kept = a.listeners().count();
    assert!(kept <= (ret / 1_000_000 + 1_000) as usize, "{kept} kept");
    assert_eq!(a.listener_count(), 0);
    a.tick(now + ret);
    assert_eq!(a.listeners().count(), 0);
}

#[test]
fn retired_timelines_are_handed_over_once_when_asked_for() {
    let mut a = Aggregator::new(Config {
        retention_ns: 100,
        keep_retired: true,
        ..Config::default()
    });
    a.apply(&ev(1, 7, st(Close, SynSent, None)));
    a.apply(&ev(2, 7, st(SynSent, Established, None)));
    a.apply(&ev(3, 8, st(Close, SynSent, None)));
    a.apply(&ev(5, 7, st(Established, Close, None)));
    a.tick(50);
    assert!(a.take_retired().is_empty(), "still within its retention");
    a.tick(200);
    let gone = a.take_retired();
    assert_eq!(gone.iter().map(|t| t.cookie).collect::<Vec<_>>(), [7]);
    assert_eq!(gone[0].transitions.total, 3);
    assert!(a.take_retired().is_empty());
    assert!(a.socket(8).is_some(), "the open one stays");
}
