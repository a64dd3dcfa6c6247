//! TIME_WAIT: SCENARIOS S1 (the timewait phase: enter and re-arm), S7 (pile-up against ss and
//! sockstat, bucket overflow, namespace teardown) and S9 (orphaned FIN_WAIT2 expiry).
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("s1_timewait_enter_and_rearm", s1_timewait),
    (
        "s7_timewait_pileup_matches_ss_and_sockstat",
        s7_timewait_pileup,
    ),
    ("s7_timewait_bucket_overflow", s7_timewait_buckets),
    ("s7_timewait_killed_by_netns_teardown", s7_netns_teardown),
    ("s9_orphaned_fin_wait2_expires", s9_orphan_expiry),
];

const W: Duration = Duration::from_secs(15);

/// S1, TIME_WAIT phase: the active closer's socket becomes a timewait socket in its FIN_WAIT2
/// substate (orphaned, the peer has not closed), with the same cookie and owner, and turns
/// TIME_WAIT when the peer's FIN arrives (a re-arm, no state transition). With the timer hooks
/// the re-arm is only visible when it moves the timer to another timer-wheel bucket (the
/// kernel updates a timer in place otherwise): with tcp_fin_timeout=2 the FIN_WAIT2 timer
/// (2 s) and the TIME_WAIT one (60 s) are far apart. fentry sees every re-arm.
fn s1_timewait() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_fin_timeout", "2");
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8089 16");
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8089"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    client.ok(&format!("close {c}"));
    assert_eq!(server.ok(&format!("recv {a} 1")), "0");
    server.ok("sleep 300");
    assert_eq!(
        ns.sockstat_tw(),
        1,
        "the client's orphan is a timewait socket already"
    );
    server.ok(&format!("close {a}"));
    tracer.wait_for("re-arm", W, |evs| {
        evs.iter()
            .any(|e| e["type"] == "timewait" && e["event"] == "rearm")
    });
    let evs = tracer.stop();
    let close = of_type(&evs, "state")
        .into_iter()
        .find(|e| is(e, "FIN_WAIT2", "CLOSE") && e["sport"] == cport)
        .expect("client FIN_WAIT2 -> CLOSE");
    let tw: Vec<&Value> = of_type(&evs, "timewait")
        .into_iter()
        .filter(|e| e["sport"] == cport)
        .collect();
    assert_eq!(tw.len(), 2, "{tw:#?}");
    assert_eq!(
        (tw[0]["event"].as_str(), tw[0]["substate"].as_str()),
        (Some("enter"), Some("FIN_WAIT2"))
    );
    assert_eq!(
        (tw[1]["event"].as_str(), tw[1]["substate"].as_str()),
        (Some("rearm"), Some("TIME_WAIT"))
    );
    for e in &tw {
        assert_eq!(
            e["cookie"], close["cookie"],
            "linked to the closing socket's timeline"
        );
        assert_eq!(e["dport"], 8089);
        assert_eq!(
            e["pid"].as_u64(),
            Some(client.pid as u64),
            "owned by the closer: {e}"
        );
    }
    assert_eq!(ns.sockstat_tw(), 1);
}

/// Live timewait count from the events: enters minus exits, per socket.
fn tw_live(evs: &[Value]) -> i64 {
    of_type(evs, "timewait")
        .iter()
        .map(|e| match e["event"].as_str() {
            Some("enter") => 1,
            Some("exit") => -1,
            _ => 0,
        })
        .sum()
}

fn tw_exits<'a>(evs: &'a [Value], reason: &str) -> Vec<&'a Value> {
    of_type(evs, "timewait")
        .into_iter()
        .filter(|e| e["event"] == "exit" && e["reason"] == reason)
        .collect()
}

