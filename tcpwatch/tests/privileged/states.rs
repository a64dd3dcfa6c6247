//! State transitions and ownership: SCENARIOS S1, S2, S9, S10, S14, S15, S16 and the
//! fallback hook.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("s1_client_active_close_v4", s1_v4),
    ("s15_client_active_close_v6", s15_v6),
    ("s1_fallback_classic_tracepoint", s1_fallback),
    ("s2_server_closes_first", s2_server_closes_first),
    ("s9_half_close_vs_orphaned_fin_wait2", s9_half_close),
    ("s10_connection_refused", s10_refused),
    (
        "s10_error_after_a_disconnect_names_the_peer_it_had",
        s10_disconnect,
    ),
    ("s14_owners_across_processes", s14_owners),
    (
        "s14_reuseport_children_owned_by_their_member",
        s14_reuseport_children,
    ),
    ("s16_reused_four_tuple_two_timelines", s16_reused_tuple),
];

const W: Duration = Duration::from_secs(10);

fn addr(v6: bool, port: u16) -> String {
    if v6 {
        format!("[::1]:{port}")
    } else {
        format!("127.0.0.1:{port}")
    }
}

fn client_tl(evs: &[Value], lport: u16, dport: u16) -> Vec<&Value> {
    // CLOSE->SYN_SENT happens before the local port is bound; find the socket by its
    // SYN_SENT->ESTABLISHED or SYN_SENT->CLOSE, then take every event with that key.
    let key = of_type(evs, "state")
        .into_iter()
        .find(|e| e["old"] == "SYN_SENT" && e["sport"] == lport && e["dport"] == dport)
        .map(sock_key)
        .unwrap_or_else(|| panic!("no SYN_SENT exit for client port {lport}: {evs:#?}"));
    of_type(evs, "state")
        .into_iter()
        .filter(|e| sock_key(e) == key)
        .collect()
}

fn child_tl(evs: &[Value], lport: u16, rport: u16) -> Vec<&Value> {
    timeline(evs, |e| {
        is(e, "LISTEN", "SYN_RECV") && e["sport"] == lport && e["dport"] == rport
    })
}

fn listener_tl(evs: &[Value], lport: u16) -> Vec<&Value> {
    timeline(evs, |e| is(e, "CLOSE", "LISTEN") && e["sport"] == lport)
}

