//! Retransmits, resets, errors, listener overflows and TIME_WAIT: SCENARIOS S1 (TIME_WAIT
//! phase), S3, S4, S5, S6, S7, S8, S11, S12, S13, each also checked against the namespace's own
//! kernel counters over the same window. Expected timings are derived from the kernel's
//! documented behaviour (initial RTO 1 s for SYNs, RTO_MIN 200 ms on loopback, exponential
//! backoff), with tolerances for scheduling.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("s1_timewait_enter_and_rearm", s1_timewait),
    ("s3_syn_lost_linear_timeouts", s3_syn_lost_linear),
    ("s3_syn_lost_exponential", s3_syn_lost_exponential),
    ("s4_synack_retransmits_per_listener", s4_synack),
    (
        "s4_synack_then_data_retransmits_count_once",
        s4_synack_then_data,
    ),
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
    (
        "s7_timewait_pileup_matches_ss_and_sockstat",
        s7_timewait_pileup,
    ),
    ("s7_timewait_bucket_overflow", s7_timewait_buckets),
    ("s7_timewait_killed_by_netns_teardown", s7_netns_teardown),
    ("s8_close_wait_leak_owner", s8_close_wait),
    ("s9_orphaned_fin_wait2_expires", s9_orphan_expiry),
    ("s10_refused_resets_and_error", s10_refused_resets),
    (
        "s11_data_retransmits_backoff_and_abort",
        s11_data_retransmits,
    ),
    (
        "s11_bulk_loss_segments_equal_retranssegs",
        s11_bulk_loss_segments,
    ),
    ("s12_fin_retransmits_both_sides", s12_fin_lost),
    ("s13_keepalive_abort", s13_keepalive),
];

const W: Duration = Duration::from_secs(15);

fn id_port(reply: &str) -> (String, u16) {
    let mut it = reply.split_whitespace();
    (
        it.next().unwrap().to_string(),
        it.next().unwrap().parse().unwrap(),
    )
}

fn u(e: &Value, k: &str) -> u64 {
    e[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {e}"))
}

/// Retransmits the kernel made (attempts it gave up before sending have `segs` 0).
fn retransmits<'a>(evs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["type"] == "retransmit" && e["kind"] == kind && e["segs"] != 0)
        .collect()
}