/// S7: thousands of short client connections; at several samples the live timewait count
/// equals `ss state time-wait` and sockstat `tw`, and falls to zero when the timers expire
/// (TIME_WAIT lasts TCP_TIMEWAIT_LEN, 60 s). Loopback has tcp_tw_reuse (2) on: when a round
/// starts more than a second after a TIME_WAIT began, connect() may take that tuple, which the
/// kernel counts as TWRecycled and tcpwatch must report as a `reused` exit, not a re-arm.
fn s7_timewait_pileup() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8096 4096");
    for round in 1..=3 {
        server.ok_timeout(&format!("churn {l} 1000"));
        let want = round * 1000;
        let recycled = ns.counter("TcpExt", "TWRecycled") as i64;
        tracer.wait_for("every timewait enter and reuse", W, |evs| {
            tw_live(evs) + tw_exits(evs, "reused").len() as i64 >= want as i64
                && tw_exits(evs, "reused").len() as i64 >= recycled
        });
        std::thread::sleep(Duration::from_millis(300));
        let evs = tracer.events();
        let live = tw_live(&evs);
        let ss = ns.ss(&["state", "time-wait"]).len();
        let tw = ns.sockstat_tw();
        assert_eq!(
            tw_exits(&evs, "reused").len() as i64,
            recycled,
            "reused exits = TWRecycled, round {round}"
        );
        assert_eq!(live, want as i64 - recycled, "round {round}");
        assert_eq!(ss as i64, live, "ss state time-wait, round {round}");
        assert_eq!(tw as i64, live, "sockstat tw, round {round}");
        assert_eq!(tw_exits(&evs, "killed").len(), 0);
        assert_eq!(tw_exits(&evs, "expired").len(), 0);
    }
    // By remote endpoint: all 3000 toward the listener; by local port: one per connection,
    // less those a reuse took again.
    let evs = tracer.events();
    let recycled = tw_exits(&evs, "reused").len();
    let enters: Vec<&Value> = of_type(&evs, "timewait")
        .into_iter()
        .filter(|e| e["event"] == "enter")
        .collect();
    assert_eq!(enters.len(), 3000);
    assert!(
        enters
            .iter()
            .all(|e| e["dport"] == 8096 && e["daddr"] == "127.0.0.1")
    );
    let ports: std::collections::HashSet<u64> = enters.iter().map(|e| u(e, "sport")).collect();
    assert_eq!(ports.len(), 3000 - recycled);
    let cookies: std::collections::HashSet<u64> = enters.iter().map(|e| u(e, "cookie")).collect();
    assert_eq!(cookies.len(), 3000, "each timewait socket its own timeline");
    // Expiry: 60 s after the last round, every one has left.
    tracer.wait_for("expiry", Duration::from_secs(80), |evs| tw_live(evs) == 0);
    let evs = tracer.stop();
    let exits = tw_exits(&evs, "expired");
    assert_eq!(exits.len(), 3000 - recycled);
    for e in &exits {
        // TCP_TIMEWAIT_LEN is 60 s; a timer that far out sits in a coarse timer-wheel level and
        // fires late by up to that level's granularity (4096 jiffies at most), never early.
        let d = u(e, "duration_ns");
        assert!(
            (60_000_000_000..64_200_000_000).contains(&d),
            "time in TIME_WAIT {d} ns"
        );
    }
    assert_eq!(ns.sockstat_tw(), 0);
    assert!(ns.ss(&["state", "time-wait"]).is_empty());
}

/// A namespace deleted with TIME_WAIT sockets in it (a container going away): each ends
/// once, `killed`, and the live count is back to zero. The kernel purges them from a kworker;
/// tcpwatch also ends whatever is left when it sees the namespace gone, without counting the
/// kernel's later records twice.
fn s7_netns_teardown() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    {
        let mut server = ns.peer("tw-server");
        let l = server.ok("listen 127.0.0.1:8099 64");
        server.ok_timeout(&format!("churn {l} 20"));
        tracer.wait_for("20 timewait enters", W, |evs| tw_live(evs) == 20);
        assert_eq!(ns.sockstat_tw(), 20);
    }
    drop(ns);
    tracer.wait_for("every one ended", W, |evs| tw_live(evs) == 0);
    std::thread::sleep(Duration::from_millis(1000));
    let evs = tracer.stop();
    let killed = tw_exits(&evs, "killed");
    let sks: std::collections::HashSet<&str> =
        killed.iter().filter_map(|e| e["sk"].as_str()).collect();
    assert_eq!((killed.len(), sks.len()), (20, 20), "{killed:#?}");
    let others: Vec<&Value> = of_type(&evs, "timewait")
        .into_iter()
        .filter(|e| e["event"] == "exit" && e["reason"] != "killed")
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

/// S7 with a small tcp_max_tw_buckets: the sockets beyond it close without TIME_WAIT and the
/// kernel counts TCPTimeWaitOverflow.
fn s7_timewait_buckets() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "100");
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8097 4096");
    server.ok_timeout(&format!("churn {l} 300"));
    std::thread::sleep(Duration::from_millis(500));
    let evs = tracer.stop();
    assert_eq!(
        tw_live(&evs),
        100,
        "only tcp_max_tw_buckets timewait sockets"
    );
    assert_eq!(ns.sockstat_tw(), 100);
    assert_eq!(ns.counter("TcpExt", "TCPTimeWaitOverflow"), 200);
    // Every client still went FIN_WAIT2 -> CLOSE.
    assert_eq!(
        of_type(&evs, "state")
            .iter()
            .filter(|e| is(e, "FIN_WAIT2", "CLOSE"))
            .count(),
        300
    );
}

/// S9 (orphan): the timewait socket in FIN_WAIT2 substate dies when tcp_fin_timeout expires.
fn s9_orphan_expiry() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_fin_timeout", "2");
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8099 16");
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8099"));
    server.ok(&format!("accept {l}"));
    client.ok(&format!("close {c}"));
    tracer.wait_for("orphan expiry", W, |evs| {
        evs.iter()
            .any(|e| e["type"] == "timewait" && e["event"] == "exit" && e["sport"] == cport)
    });
    let evs = tracer.stop();
    let tw: Vec<&Value> = of_type(&evs, "timewait")
        .into_iter()
        .filter(|e| e["sport"] == cport)
        .collect();
    assert_eq!(tw.len(), 2, "{tw:#?}");
    assert_eq!(
        (tw[0]["event"].as_str(), tw[0]["substate"].as_str()),
        (Some("enter"), Some("FIN_WAIT2"))
    );
    assert_eq!(
        (tw[1]["event"].as_str(), tw[1]["reason"].as_str()),
        (Some("exit"), Some("expired"))
    );
    near(
        "orphaned FIN_WAIT2 lifetime",
        u(tw[1], "duration_ns"),
        2_000_000_000,
        400_000_000,
    );
    assert_eq!(ns.sockstat_tw(), 0);
}