/// S1: client connects, sends a byte, holds the connection, closes first.
fn s1(v6: bool, extra: &[&str]) {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, extra);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok(&format!("listen {} 16", addr(v6, 8080)));
    let (c, cport) = id_port(&client.ok(&format!("connect {}", addr(v6, 8080))));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    client.ok(&format!("send {c} 1"));
    assert_eq!(server.ok(&format!("recv {a} 1")), "1");
    std::thread::sleep(Duration::from_millis(300));
    client.ok(&format!("close {c}"));
    assert_eq!(server.ok(&format!("recv {a} 1")), "0", "server sees EOF");
    server.ok("sleep 200");
    server.ok(&format!("close {a}"));
    server.ok(&format!("close {l}"));
    tracer.wait_for("the listener's close", W, |evs| {
        evs.iter().any(|e| is(e, "LISTEN", "CLOSE"))
    });
    let evs = tracer.stop();

    let ctl = client_tl(&evs, cport, 8080);
    assert_eq!(
        transitions(&ctl),
        seq(&[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ]),
        "client timeline {ctl:#?}"
    );
    assert_owner(&ctl, &client);
    let stl = child_tl(&evs, 8080, cport);
    assert_eq!(
        transitions(&stl),
        seq(&[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"),
            ("LAST_ACK", "CLOSE"),
        ]),
        "server timeline {stl:#?}"
    );
    assert_owner(&stl, &server);
    let ltl = listener_tl(&evs, 8080);
    assert_eq!(
        transitions(&ltl),
        seq(&[("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")])
    );
    assert_owner(&ltl, &server);

    // Addresses, family and netns on every event of the connection.
    let fam = if v6 { "inet6" } else { "inet" };
    let lo = if v6 { "::1" } else { "127.0.0.1" };
    for e in ctl.iter().skip(1).chain(stl.iter()) {
        assert_eq!(e["family"], fam, "{e}");
        assert_eq!(e["saddr"], lo, "{e}");
        assert_eq!(e["daddr"], lo, "{e}");
        assert_eq!(e["netns"].as_u64(), Some(ns.inode()), "{e}");
    }
    // Time in state: ESTABLISHED lasted at least the 300 ms hold; CLOSE_WAIT at least 200 ms.
    let d = |tl: &[&Value], old: &str| -> u64 {
        tl.iter()
            .find(|e| e["old"] == old)
            .and_then(|e| e["prev_state_ns"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        (300_000_000..5_000_000_000).contains(&d(&ctl, "ESTABLISHED")),
        "{ctl:#?}"
    );
    assert!(
        (200_000_000..5_000_000_000).contains(&d(&stl, "CLOSE_WAIT")),
        "{stl:#?}"
    );
    assert!(d(&ctl, "SYN_SENT") > 0 && d(&ctl, "SYN_SENT") < 1_000_000_000);
    assert!(
        ctl[0]["prev_state_ns"].is_null(),
        "nothing is known before the first transition"
    );
    // The handshake completes in softirq on the server side (on loopback, inside the client's
    // send): the owner must still be the server.
    assert_eq!(stl[0]["softirq"], true, "{}", stl[0]);
}

fn s1_v4() {
    s1(false, &[]);
}

fn s15_v6() {
    s1(true, &[]);
}

/// The classic tracepoint strategy gives the same sequences and owners (without cookies).
fn s1_fallback() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &["--disable-hook", "tp_btf"]);
    assert!(
        tracer
            .stderr()
            .contains("state: tracepoint/sock/inet_sock_set_state"),
        "{}",
        tracer.stderr()
    );
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8080 16");
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8080"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    client.ok(&format!("close {c}"));
    assert_eq!(server.ok(&format!("recv {a} 1")), "0");
    server.ok(&format!("close {a}"));
    tracer.wait_for("server close", W, |evs| {
        evs.iter().any(|e| is(e, "LAST_ACK", "CLOSE"))
    });
    let evs = tracer.stop();
    assert!(
        evs.iter().all(|e| e["type"] != "state" || e["cookie"] == 0),
        "no cookies from the classic tracepoint"
    );
    let ctl = client_tl(&evs, cport, 8080);
    assert_eq!(
        transitions(&ctl),
        seq(&[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ])
    );
    assert_owner(&ctl, &client);
    let stl = child_tl(&evs, 8080, cport);
    assert_eq!(transitions(&stl).len(), 5, "{stl:#?}");
    assert_owner(&stl, &server);
}

/// S2: the server closes first, so TIME_WAIT (FIN_WAIT2 -> CLOSE) lands on the server side.
fn s2_server_closes_first() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8081 16");
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8081"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    server.ok(&format!("close {a}"));
    assert_eq!(client.ok(&format!("recv {c} 1")), "0", "client sees EOF");
    client.ok("sleep 100");
    client.ok(&format!("close {c}"));
    tracer.wait_for("client close", W, |evs| {
        evs.iter().any(|e| is(e, "LAST_ACK", "CLOSE"))
    });
    let evs = tracer.stop();
    let stl = child_tl(&evs, 8081, cport);
    assert_eq!(
        transitions(&stl),
        seq(&[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ])
    );
    assert_owner(&stl, &server);
    let ctl = client_tl(&evs, cport, 8081);
    assert_eq!(
        transitions(&ctl),
        seq(&[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"),
            ("LAST_ACK", "CLOSE"),
        ])
    );
    assert_owner(&ctl, &client);
    assert_eq!(
        ss_state_count(&ns, "time-wait", "sport = :8081"),
        1,
        "the server holds TIME_WAIT"
    );
}

fn ss_state_count(ns: &Netns, state: &str, filter: &str) -> usize {
    ns.ss(&["state", state, filter]).len()
}

