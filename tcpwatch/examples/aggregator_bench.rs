//! Aggregator throughput on one core, no privileges: synthetic connection lifecycles (client
//! and server side, TIME_WAIT enter and exit) fed to `Aggregator::apply`. Run by
//! `cargo xtask bench`; prints events/s and the socket table's size.
use std::time::Instant;

use tcpwatch::model::aggregate::{Aggregator, Config};
use tcpwatch::model::event::{
    Comm, Event, EventKind, Family, Owner, OwnerSource, TcpState, TwExitReason,
};

fn main() {
    let conns: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let owner = Owner {
        pid: 42,
        tid: 42,
        comm: Comm::new("bench"),
        cgroup_id: 1,
        source: OwnerSource::Task,
    };
    let mut events = Vec::with_capacity(12 * 100_000);
    let mut agg = Aggregator::new(Config::default());
    let mut applied = 0u64;
    let mut spent = std::time::Duration::ZERO;
    let mut ts = 1_000_000u64;
    let mut c = 0u64;
    while c < conns {
        // Build a batch outside the timed part, like the reader thread does.
        events.clear();
        for _ in 0..100_000.min(conns - c) {
            c += 1;
            let client = c * 2;
            let server = c * 2 + 1;
            let port = 1024 + (c % 60_000) as u16;
            let cl = Event {
                ts_ns: ts,
                cookie: client,
                skaddr: 0xffff_8880_0000_0000 + client * 64,
                netns: 1,
                family: Family::Inet,
                local: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                remote: std::net::SocketAddr::from(([127, 0, 0, 1], 80)),
                owner: Some(owner),
                softirq: false,
                kind: EventKind::State {
                    old: TcpState::Close,
                    new: TcpState::SynSent,
                    prev_state_ns: None,
                },
            };
            let sv = Event {
                cookie: server,
                skaddr: cl.skaddr + 32,
                local: cl.remote,
                remote: cl.local,
                ..cl
            };
            let st = |e: &Event, t: u64, old, new| Event {
                ts_ns: t,
                kind: EventKind::State {
                    old,
                    new,
                    prev_state_ns: Some(1000),
                },
                ..*e
            };
            use TcpState::*;
            events.push(cl);
            events.push(st(&cl, ts + 10, SynSent, Established));
            events.push(st(&sv, ts + 11, Listen, SynRecv));
            events.push(st(&sv, ts + 12, SynRecv, Established));
            events.push(st(&cl, ts + 20, Established, FinWait1));
            events.push(st(&sv, ts + 21, Established, CloseWait));
            events.push(st(&cl, ts + 22, FinWait1, FinWait2));
            events.push(Event {
                ts_ns: ts + 23,
                kind: EventKind::TimeWait {
                    enter: true,
                    substate: Some(FinWait2),
                    reason: None,
                    duration_ns: None,
                },
                ..cl
            });
            events.push(st(&cl, ts + 24, FinWait2, Close));
            events.push(st(&sv, ts + 25, CloseWait, LastAck));
            events.push(st(&sv, ts + 26, LastAck, Close));
            events.push(Event {
                ts_ns: ts + 60_000_000_000,
                kind: EventKind::TimeWait {
                    enter: false,
                    substate: Some(TimeWait),
                    reason: Some(TwExitReason::Expired),
                    duration_ns: Some(60_000_000_000),
                },
                ..cl
            });
            ts += 10_000;
        }
        let t = Instant::now();
        for e in &events {
            agg.apply(e);
        }
        agg.tick(ts);
        spent += t.elapsed();
        applied += events.len() as u64;
    }
    let rate = applied as f64 / spent.as_secs_f64();
    println!(
        "aggregator: {applied} events in {:.3} s on one core: {:.2} M events/s ({:.0} ns/event); {} timelines kept (cap {}), bound {} MiB",
        spent.as_secs_f64(),
        rate / 1e6,
        1e9 / rate,
        agg.socket_count(),
        agg.cfg.max_sockets,
        Aggregator::socket_bound_bytes(&agg.cfg) >> 20
    );
}
