//! Retransmits, resets, errors and leaks: SCENARIOS S3, S4, S8, S10, S11, S12, S13, each also
//! checked against the namespace's own kernel counters over the same window. Expected timings
//! are derived from the kernel's documented behaviour (initial RTO 1 s for SYNs, RTO_MIN
//! 200 ms on loopback, exponential backoff), with tolerances for scheduling.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("s3_syn_lost_linear_timeouts", s3_syn_lost_linear),
    ("s3_syn_lost_exponential", s3_syn_lost_exponential),
    ("s4_synack_retransmits_per_listener", s4_synack),
    (
        "s4_synack_then_data_retransmits_count_once",
        s4_synack_then_data,
    ),
    ("s8_close_wait_leak_owner", s8_close_wait),
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