/// S9: shutdown(SHUT_WR) keeps a full socket in FIN_WAIT2 until the peer closes; close()
/// orphans it and the full socket ends at once (the rest lives in a timewait socket).
fn s9_half_close() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_fin_timeout", "2");
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8082 16");

    // (a) half-close: the client can still receive after shutdown(SHUT_WR).
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8082"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    client.ok(&format!("shutdown {c} wr"));
    assert_eq!(
        server.ok(&format!("recv {a} 1")),
        "0",
        "server sees the FIN"
    );
    server.ok("sleep 500");
    server.ok(&format!("send {a} 5"));
    assert_eq!(
        client.ok(&format!("recv {c} 5")),
        "5",
        "half-closed client still receives"
    );
    server.ok(&format!("close {a}"));
    client.ok("sleep 100");
    client.ok(&format!("close {c}"));

    // (b) orphaned: close() while the server keeps its end open.
    let (c2, cport2) = id_port(&client.ok("connect 127.0.0.1:8082"));
    let (a2, _) = id_port(&server.ok(&format!("accept {l}")));
    client.ok(&format!("close {c2}"));
    assert_eq!(server.ok(&format!("recv {a2} 1")), "0");
    tracer.wait_for("orphan FIN_WAIT2 end", W, |evs| {
        evs.iter()
            .any(|e| is(e, "FIN_WAIT2", "CLOSE") && e["sport"] == cport2)
    });
    let evs = tracer.stop();

    let ha = client_tl(&evs, cport, 8082);
    assert_eq!(
        transitions(&ha),
        seq(&[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ])
    );
    let fw2 = ha.last().unwrap()["prev_state_ns"].as_u64().unwrap();
    // The server slept 500 ms after reading the FIN; its ACK (which starts FIN_WAIT2) may be
    // delayed by up to TCP_DELACK_MAX (200 ms).
    assert!(
        fw2 >= 300_000_000,
        "half-closed FIN_WAIT2 lasts until the peer's FIN: {fw2} ns"
    );
    let stl = child_tl(&evs, 8082, cport);
    assert_eq!(
        transitions(&stl)[2],
        ("ESTABLISHED".into(), "CLOSE_WAIT".into())
    );

    let hb = client_tl(&evs, cport2, 8082);
    assert_eq!(
        transitions(&hb)[3..],
        seq(&[("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")])[..]
    );
    let fw2b = hb.last().unwrap()["prev_state_ns"].as_u64().unwrap();
    assert!(
        fw2b < 100_000_000,
        "an orphaned FIN_WAIT2 full socket ends at once: {fw2b} ns"
    );
    assert_owner(&hb, &client);
    // The server half still holds its end: CLOSE_WAIT, and the client's orphan lives on as a
    // timewait socket in FIN-WAIT-2 until tcp_fin_timeout.
    assert_eq!(ss_state_count(&ns, "close-wait", "sport = :8082"), 1);
    assert_eq!(ss_state_count(&ns, "fin-wait-2", "dport = :8082"), 1);
    drop(a2);
}

/// S10: connect to a port nobody listens on.
fn s10_refused() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    assert_eq!(client.cmd("connect 127.0.0.1:9"), "err ECONNREFUSED");
    tracer.wait_for("SYN_SENT -> CLOSE", W, |evs| {
        evs.iter().any(|e| is(e, "SYN_SENT", "CLOSE"))
    });
    let evs = tracer.stop();
    let ctl = timeline(&evs, |e| is(e, "CLOSE", "SYN_SENT") && e["dport"] == 9);
    assert_eq!(
        transitions(&ctl),
        seq(&[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")])
    );
    assert_owner(&ctl, &client);
}

/// `connect(AF_UNSPEC)` on an established socket: the kernel moves it to CLOSE, sends a
/// RST, clears the remote port and reports ECONNRESET. The report names the peer the socket
/// had, not `127.0.0.1:0`.
fn s10_disconnect() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8141 8");
    let c = client.ok("connect 127.0.0.1:8141");
    let c = c.split_whitespace().next().unwrap().to_string();
    server.ok(&format!("accept {l}"));
    client.ok(&format!("disconnect {c}"));
    let mine = |e: &&Value| e["comm"] == "tw-client";
    tracer.wait_for("the client's error report", W, |evs| {
        of_type(evs, "error").iter().any(mine)
    });
    let evs = tracer.stop();
    // (The server's side gets the RST: its own ECONNRESET, its endpoints intact.)
    let errs: Vec<&Value> = of_type(&evs, "error").into_iter().filter(mine).collect();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = errs[0];
    assert_eq!(e["error"], "ECONNRESET", "{e:#}");
    assert_eq!(
        (&e["daddr"], &e["dport"]),
        (&Value::from("127.0.0.1"), &Value::from(8141)),
        "{e:#}"
    );
    assert_eq!(e["saddr"], "127.0.0.1", "{e:#}");
    assert_owner(&errs, &client);
}

