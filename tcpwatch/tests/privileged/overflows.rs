//! Listener overflows: SCENARIOS S5 (accept queue, at SYN and at the final ACK, with
//! tcp_abort_on_overflow, two listeners at once) and S6 (SYN queue, drops and cookies), each
//! against the namespace's ListenDrops/ListenOverflows/TCPReqQFull* counters.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("s5_accept_queue_overflow_at_syn", s5_accept_overflow_syn),
    (
        "s5_accept_queue_overflow_at_final_ack",
        s5_accept_overflow_ack,
    ),
    ("s5_abort_on_overflow_resets", s5_abort_on_overflow),
    (
        "s5_two_listeners_each_their_own_overflows",
        s5_two_listeners,
    ),
    ("s6_syn_queue_overflow_drops", s6_syn_queue_drops),
    ("s6_syn_queue_overflow_cookies", s6_syn_queue_cookies),
];

const W: Duration = Duration::from_secs(15);

fn overflows<'a>(evs: &'a [Value], source: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["type"] == "overflow" && e["source"] == source)
        .collect()
}

/// S5, SYN time: listen(2) never accepting; the kernel accepts backlog + 1 = 3 handshakes, the
/// other SYNs are dropped (no event exists: counted by the listener's drop counter).
fn s5_accept_overflow_syn() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8092 2");
    server.ok("listen 127.0.0.1:8192 2");
    let tracer = Tracer::start(&ns, &[]);
    let (lo0, ld0) = (
        ns.counter("TcpExt", "ListenOverflows"),
        ns.counter("TcpExt", "ListenDrops"),
    );
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8092 6");
    // The 3 refused clients retransmit their SYN once (1 s) and give up at 3 s.
    client.ok("sleep 3500");
    std::thread::sleep(Duration::from_millis(600));
    let evs = tracer.stop();
    let (lo, ld) = (
        ns.counter("TcpExt", "ListenOverflows") - lo0,
        ns.counter("TcpExt", "ListenDrops") - ld0,
    );
    assert!(lo >= 3, "ListenOverflows {lo}");
    let ov = overflows(&evs, "counters");
    assert!(!ov.is_empty(), "{evs:#?}");
    let total: u64 = ov.iter().map(|e| u(e, "count")).sum();
    assert_eq!(total, ld, "per-listener drops agree with ListenDrops");
    assert_eq!(ld, lo, "all drops are accept-queue overflows");
    for e in &ov {
        assert_eq!(e["listener"]["port"], 8092, "only the overflowing listener");
        assert_eq!(e["queue"], "accept");
        assert_eq!(e["action"], "dropped");
        assert_eq!(
            (u(e, "len"), u(e, "max")),
            (3, 2),
            "queue at its limit: the kernel takes backlog + 1"
        );
        assert_eq!(e["pid"].as_u64(), Some(server.pid as u64));
    }
    // What the refused clients saw: SYN retransmits.
    assert!(retransmits(&evs, "syn").len() >= 3, "{evs:#?}");
}

/// S5, final-ACK time: two handshakes are held (their final ACKs dropped) while three others
/// fill the accept queue; once the ACKs pass, the kernel drops them with TCP_LISTEN_OVERFLOW.
fn s5_final_ack(abort: bool) -> (Vec<Value>, Netns, Peer, Peer) {
    held_final_acks(abort, false)
}