/// S4 then S11 on the accepted child: its SYN-ACK was retransmitted before the handshake
/// completed (the kernel adds those to the child's own retransmit total), then its data is.
/// Every segment is counted once: SYN-ACK events + data segments = RetransSegs.
fn s4_synack_then_data() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_early_retrans", "0");
    // The client's final ACK (and anything else it sends that is only ACK) is lost.
    ns.nft(&drop_rule(
        "tcp dport 8103 tcp flags & (syn | ack | fin | rst) == ack",
    ));
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8103 16");
    let tracer = Tracer::start(&ns, &["--port", "8103"]);
    let before = ns.counter("Tcp", "RetransSegs");
    let mut client = ns.peer("tw-client");
    let (c, _) = id_port(&client.ok("connect 127.0.0.1:8103"));
    tracer.wait_for("a SYN-ACK retransmit", W, |evs| {
        !retransmits(evs, "synack").is_empty()
    });
    ns.exec(&["nft", "delete", "table", "inet", "tw"]);
    // The client's data acknowledges the SYN-ACK: the child is established.
    client.ok(&format!("send {c} 5"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    ns.nft(&drop_rule("tcp sport 8103"));
    server.ok(&format!("send {a} 100"));
    // A retransmitted handshake leaves the 3 s fallback RTO: the next one is 6 s later.
    tracer.wait_for("a data retransmit", W, |evs| {
        !retransmits(evs, "data").is_empty()
    });
    let evs = tracer.stop();
    let kernel = ns.counter("Tcp", "RetransSegs") - before;
    let brief: Vec<String> = of_type(&evs, "retransmit")
        .iter()
        .map(|e| format!("{} #{} segs {}", e["kind"], e["nth"], e["segs"]))
        .collect();
    let data = retransmits(&evs, "data");
    assert!(data.iter().all(|e| e["sport"] == 8103), "{brief:?}");
    assert_eq!(
        u(data[0], "nth"),
        1,
        "the child's first retransmit: {brief:?}"
    );
    assert_eq!(
        retransmitted_segments(&evs),
        kernel,
        "RetransSegs +{kernel}; retransmits: {brief:?}"
    );
}

/// Segments of every retransmit the kernel made: what it adds to `RetransSegs`.
fn retransmitted_segments(evs: &[Value]) -> u64 {
    of_type(evs, "retransmit")
        .iter()
        .map(|e| u(e, "segs"))
        .sum()
}

/// An nft table dropping what `rule` matches on input (loopback traffic passes input once).
fn drop_rule(rule: &str) -> String {
    format!(
        "table inet tw {{\n chain in {{\n  type filter hook input priority -10;\n  {rule} drop\n }}\n}}\n"
    )
}

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

/// The SYN retransmit schedule the kernel documents: the RTO starts at 1 s
/// (TCP_TIMEOUT_INIT) and stays there while the retransmit count does not exceed
/// tcp_syn_linear_timeouts, then doubles; the attempt gives up once the time an exponential
/// schedule of tcp_syn_retries would take has passed, (2^(retries+1) - 1) s.
fn syn_schedule(retries: u32, linear: u32) -> (Vec<f64>, f64) {
    let give_up = ((1u64 << (retries + 1)) - 1) as f64;
    let (mut t, mut rto, mut out) = (0.0, 1.0, Vec::new());
    for i in 1.. {
        t += rto;
        if t >= give_up {
            break;
        }
        out.push(t);
        if i > linear {
            rto *= 2.0;
        }
    }
    (out, give_up)
}

/// S3: SYNs dropped: each retransmit at the time the kernel's schedule says, then ETIMEDOUT.
fn s3_syn_lost(linear: u32) {
    let (times, give_up) = syn_schedule(2, linear);
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "2");
    ns.sysctl("net.ipv4.tcp_syn_linear_timeouts", &linear.to_string());
    ns.nft(&drop_rule("tcp dport 8090 tcp flags & (syn | ack) == syn"));
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8090 16");
    let before = ns.counter("TcpExt", "TCPSynRetrans");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    let t0 = std::time::Instant::now();
    assert_eq!(
        client.cmd_timeout("connect 127.0.0.1:8090", Duration::from_secs(30)),
        "err ETIMEDOUT"
    );
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        (elapsed - give_up).abs() < 0.5,
        "connect failed after {elapsed:.2} s, expected {give_up}"
    );
    tracer.wait_for("SYN_SENT -> CLOSE", W, |evs| {
        evs.iter().any(|e| is(e, "SYN_SENT", "CLOSE"))
    });
    let evs = tracer.stop();
    let syn = retransmits(&evs, "syn");
    // Every retransmit record (attempts not sent included) and the kernel's count, to tell a
    // missed event from a kernel that retransmitted differently.
    let brief: Vec<String> = of_type(&evs, "retransmit")
        .iter()
        .map(|e| {
            format!(
                "{} #{} +{}ns segs {} err {}",
                e["kind"], e["nth"], e["interval_ns"], e["segs"], e["err"]
            )
        })
        .collect();
    assert_eq!(
        syn.len(),
        times.len(),
        "schedule {times:?}: {brief:?}; TCPSynRetrans +{}; loss: {:?}",
        ns.counter("TcpExt", "TCPSynRetrans") - before,
        of_type(&evs, "loss")
    );
    let key = sock_key(syn[0]);
    for (i, e) in syn.iter().enumerate() {
        assert_eq!(u(e, "nth"), i as u64 + 1);
        assert_eq!(e["state"], "SYN_SENT");
        assert_eq!(sock_key(e), key, "one socket");
        assert_eq!(e["pid"].as_u64(), Some(client.pid as u64));
        if i > 0 {
            let want = ((times[i] - times[i - 1]) * 1e9) as u64;
            near(
                &format!("SYN retransmit {} interval", i + 1),
                u(e, "interval_ns"),
                want,
                150_000_000,
            );
        }
    }
    let tl = timeline(&evs, |e| sock_key(e) == key && e["type"] == "state");
    assert_eq!(
        transitions(&tl),
        seq(&[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")])
    );
    let err = with(&evs, "error", "error", "ETIMEDOUT");
    assert_eq!(err.len(), 1, "{evs:#?}");
    assert_eq!(sock_key(err[0]), key);
    assert_eq!(
        ns.counter("TcpExt", "TCPSynRetrans") - before,
        syn.len() as u64,
        "TCPSynRetrans agrees"
    );
}

fn s3_syn_lost_linear() {
    // Retransmits at 1, 2, 3, 4, 5 s (the RTO doubles only after the 4 linear ones have been
    // exceeded), give up at 7 s: more retransmits than tcp_syn_retries.
    assert_eq!(syn_schedule(2, 4), (vec![1.0, 2.0, 3.0, 4.0, 5.0], 7.0));
    s3_syn_lost(4);
}

fn s3_syn_lost_exponential() {
    // Classic doubling: retransmits at 1 s and 3 s, give up at 7 s.
    assert_eq!(syn_schedule(2, 0), (vec![1.0, 3.0], 7.0));
    s3_syn_lost(0);
}

/// S4: the client's final ACK is lost, so the server retransmits its SYN-ACK: attributed to
/// the listener (address, owner), with the request in the listener's SYN queue.
fn s4_synack() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_synack_retries", "2");
    ns.nft(&drop_rule(
        "tcp dport 8091 tcp flags & (syn | ack | fin | rst) == ack",
    ));
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8091 16");
    server.ok("listen 127.0.0.1:8191 16");
    let before = ns.counter("TcpExt", "TCPSynRetrans");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    let (_c, cport) = id_port(&client.ok("connect 127.0.0.1:8091"));
    // SYN-ACK retransmits after 1 s and 1+2 s; the request then times out after 4 s more.
    tracer.wait_for("two SYN-ACK retransmits", W, |evs| {
        retransmits(evs, "synack").len() >= 2
    });
    let evs = tracer.stop();
    let sa = retransmits(&evs, "synack");
    assert_eq!(sa.len(), 2, "{sa:#?}");
    for (i, e) in sa.iter().enumerate() {
        assert_eq!(u(e, "nth"), i as u64 + 1);
        assert_eq!(e["listener"]["addr"], "127.0.0.1");
        assert_eq!(
            e["listener"]["port"], 8091,
            "the listener, not the other one"
        );
        assert_eq!(
            e["dport"].as_u64(),
            Some(cport as u64),
            "the request's peer"
        );
        assert_eq!(
            e["pid"].as_u64(),
            Some(server.pid as u64),
            "the listener's owner"
        );
        assert_eq!(e["comm"], "tw-server");
        assert_eq!(u(e, "syn_queue"), 1, "the request sits in the SYN queue");
        assert_eq!(u(e, "accept_queue"), 0);
    }
    near(
        "SYN-ACK backoff",
        u(sa[1], "interval_ns"),
        2_000_000_000,
        200_000_000,
    );
    assert_eq!(
        ns.counter("TcpExt", "TCPSynRetrans") - before,
        2,
        "TCPSynRetrans agrees"
    );
    assert!(
        retransmits(&evs, "syn").is_empty(),
        "the client got its SYN-ACK"
    );
}

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