/// S14: three client processes and one server: every event names the socket's owner, whatever
/// task the kernel happened to run it on.
fn s14_owners() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8083 64");
    let mut clients: Vec<Peer> = (0..3).map(|i| ns.peer(&format!("tw-client{i}"))).collect();
    let mut conns = Vec::new();
    for c in clients.iter_mut() {
        let (id, port) = id_port(&c.ok("connect 127.0.0.1:8083"));
        let (a, _) = id_port(&server.ok(&format!("accept {l}")));
        c.ok(&format!("send {id} 1"));
        conns.push((id, port, a));
    }
    for (c, (id, _, a)) in clients.iter_mut().zip(&conns) {
        assert_eq!(server.ok(&format!("recv {a} 1")), "1");
        c.ok(&format!("close {id}"));
        assert_eq!(server.ok(&format!("recv {a} 1")), "0");
        server.ok(&format!("close {a}"));
    }
    tracer.wait_for("three server closes", W, |evs| {
        evs.iter().filter(|e| is(e, "LAST_ACK", "CLOSE")).count() == 3
    });
    let evs = tracer.stop();
    let mut softirq_seen = 0;
    for (c, (_, port, _)) in clients.iter().zip(&conns) {
        let ctl = client_tl(&evs, *port, 8083);
        assert_eq!(ctl.len(), 5, "{ctl:#?}");
        assert_owner(&ctl, c);
        let stl = child_tl(&evs, 8083, *port);
        assert_eq!(stl.len(), 5, "{stl:#?}");
        assert_owner(&stl, &server);
        softirq_seen += ctl
            .iter()
            .chain(stl.iter())
            .filter(|e| e["softirq"] == true)
            .count();
    }
    assert!(
        softirq_seen >= 6,
        "softirq-context events were attributed (seen {softirq_seen})"
    );
    for e in of_type(&evs, "state") {
        assert!(!e["pid"].is_null(), "every event has an owner: {e}");
    }
}

/// S14 with SO_REUSEPORT: two processes each listen on the same address and the kernel picks
/// a member per connection by 4-tuple hash. Each child, born in softirq, must carry the owner
/// of the member that took it (as `ss -tnp` shows once accepted), not whoever listened last.
fn s14_reuseport_children() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut a = ns.peer("tw-rp-a");
    let mut b = ns.peer("tw-rp-b");
    let la = a.ok("listen_rp 127.0.0.1:8086 64");
    let lb = b.ok("listen_rp 127.0.0.1:8086 64");
    let mut client = ns.peer("tw-client");
    // 16 connections: both members get some but with probability 2^-15.
    let ports: Vec<u16> = (0..16)
        .map(|_| id_port(&client.ok("connect 127.0.0.1:8086")).1)
        .collect();
    // Each member accepts what its own queue holds (Recv-Q of its listener).
    for (p, l) in [(&mut a, &la), (&mut b, &lb)] {
        let queued = ns.listener_queue(8086, p);
        assert!(queued > 0, "both members took connections");
        for _ in 0..queued {
            p.ok(&format!("accept {l}"));
        }
    }
    tracer.wait_for("16 children established", W, |evs| {
        evs.iter()
            .filter(|e| is(e, "SYN_RECV", "ESTABLISHED") && e["sport"] == 8086)
            .count()
            == 16
    });
    let evs = tracer.stop();
    let est = ns.exec(&["ss", "-tnpH", "state", "established", "sport", "= :8086"]);
    for port in ports {
        let line = est
            .lines()
            .find(|l| l.contains(&format!("127.0.0.1:{port} ")))
            .unwrap_or_else(|| panic!("child for client port {port} not in ss: {est}"));
        let owner = [&a, &b]
            .into_iter()
            .find(|p| line.contains(&format!("pid={},", p.pid)))
            .unwrap_or_else(|| panic!("child owned by neither member: {line}"));
        let tl = child_tl(&evs, 8086, port);
        assert_eq!(
            transitions(&tl),
            seq(&[("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")]),
            "{tl:#?}"
        );
        assert_owner(&tl, owner);
        for e in &tl {
            assert_eq!(e["owner_source"], "listener", "{e}");
        }
    }
}