/// The final-ACK case; `syn_refusing`: also a second listener, 8094 (listen(2)), that six
/// clients reach at once, so it refuses SYNs, and refuses them again when they are retried
/// (1 s, `tcp_syn_retries` 1) as 8093 overflows at the final ACK.
fn held_final_acks(abort: bool, syn_refusing: bool) -> (Vec<Value>, Netns, Peer, Peer) {
    let ns = Netns::new();
    // One SYN-ACK retransmit (at 1 s) draws the held ACKs again; a second (at 3 s) would
    // draw more overflows while the test reads ListenDrops.
    ns.sysctl("net.ipv4.tcp_synack_retries", "1");
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    // Refused SYNs are retried once (at 1 s): with linear timeouts a second retry at 2 s
    // would land while the test stops the tracer and reads ListenDrops.
    ns.sysctl("net.ipv4.tcp_syn_linear_timeouts", "0");
    ns.sysctl(
        "net.ipv4.tcp_abort_on_overflow",
        if abort { "1" } else { "0" },
    );
    ns.nft("table inet tw {\n chain in {\n  type filter hook input priority -10;\n  tcp dport 8093 tcp sport { 41001, 41002 } tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n");
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8093 2");
    if syn_refusing {
        server.ok("listen 127.0.0.1:8094 2");
    }
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8093 2 41001");
    client.ok("sleep 200");
    client.ok("connect_nb 127.0.0.1:8093 3");
    if syn_refusing {
        client.ok("connect_nb 127.0.0.1:8094 6");
    }
    client.ok("sleep 300");
    ns.exec(&["nft", "delete", "table", "inet", "tw"]);
    // The server's SYN-ACK retransmit (1 s after the SYN) draws the held ACKs again.
    tracer.wait_for("overflow at the final ACK", W, |evs| {
        !overflows(evs, "kfree_skb").is_empty()
    });
    // (8094's retried SYNs are refused at about the same time.)
    std::thread::sleep(Duration::from_millis(if syn_refusing { 1200 } else { 500 }));
    (tracer.stop(), ns, server, client)
}

/// Both overflow paths at once, on two listeners of one namespace: 8093's held handshakes
/// overflow at the final ACK when its SYN-ACK retransmit (1 s) draws them again, while 8094
/// refuses SYNs, and again their retransmits (1 s). Each listener gets its own drops, once.
fn s5_two_listeners() {
    let (evs, ns, _server, _client) = held_final_acks(false, true);
    let ld = ns.counter("TcpExt", "ListenDrops");
    let on = |src: &str, port: u64| -> u64 {
        overflows(&evs, src)
            .iter()
            .filter(|e| e["listener"]["port"] == port)
            .map(|e| u(e, "count"))
            .sum()
    };
    let (c93, c94, k93) = (
        on("counters", 8093),
        on("counters", 8094),
        on("kfree_skb", 8093),
    );
    let brief: Vec<String> = overflows(&evs, "counters")
        .iter()
        .map(|e| {
            format!(
                "{}@{} {}x{}",
                e["listener"]["port"], e["ts_ns"], e["queue"], e["count"]
            )
        })
        .collect();
    assert!(k93 > 0 && c94 >= 3, "{brief:?}");
    assert_eq!(c93 + c94, ld, "ListenDrops: {brief:?}");
    assert_eq!(c93, k93, "8093 dropped only final ACKs: {brief:?}");
    assert!(on("kfree_skb", 8094) == 0);
}

/// The listener's own counter counts a final-ACK overflow twice; tcpwatch counts it once.
fn assert_overflows_are_listen_drops(evs: &[Value], ns: &Netns) {
    let ld = ns.counter("TcpExt", "ListenDrops");
    let counted: u64 = overflows(evs, "counters")
        .iter()
        .map(|e| u(e, "count"))
        .sum();
    assert!(ld > 0);
    assert_eq!(counted, ld, "overflows agree with ListenDrops: {evs:#?}");
}

fn s5_accept_overflow_ack() {
    let (evs, ns, server, _client) = s5_final_ack(false);
    assert_overflows_are_listen_drops(&evs, &ns);
    let ov = overflows(&evs, "kfree_skb");
    for e in &ov {
        assert_eq!(e["listener"]["port"], 8093);
        assert!(
            [41001, 41002].contains(&u(e, "dport")),
            "the held clients: {e}"
        );
        assert_eq!(e["queue"], "accept");
        assert_eq!((u(e, "len"), u(e, "max")), (3, 2), "{e}");
        assert_eq!(e["pid"].as_u64(), Some(server.pid as u64));
    }
    assert!(
        with(&evs, "reset", "direction", "sent").is_empty(),
        "tcp_abort_on_overflow=0 sends no RST"
    );
}

