//! `tcpwatch snapshot`'s findings on live traffic: S8 (CLOSE_WAIT leak), S11 (storm against
//! recovered loss), resets by cause, SO_REUSEPORT members as listeners of their own, and none
//! on clean traffic.
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::snapshot::{assert_states, findings, snapshot, snapshot_while};

pub const TESTS: &[crate::Test] = &[
    ("snapshot_s8_close_wait_leak_finding", s8_finding),
    ("snapshot_clean_traffic_has_no_findings", clean),
    (
        "snapshot_s11_retransmit_storm_vs_recovered_loss",
        s11_storm_vs_loss,
    ),
    ("snapshot_resets_explained_by_cause", resets_explained),
    (
        "snapshot_reuseport_members_are_separate_listeners",
        reuseport_members,
    ),
];

/// Two SO_REUSEPORT listeners on one address: the kernel spreads connections over them and
/// each has its own accept queue, so only the small one overflows. Each must be its own row
/// (cookie, owner, queue as `ss` shows it, its own drops) and the finding must name the small
/// one's owner, not the group's.
fn reuseport_members() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let mut small = ns.peer("rp-small");
    let mut big = ns.peer("rp-big");
    small.ok("listen_rp 127.0.0.1:8120 1");
    big.ok("listen_rp 127.0.0.1:8120 64");
    let drops0 = ns.counter("TcpExt", "ListenDrops");
    // 24 connections over two members by 4-tuple hash: the small one gets more than the two
    // it can hold with all but negligible probability.
    let (snap, _client) = snapshot_while(&ns, "5", 300, || {
        let mut client = ns.peer("rp-client");
        client.ok("connect_nb 127.0.0.1:8120 24");
        client
    });
    let drops = ns.counter("TcpExt", "ListenDrops") - drops0;
    assert!(drops > 0, "the small member overflowed");
    let rows: Vec<&Value> = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["port"] == 8120)
        .collect();
    assert_eq!(rows.len(), 2, "one row per member: {rows:#?}");
    assert_ne!(rows[0]["cookie"], rows[1]["cookie"], "{rows:#?}");
    let row = |p: &Peer| -> &Value {
        rows.iter()
            .find(|l| l["owner"]["pid"].as_u64() == Some(p.pid as u64))
            .unwrap_or_else(|| panic!("no listener row owned by {}: {rows:#?}", p.comm))
    };
    let (s, b) = (row(&small), row(&big));
    assert_eq!(s["overflows"]["accept"].as_u64(), Some(drops), "{s}");
    assert_eq!(b["overflows"]["accept"].as_u64(), Some(0), "{b}");
    assert_eq!(s["accept_queue"]["max"].as_u64(), Some(1));
    assert_eq!(b["accept_queue"]["max"].as_u64(), Some(64));
    // Each member's queue as `ss` shows it for that owner (Recv-Q of a listener).
    for (p, r) in [(&small, s), (&big, b)] {
        let recvq = ns.listener_queue(8120, p);
        assert_eq!(r["accept_queue"]["now"].as_u64(), Some(recvq), "{r}");
    }
    assert_eq!(
        s["accept_queue"]["now"].as_u64(),
        Some(2),
        "a full queue holds max + 1"
    );
    let f = findings(&snap, "accept_queue_overflow");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    assert_eq!(f[0]["count"].as_u64(), Some(drops));
    assert_eq!(f[0]["owner"]["pid"].as_u64(), Some(small.pid as u64));
    let what = f[0]["what"].as_str().unwrap();
    assert!(
        what.contains("127.0.0.1:8120") && what.contains("SO_REUSEPORT"),
        "{what}"
    );
}