/// S8: the peer closes, the application never calls close(): CLOSE_WAIT, owned by it.
fn s8_close_wait() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-leaky");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8098 16");
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8098"));
    server.ok(&format!("accept {l}"));
    client.ok(&format!("close {c}"));
    tracer.wait_for("CLOSE_WAIT", W, |evs| {
        evs.iter().any(|e| is(e, "ESTABLISHED", "CLOSE_WAIT"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let evs = tracer.stop();
    let stl = timeline(&evs, |e| is(e, "LISTEN", "SYN_RECV") && e["dport"] == cport);
    assert_eq!(
        transitions(&stl),
        seq(&[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT")
        ]),
        "stuck in CLOSE_WAIT"
    );
    assert_owner(&stl, &server);
    let ss = ns.exec(&["ss", "-tanpH", "state", "close-wait"]);
    assert!(
        ss.contains(&format!("pid={}", server.pid)) && ss.contains("tw-leaky"),
        "ss agrees: {ss}"
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

/// S10: the refused client receives a RST and reports ECONNREFUSED; the listener-less port
/// sends it (no socket: no owner).
fn s10_refused_resets() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    assert_eq!(client.cmd("connect 127.0.0.1:9"), "err ECONNREFUSED");
    tracer.wait_for("the error", W, |evs| {
        !with(evs, "error", "error", "ECONNREFUSED").is_empty()
    });
    let evs = tracer.stop();
    let sent = with(&evs, "reset", "direction", "sent");
    assert_eq!(sent.len(), 1, "{evs:#?}");
    assert_eq!(sent[0]["sport"], 9);
    assert!(sent[0]["pid"].is_null(), "nobody owns a closed port");
    assert_eq!(sent[0]["reason"], "NO_SOCKET");
    let recv = with(&evs, "reset", "direction", "received");
    assert_eq!(recv.len(), 1);
    assert_eq!(recv[0]["state"], "SYN_SENT");
    assert_eq!(recv[0]["pid"].as_u64(), Some(client.pid as u64));
    let err = with(&evs, "error", "error", "ECONNREFUSED");
    assert_eq!(err.len(), 1);
    assert_eq!(
        sock_key(err[0]),
        sock_key(recv[0]),
        "joined to the client socket"
    );
}

/// S11: everything dropped after the handshake while the client keeps writing: data
/// retransmits with RTO doubling from 200 ms, abort after tcp_retries2 with ETIMEDOUT.
fn s11_data_retransmits() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_retries2", "3");
    // No tail-loss probe: every retransmission is then an RTO one (and traced).
    ns.sysctl("net.ipv4.tcp_early_retrans", "0");
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8100 16");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    let (c, _cport) = id_port(&client.ok("connect 127.0.0.1:8100"));
    server.ok(&format!("accept {l}"));
    let before = ns.counter("Tcp", "RetransSegs");
    let timeouts = ns.counter("TcpExt", "TCPTimeouts");
    ns.nft(&drop_rule("tcp dport 8100"));
    client.ok(&format!("send {c} 100"));
    tracer.wait_for("the abort", Duration::from_secs(30), |evs| {
        !with(evs, "error", "error", "ETIMEDOUT").is_empty()
    });
    let evs = tracer.stop();
    let data = retransmits(&evs, "data");
    assert!(data.len() >= 3, "{data:#?}");
    for (i, e) in data.iter().enumerate() {
        assert_eq!(u(e, "nth"), i as u64 + 1);
        assert_eq!(e["pid"].as_u64(), Some(client.pid as u64));
    }
    // Intervals between retransmits double: 400 ms, 800 ms, ...
    assert!(
        data[0]["interval_ns"].is_null(),
        "nothing before the first retransmit"
    );
    let brief: Vec<String> = of_type(&evs, "retransmit")
        .iter()
        .map(|e| {
            format!(
                "{}:{} #{} +{}ns segs {} err {}",
                e["sport"], e["dport"], e["nth"], e["interval_ns"], e["segs"], e["err"]
            )
        })
        .chain(of_type(&evs, "loss").iter().map(|e| e.to_string()))
        .collect();
    for w in data[1..].windows(2) {
        let (a, b) = (u(w[0], "interval_ns").max(1), u(w[1], "interval_ns"));
        let r = b as f64 / a as f64;
        assert!(
            (1.6..2.4).contains(&r),
            "backoff ratio {r:.2}: {brief:?}; TCPTimeouts +{}",
            ns.counter("TcpExt", "TCPTimeouts") - timeouts
        );
    }
    near(
        "second interval",
        u(data[1], "interval_ns"),
        400_000_000,
        120_000_000,
    );
    let err = with(&evs, "error", "error", "ETIMEDOUT");
    assert_eq!(err.len(), 1);
    assert_eq!(sock_key(err[0]), sock_key(data[0]));
    assert!(
        of_type(&evs, "state")
            .iter()
            .any(|e| is(e, "ESTABLISHED", "CLOSE") && sock_key(e) == sock_key(data[0])),
        "aborted"
    );
    assert!(data.iter().all(|e| u(e, "segs") == 1), "{data:#?}");
    // Exact, unless tcpwatch itself reported program runs the kernel skipped (a tp_btf
    // program does not run while it is already running on that CPU): then the shortfall
    // must be no more than what it reported. Seen twice in CI as 3 of 4; the lines say why.
    let (kernel, ours) = (
        ns.counter("Tcp", "RetransSegs") - before,
        retransmitted_segments(&evs),
    );
    let skipped = of_type(&evs, "loss")
        .last()
        .map(|e| u(&e["total"], "kernel_skipped"))
        .unwrap_or(0);
    assert!(
        ours == kernel || (ours < kernel && kernel - ours <= skipped),
        "RetransSegs +{kernel}, retransmit events carry {ours} (kernel-skipped runs reported: \
         {skipped}): {brief:?}"
    );
}

/// S11 under loss: a bulk transfer over a 1500-byte MTU loses one packet in 25.
/// Recovery retransmits runs of segments in one skb, so events and segments differ; their
/// segments are exactly what the kernel counted.
fn s11_bulk_loss_segments() {
    let ns = Netns::new();
    ns.exec(&["ip", "link", "set", "lo", "mtu", "1500"]);
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8102 16");
    let tracer = Tracer::start(&ns, &["--port", "8102"]);
    let mut client = ns.peer("tw-client");
    let (c, _) = id_port(&client.ok("connect 127.0.0.1:8102"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    let before = ns.counter("Tcp", "RetransSegs");
    // Every 25th packet, not a random 4 %: a random draw of a few losses can come up short.
    ns.nft(&drop_rule("tcp dport 8102 numgen inc mod 25 == 0"));
    const N: usize = 8 << 20;
    let reader = std::thread::spawn(move || {
        let got = server.ok(&format!("recv {a} {N}"));
        (server, got)
    });
    client.ok(&format!("send {c} {N}"));
    let (_server, got) = reader.join().expect("reader");
    assert_eq!(got, N.to_string());
    ns.exec(&["nft", "delete", "table", "inet", "tw"]);
    std::thread::sleep(Duration::from_millis(300));
    let evs = tracer.stop();
    let kernel = ns.counter("Tcp", "RetransSegs") - before;
    let rt = of_type(&evs, "retransmit");
    let segs = retransmitted_segments(&evs);
    let loss: Vec<&Value> = of_type(&evs, "loss");
    assert!(rt.len() >= 3, "{} retransmits", rt.len());
    // A lost packet here is a whole GSO skb of up to 44 segments, resent as one skb.
    assert!(
        segs > rt.len() as u64,
        "{segs} segments in {} retransmits",
        rt.len()
    );
    assert_eq!(
        segs,
        kernel,
        "{} retransmit events, {segs} segments, RetransSegs +{kernel}; loss: {loss:?}",
        rt.len()
    );
}

/// S12: a FIN is lost: retransmitted in FIN_WAIT1 by the closer, and in LAST_ACK by the
/// passive side when its FIN is lost.
fn s12_fin_lost() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_early_retrans", "0");
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8101 16");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    // (a) the client's FIN is dropped for a while.
    let (c, cport) = id_port(&client.ok("connect 127.0.0.1:8101"));
    let (a, _) = id_port(&server.ok(&format!("accept {l}")));
    let before = ns.counter("Tcp", "RetransSegs");
    ns.nft(&drop_rule("tcp dport 8101 tcp flags & fin == fin"));
    client.ok(&format!("close {c}"));
    client.ok("sleep 1000");
    ns.exec(&["nft", "delete", "table", "inet", "tw"]);
    assert_eq!(
        server.ok(&format!("recv {a} 1")),
        "0",
        "the FIN gets through in the end"
    );
    // (b) the server's FIN is dropped: it retransmits in LAST_ACK.
    ns.nft(&drop_rule("tcp sport 8101 tcp flags & fin == fin"));
    server.ok(&format!("close {a}"));
    server.ok("sleep 1000");
    ns.exec(&["nft", "delete", "table", "inet", "tw"]);
    tracer.wait_for("server LAST_ACK -> CLOSE", W, |evs| {
        evs.iter().any(|e| is(e, "LAST_ACK", "CLOSE"))
    });
    let evs = tracer.stop();
    let fin = retransmits(&evs, "fin");
    let client_fin: Vec<&&Value> = fin.iter().filter(|e| e["sport"] == cport).collect();
    let server_fin: Vec<&&Value> = fin.iter().filter(|e| e["sport"] == 8101).collect();
    assert!(client_fin.len() >= 2, "{fin:#?}");
    assert!(
        client_fin
            .iter()
            .all(|e| e["state"] == "FIN_WAIT1" && e["pid"].as_u64() == Some(client.pid as u64))
    );
    assert!(!server_fin.is_empty(), "{fin:#?}");
    assert!(
        server_fin
            .iter()
            .all(|e| e["state"] == "LAST_ACK" && e["pid"].as_u64() == Some(server.pid as u64))
    );
    near(
        "FIN retransmit backoff",
        u(client_fin[1], "interval_ns"),
        400_000_000,
        120_000_000,
    );
    let brief: Vec<String> = of_type(&evs, "retransmit")
        .iter()
        .map(|e| format!("{}:{} {} {}", e["sport"], e["dport"], e["kind"], e["state"]))
        .chain(of_type(&evs, "loss").iter().map(|e| e.to_string()))
        .collect();
    assert_eq!(
        ns.counter("Tcp", "RetransSegs") - before,
        retransmitted_segments(&evs),
        "RetransSegs agrees; retransmits seen: {brief:?}"
    );
}

/// S13: keepalive 1 s idle, 1 s interval, 2 probes, peer silently gone: probes counted by the
/// kernel (TCPKeepAlive), abort with ETIMEDOUT after idle + probes x interval = 3 s.
fn s13_keepalive() {
    let ns = Netns::new();
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8102 16");
    let tracer = Tracer::start(&ns, &[]);
    let mut client = ns.peer("tw-client");
    let (c, _) = id_port(&client.ok("connect 127.0.0.1:8102"));
    server.ok(&format!("accept {l}"));
    client.ok(&format!("keepalive {c} 1 1 2"));
    let before = ns.counter("TcpExt", "TCPKeepAlive");
    ns.nft(&drop_rule("tcp dport 8102"));
    let t0 = std::time::Instant::now();
    tracer.wait_for("keepalive abort", W, |evs| {
        !with(evs, "error", "error", "ETIMEDOUT").is_empty()
    });
    let took = t0.elapsed();
    let evs = tracer.stop();
    let err = with(&evs, "error", "error", "ETIMEDOUT");
    assert_eq!(err[0]["pid"].as_u64(), Some(client.pid as u64));
    assert!(
        of_type(&evs, "state")
            .iter()
            .any(|e| is(e, "ESTABLISHED", "CLOSE") && sock_key(e) == sock_key(err[0]))
    );
    near(
        "keepalive abort after",
        took.as_nanos() as u64,
        3_000_000_000,
        700_000_000,
    );
    assert_eq!(
        ns.counter("TcpExt", "TCPKeepAlive") - before,
        2,
        "two probes"
    );
    assert!(
        retransmits(&evs, "data").is_empty(),
        "keepalive probes are not retransmits"
    );
}

trait OkTimeout {
    fn ok_timeout(&mut self, cmd: &str) -> String;
}

impl OkTimeout for Peer {
    fn ok_timeout(&mut self, cmd: &str) -> String {
        let r = self.cmd_timeout(cmd, Duration::from_secs(120));
        r.strip_prefix("ok ")
            .unwrap_or_else(|| panic!("{cmd}: {r}"))
            .to_string()
    }
}