/// S5 with tcp_abort_on_overflow=1: the server answers the overflowing final ACKs with RSTs.
fn s5_abort_on_overflow() {
    let (evs, ns, _server, client) = s5_final_ack(true);
    assert_overflows_are_listen_drops(&evs, &ns);
    let sent = with(&evs, "reset", "direction", "sent");
    assert!(!sent.is_empty(), "{evs:#?}");
    for e in &sent {
        assert_eq!(e["sport"], 8093, "{e}");
        assert!([41001, 41002].contains(&u(e, "dport")), "{e}");
    }
    let recv = with(&evs, "reset", "direction", "received");
    assert!(
        recv.iter().any(|e| [41001, 41002].contains(&u(e, "sport"))),
        "the client gets the RST: {evs:#?}"
    );
    for e in recv {
        assert_eq!(e["pid"].as_u64(), Some(client.pid as u64));
    }
}

/// S6: final ACKs lost, so every handshake stays a request in the SYN queue of listen(4).
fn s6_syn_queue(cookies: bool) -> (Vec<Value>, Netns, Peer) {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syncookies", if cookies { "1" } else { "0" });
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    ns.nft(&drop_rule(
        "tcp dport 8095 tcp flags & (syn | ack | fin | rst) == ack",
    ));
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8095 4");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8095 12");
    // The refused SYNs are retried at 1 s and 2 s (linear timeouts), given up at 3 s.
    client.ok("sleep 3300");
    std::thread::sleep(Duration::from_millis(600));
    (tracer.stop(), ns, server)
}

fn s6_syn_queue_drops() {
    let (evs, ns, server) = s6_syn_queue(false);
    let drop = ns.counter("TcpExt", "TCPReqQFullDrop");
    assert!(drop > 0);
    let ov = overflows(&evs, "counters");
    let syn: Vec<&&Value> = ov
        .iter()
        .filter(|e| e["queue"] == "syn" && e["action"] == "dropped")
        .collect();
    let total: u64 = syn.iter().map(|e| u(e, "count")).sum();
    assert_eq!(
        total, drop,
        "SYN-queue drops agree with TCPReqQFullDrop: {ov:#?}"
    );
    assert_eq!(ns.counter("TcpExt", "ListenDrops"), drop);
    for e in &syn {
        assert_eq!(e["listener"]["port"], 8095);
        assert_eq!(e["pid"].as_u64(), Some(server.pid as u64));
        // The kernel refuses a request once qlen >= the backlog, so it holds backlog + 1.
        assert!(u(e, "len") >= 4, "SYN queue at its limit: {e}");
    }
    assert!(ov.iter().all(|e| e["action"] != "cookies"));
}

fn s6_syn_queue_cookies() {
    let (evs, ns, _server) = s6_syn_queue(true);
    let sent = ns.counter("TcpExt", "SyncookiesSent");
    assert!(sent > 0);
    assert_eq!(ns.counter("TcpExt", "TCPReqQFullDoCookies"), sent);
    assert_eq!(
        ns.counter("TcpExt", "TCPReqQFullDrop"),
        0,
        "cookies instead of drops"
    );
    let ov = overflows(&evs, "counters");
    let cookies: u64 = ov
        .iter()
        .filter(|e| e["action"] == "cookies")
        .map(|e| u(e, "count"))
        .sum();
    assert_eq!(cookies, sent, "agrees with SyncookiesSent: {ov:#?}");
    assert!(
        ov.iter()
            .all(|e| e["listener"]["port"] == 8095 && e["queue"] == "syn")
    );
    assert!(ov.iter().all(|e| e["action"] != "dropped"), "{ov:#?}");
}