/// S16: the same 4-tuple used twice (SO_REUSEADDR + tcp_tw_reuse): two timelines, never merged.
fn s16_reused_tuple() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8084 16");
    let mut ports = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // connect() from a bound port takes a TIME_WAIT tuple that has timestamps at once
            // (tcp_twsk_unique without a twp); a port it picks itself needs tcp_tw_reuse and
            // a second of age. The pause keeps this true for either path.
            client.ok("sleep 1100");
            assert_eq!(ss_state_count(&ns, "time-wait", "sport = :40001"), 1);
        }
        let (c, p) = id_port(&client.ok("connect 127.0.0.1:8084 127.0.0.1:40001"));
        let (a, _) = id_port(&server.ok(&format!("accept {l}")));
        client.ok(&format!("close {c}"));
        assert_eq!(server.ok(&format!("recv {a} 1")), "0");
        server.ok(&format!("close {a}"));
        ports.push(p);
    }
    assert_eq!(ports, vec![40001, 40001]);
    tracer.wait_for("two server closes and three timewait events", W, |evs| {
        evs.iter().filter(|e| is(e, "LAST_ACK", "CLOSE")).count() == 2
            && evs
                .iter()
                .filter(|e| e["type"] == "timewait" && e["event"] != "rearm" && e["sport"] == 40001)
                .count()
                == 3
    });
    let evs = tracer.stop();
    let starts: Vec<u64> = of_type(&evs, "state")
        .into_iter()
        .filter(|e| e["old"] == "SYN_SENT" && e["sport"] == 40001)
        .map(sock_key)
        .collect();
    assert_eq!(starts.len(), 2);
    assert_ne!(starts[0], starts[1], "a reused 4-tuple is a new socket");
    for key in starts {
        let tl: Vec<&Value> = of_type(&evs, "state")
            .into_iter()
            .filter(|e| sock_key(e) == key)
            .collect();
        assert_eq!(
            transitions(&tl),
            seq(&[
                ("CLOSE", "SYN_SENT"),
                ("SYN_SENT", "ESTABLISHED"),
                ("ESTABLISHED", "FIN_WAIT1"),
                ("FIN_WAIT1", "FIN_WAIT2"),
                ("FIN_WAIT2", "CLOSE"),
            ])
        );
    }
    let children: Vec<&Value> = of_type(&evs, "state")
        .into_iter()
        .filter(|e| is(e, "LISTEN", "SYN_RECV"))
        .collect();
    assert_eq!(children.len(), 2);
    assert_ne!(sock_key(children[0]), sock_key(children[1]));
    // The first socket's timewait left by that reuse; the second entered its own, often in
    // the very memory the first was freed from: never mistaken for a re-arm.
    let closers: Vec<&Value> = of_type(&evs, "state")
        .into_iter()
        .filter(|e| is(e, "FIN_WAIT2", "CLOSE") && e["sport"] == 40001)
        .collect();
    // Re-arms (the server's FIN) show with fentry always, with the timer hooks now and then.
    let mut tw: Vec<&Value> = of_type(&evs, "timewait")
        .into_iter()
        .filter(|e| e["sport"] == 40001 && e["event"] != "rearm")
        .collect();
    tw.sort_by_key(|e| e["ts_ns"].as_u64());
    let seen: Vec<(&str, &str, &Value)> = tw
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("-"),
                &e["cookie"],
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("enter", "-", &closers[0]["cookie"]),
            ("exit", "reused", &closers[0]["cookie"]),
            ("enter", "-", &closers[1]["cookie"]),
        ]
    );
    assert_eq!(
        tw[1]["pid"].as_u64(),
        Some(client.pid as u64),
        "the client owns the timewait socket it reused"
    );
    assert_eq!(ns.counter("TcpExt", "TWRecycled"), 1);
    assert_eq!(ns.sockstat_tw(), 1);
}