/// S8: a CLOSE_WAIT socket idle for over 2 s: the leak is named with its owner.
fn s8_finding() {
    let ns = Netns::new();
    let mut server = ns.peer("tw-leaky");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8116 16");
    for _ in 0..2 {
        let c = id_port(&client.ok("connect 127.0.0.1:8116")).0;
        server.ok(&format!("accept {l}"));
        client.ok(&format!("close {c}"));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let snap = snapshot(&ns, &["--close-wait-secs", "2"]);
    assert_states(&snap, &ns);
    let f = findings(&snap, "close_wait_leak");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    assert_eq!(f[0]["count"], 2);
    assert_eq!(f[0]["owner"]["pid"].as_u64(), Some(server.pid as u64));
    assert_eq!(f[0]["owner"]["comm"], "tw-leaky");
    assert!(f[0]["cause"].as_str().unwrap().contains("close()"));
    // Not yet old enough with the default 10 s threshold.
    let snap = snapshot(&ns, &[]);
    assert!(findings(&snap, "close_wait_leak").is_empty());
}

/// S11 twice: one connection whose every segment is lost (timeouts in a row: a storm, governed
/// by tcp_retries2) next to a bulk transfer losing one packet in 20 and recovering (information only).
fn s11_storm_vs_loss() {
    let ns = Netns::new();
    ns.exec(&["ip", "link", "set", "lo", "mtu", "1500"]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l1 = server.ok("listen 127.0.0.1:8118 16");
    let l2 = server.ok("listen 127.0.0.1:8119 16");
    let id = |r: String| r.split_whitespace().next().unwrap().to_string();
    let stalled = client.ok("connect 127.0.0.1:8118");
    server.ok(&format!("accept {l1}"));
    let bulk = id(client.ok("connect 127.0.0.1:8119"));
    let a = id(server.ok(&format!("accept {l2}")));
    // After the handshakes: nothing more reaches 8118, every 20th packet to 8119 is lost.
    ns.nft("table inet tw {\n chain in {\n  type filter hook input priority -10;\n  tcp dport 8118 drop\n  tcp dport 8119 numgen inc mod 20 == 0 drop\n }\n}\n");
    let cport = stalled.split_whitespace().nth(1).unwrap().to_string();
    client.ok(&format!("send {} 100", id(stalled)));
    const N: usize = 16 << 20;
    let (snap, _server) = snapshot_while(&ns, "2.5", 100, || {
        // The server lives on: its closing sockets would retransmit FINs into the drop.
        let r = std::thread::spawn(move || {
            let got = server.ok(&format!("recv {a} {N}"));
            (server, got)
        });
        client.ok(&format!("send {bulk} {N}"));
        let (server, got) = r.join().unwrap();
        assert_eq!(got, N.to_string());
        server
    });
    // The stalled socket timed out at +0.2, +0.6 and +1.4 s, the next is at +3 s.
    let f = findings(&snap, "retransmit_storm");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    assert_eq!(
        (f[0]["severity"].as_str(), f[0]["count"].as_u64()),
        (Some("warning"), Some(1)),
        "{:#}",
        f[0]
    );
    assert_eq!(
        f[0]["examples"][0],
        format!("127.0.0.1:{cport} -> 127.0.0.1:8118"),
        "{:#}",
        f[0]
    );
    assert_eq!(f[0]["governed_by"][0]["name"], "net.ipv4.tcp_retries2");
    assert_eq!(f[0]["governed_by"][0]["value"], "15");
    let f = findings(&snap, "data_retransmits");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    assert_eq!(
        (f[0]["severity"].as_str(), f[0]["count"].as_u64()),
        (Some("info"), Some(1))
    );
    assert!(snap["retransmitted_segments"].as_u64() > snap["retransmits"]["data"].as_u64());
}

/// Normal traffic: connections opened and closed by both sides, no findings.
fn clean() {
    let ns = Netns::new();
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8117 64");
    let (snap, ()) = snapshot_while(&ns, "2", 200, || {
        for _ in 0..20 {
            let c = id_port(&client.ok("connect 127.0.0.1:8117")).0;
            let a = id_port(&server.ok(&format!("accept {l}"))).0;
            client.ok(&format!("send {c} 10"));
            server.ok(&format!("recv {a} 10"));
            client.ok(&format!("close {c}"));
            server.ok(&format!("close {a}"));
        }
    });
    assert!(
        snap["findings"].as_array().unwrap().is_empty(),
        "{:#}",
        snap["findings"]
    );
    assert_eq!(snap["histograms"]["handshake_us"]["count"], 20);
    assert_eq!(snap["time_wait"]["entered"], 20);
    // The client closed first: its TIME_WAIT sockets are named by the close tcpwatch saw.
    assert_eq!(
        snap["time_wait"]["by_owner"],
        serde_json::json!([{"pid": client.pid, "comm": "tw-client", "count": 20, "source": "closed"}])
    );
    assert_eq!(snap["time_wait"]["owner_unknown"], 0);
    assert_eq!(snap["loss"]["kernel_dropped"], 0);
}

/// Three ways to a reset, each named with its cause: a server closing with a request unread, a
/// client closing with a zero linger, a connect to a port nothing listens on. The counts are
/// the kernel's (TCPAbortOnClose, TCPAbortOnData, OutRsts) in that namespace.
fn resets_explained() {
    let ns = Netns::new();
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8120 16");
    let id_port = |r: String| {
        let mut it = r.split_whitespace();
        let id = it.next().unwrap().to_string();
        (id, it.next().unwrap().to_string())
    };
    let counters = |ns: &Netns| {
        (
            ns.counter("TcpExt", "TCPAbortOnClose"),
            ns.counter("TcpExt", "TCPAbortOnData"),
            ns.counter("Tcp", "OutRsts"),
        )
    };
    let (snap, (before, after, ports)) = snapshot_while(&ns, "2", 200, || {
        let before = counters(&ns);
        let (c1, p1) = id_port(client.ok("connect 127.0.0.1:8120"));
        let (a1, _) = id_port(server.ok(&format!("accept {l}")));
        client.ok(&format!("send {c1} 10"));
        client.ok("sleep 50");
        server.ok(&format!("close {a1}"));
        client.ok(&format!("close {c1}"));
        let (c2, p2) = id_port(client.ok("connect 127.0.0.1:8120"));
        let (a2, _) = id_port(server.ok(&format!("accept {l}")));
        client.ok(&format!("linger0 {c2}"));
        client.ok(&format!("close {c2}"));
        server.ok("sleep 50");
        server.ok(&format!("close {a2}"));
        assert_eq!(
            client.cmd_timeout("connect 127.0.0.1:8121", Duration::from_secs(5)),
            "err ECONNREFUSED"
        );
        (before, counters(&ns), (p1, p2))
    });
    let ids: Vec<&str> = snap["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "reset_on_close",
            "abortive_close",
            "connect_refused",
            "peer_resets",
            "reset_no_socket"
        ],
        "{:#}",
        snap["findings"]
    );
    let one = |id: &str| findings(&snap, id)[0].clone();
    let f = one("reset_on_close");
    assert_eq!(f["count"].as_u64(), Some(after.0 - before.0), "{f:#}");
    assert_eq!(f["count"], 1);
    assert_eq!(f["owner"]["pid"].as_u64(), Some(server.pid as u64));
    assert_eq!(
        f["examples"][0],
        format!("127.0.0.1:8120 -> 127.0.0.1:{}", ports.0)
    );
    let f = one("abortive_close");
    assert_eq!(f["count"].as_u64(), Some(after.1 - before.1), "{f:#}");
    assert_eq!(f["count"], 1);
    assert_eq!(f["owner"]["pid"].as_u64(), Some(client.pid as u64));
    assert_eq!(
        f["examples"][0],
        format!("127.0.0.1:{} -> 127.0.0.1:8120", ports.1)
    );
    let f = one("connect_refused");
    assert_eq!(f["count"], 1, "{f:#}");
    assert_eq!(f["owner"]["pid"].as_u64(), Some(client.pid as u64));
    assert!(
        f["examples"][0]
            .as_str()
            .unwrap()
            .ends_with(" -> 127.0.0.1:8121")
    );
    // The client saw the first reset, the server the second.
    let f = one("peer_resets");
    assert_eq!(f["count"], 2, "{f:#}");
    let f = one("reset_no_socket");
    assert_eq!(f["count"], 1, "{f:#}");
    assert!(
        f["examples"][0]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:8121 -> ")
    );
    assert_eq!(snap["resets"]["sent"].as_u64(), Some(after.2 - before.2));
    assert_eq!(snap["resets"]["sent"], 3);
}
