//! `tcpwatch snapshot`: per-state counts equal `ss` on the same namespace; findings for S5
//! (accept-queue overflow, and a queue full right now) and S7 (TIME_WAIT and ephemeral ports).
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("snapshot_states_equal_ss", states_equal_ss),
    ("snapshot_s5_accept_overflow_finding", s5_finding),
    ("snapshot_s7_timewait_and_port_pressure", s7_finding),
    ("snapshot_full_listener_right_now", full_now),
];

pub fn snapshot(ns: &Netns, extra: &[&str]) -> Value {
    let out = Command::new(TCPWATCH)
        .args(["snapshot", "--json", "--netns", &ns.name])
        .args(extra)
        .output()
        .expect("running tcpwatch snapshot");
    assert_eq!(
        out.status.code(),
        Some(0),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `snapshot --json --duration SECS` on `ns` while `work` runs, started `lead_ms` after
/// tcpwatch says it is watching (attached and inventoried: a fixed delay from spawn loses the
/// first events whenever loading is slow); the snapshot and what `work` returned (return what
/// must outlive the window, such as peers).
pub fn snapshot_while<T>(
    ns: &Netns,
    secs: &str,
    lead_ms: u64,
    work: impl FnOnce() -> T,
) -> (Value, T) {
    let run = Watching::start(
        Command::new(TCPWATCH).args([
            "snapshot",
            "--json",
            "--duration",
            secs,
            "--netns",
            &ns.name,
        ]),
        "watching for",
    );
    std::thread::sleep(Duration::from_millis(lead_ms));
    let t = work();
    let end = run.finish();
    assert_eq!(end.code, Some(0), "{}", end.stderr);
    let snap = serde_json::from_slice::<Value>(&end.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&end.stdout)));
    (snap, t)
}

/// `ss -tan` state counts, under tcpwatch's names.
fn ss_states(ns: &Netns) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for l in ns.ss(&[]) {
        let name = ss_name(l.split_whitespace().next().unwrap_or(""));
        *m.entry(name.to_string()).or_insert(0) += 1;
    }
    m
}

fn ss_name(st: &str) -> &'static str {
    match st {
        "ESTAB" => "ESTABLISHED",
        "SYN-SENT" => "SYN_SENT",
        "SYN-RECV" => "SYN_RECV",
        "FIN-WAIT-1" => "FIN_WAIT1",
        "FIN-WAIT-2" => "FIN_WAIT2",
        "TIME-WAIT" => "TIME_WAIT",
        "CLOSE-WAIT" => "CLOSE_WAIT",
        "LAST-ACK" => "LAST_ACK",
        "LISTEN" => "LISTEN",
        "CLOSING" => "CLOSING",
        other => panic!("unexpected ss state {other}"),
    }
}

pub fn assert_states(snap: &Value, ns: &Netns) {
    let ss = ss_states(ns);
    let states = snap["states"].as_object().unwrap();
    for (k, v) in states {
        assert_eq!(
            v.as_u64().unwrap(),
            ss.get(k).copied().unwrap_or(0),
            "{k}: snapshot {v} vs ss {ss:?}"
        );
    }
    for (k, v) in &ss {
        assert_eq!(
            states.get(k).and_then(Value::as_u64),
            Some(*v),
            "ss has {k}"
        );
    }
}

pub fn findings<'a>(snap: &'a Value, id: &str) -> Vec<&'a Value> {
    snap["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["id"] == id)
        .collect()
}

/// `ss -tanp` tallied by process and state (what people do by hand) against the snapshot's
/// `owners`: the same processes with the same counts.
fn assert_owners(snap: &Value, ns: &Netns) {
    use std::collections::BTreeMap;
    let mut ss: BTreeMap<(u64, String), BTreeMap<String, u64>> = BTreeMap::new();
    for l in ns.ss(&["-p"]) {
        let st = ss_name(l.split_whitespace().next().unwrap_or(""));
        // users:(("tw-server",pid=123,fd=5))
        let Some(u) = l.split("users:((\"").nth(1) else {
            continue;
        };
        let comm = u.split('"').next().unwrap().to_string();
        let pid: u64 = u
            .split("pid=")
            .nth(1)
            .and_then(|p| p.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        *ss.entry((pid, comm))
            .or_default()
            .entry(st.to_string())
            .or_insert(0) += 1;
    }
    let mut got: BTreeMap<(u64, String), BTreeMap<String, u64>> = BTreeMap::new();
    for o in snap["owners"].as_array().unwrap() {
        let states = o["states"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect();
        got.insert(
            (
                o["pid"].as_u64().unwrap(),
                o["comm"].as_str().unwrap().to_string(),
            ),
            states,
        );
    }
    assert!(!ss.is_empty());
    assert_eq!(got, ss, "snapshot owners vs ss -tanp");
}

/// Every kind of socket at once: listeners, established pairs, CLOSE_WAIT, FIN_WAIT2 (full and
/// timewait), TIME_WAIT, and a request socket (its final ACK held).
fn states_equal_ss() {
    let ns = Netns::new();
    ns.nft("table inet tw {\n chain in {\n  type filter hook input priority -10;\n  tcp dport 8111 tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n");
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8110 64");
    server.ok("listen 127.0.0.1:8111 64");
    server.ok("listen [::1]:8112 64");
    let mut conns = Vec::new();
    for _ in 0..3 {
        let c = id_port(&client.ok("connect 127.0.0.1:8110")).0;
        let a = id_port(&server.ok(&format!("accept {l}"))).0;
        conns.push((c, a));
    }
    // CLOSE_WAIT on the server and FIN_WAIT2 (full socket) on the client: shutdown(SHUT_WR).
    client.ok(&format!("shutdown {} wr", conns[0].0));
    // TIME_WAIT on the client: close both, client first.
    client.ok(&format!("close {}", conns[1].0));
    server.ok(&format!("close {}", conns[1].1));
    // A request socket (SYN-RECV) on 8111.
    client.ok("connect_nb 127.0.0.1:8111 1");
    std::thread::sleep(Duration::from_millis(300));
    let snap = snapshot(&ns, &[]);
    assert_states(&snap, &ns);
    assert_owners(&snap, &ns);
    assert_eq!(snap["states"]["SYN_RECV"], 1);
    assert_eq!(snap["states"]["TIME_WAIT"], 1);
    assert_eq!(snap["states"]["CLOSE_WAIT"], 1);
    let listeners = snap["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 3);
    let l8111 = listeners.iter().find(|l| l["port"] == 8111).unwrap();
    assert_eq!(
        l8111["syn_queue"]["now"], 1,
        "the held request is in its SYN queue"
    );
    assert_eq!(
        (
            l8111["owner"]["pid"].as_u64(),
            l8111["owner"]["comm"].as_str()
        ),
        (Some(server.pid as u64), Some("tw-server")),
        "owner from /proc/*/fd"
    );
    assert_eq!(snap["time_wait"]["total"], 1);
    assert_eq!(snap["window_s"], 0.0);
    let hook = |s: &Value, signal: &str| -> Value {
        s["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["signal"] == signal)
            .map(|h| h["hook"].clone())
            .unwrap_or(Value::Null)
    };
    // An instant snapshot loads no BPF: sock_diag lists the sockets, /proc/*/fd the owners.
    assert_eq!(hook(&snap, "inventory"), "sock_diag");
    assert_eq!(hook(&snap, "socket owners"), "/proc/*/fd");
    // The BPF inventory (iter/tcp, owners from iter/task_file) lists exactly the same: every
    // state, each listener's queues, drops and owner, the TIME_WAIT tables.
    let iter = snapshot(&ns, &["--disable-hook", "sock_diag"]);
    assert_eq!(hook(&iter, "inventory"), "iter/tcp");
    assert_eq!(hook(&iter, "socket owners"), "iter/task_file");
    for k in ["states", "owners", "listeners", "time_wait"] {
        assert_eq!(iter[k], snap[k], "{k}: iter/tcp vs sock_diag");
    }
    // sock_diag asked once per family (the fallback for a kernel refusing the one-walk
    // request) lists the same.
    let per_family = snapshot(&ns, &["--disable-hook", "tcpdiag_getsock"]);
    for k in ["states", "owners", "listeners", "time_wait"] {
        assert_eq!(per_family[k], snap[k], "{k}: per family vs both at once");
    }
    // And the iterator with the /proc/*/fd owners.
    let fallback = snapshot(
        &ns,
        &["--disable-hook", "sock_diag", "--disable-hook", "task_file"],
    );
    assert_eq!(hook(&fallback, "inventory"), "iter/tcp");
    assert_eq!(hook(&fallback, "socket owners"), "/proc/*/fd");
    let owners = |s: &Value| -> Vec<(u64, Value)> {
        let mut v: Vec<(u64, Value)> = s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["port"].as_u64().unwrap(), l["owner"].clone()))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    };
    assert_eq!(owners(&fallback), owners(&snap));
    assert_eq!(fallback["owners"], snap["owners"]);
    // Watching events where iter/tcp is missing: sock_diag serves the start-up inventory, the
    // listener samples and the final listing.
    let live = snapshot(&ns, &["--duration", "0.6", "--disable-hook", "iter_tcp"]);
    assert_eq!(hook(&live, "inventory"), "sock_diag");
    assert_states(&live, &ns);
    let l8111 = &live["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8111);
    assert_eq!(l8111.map(|l| l["syn_queue"]["now"].clone()), Some(1.into()));
    assert_eq!(
        live["time_wait"]["drift"][0]["tracked"], 1,
        "seeded from sock_diag"
    );
    // trace's filters apply to the inventory too: only port 8110 and its connections, only
    // the IPv6 listener, only what the client owns.
    let by_port = snapshot(&ns, &["--port", "8110"]);
    assert_eq!(owners(&by_port).len(), 1);
    assert_eq!(by_port["states"]["LISTEN"], 1);
    assert_eq!(by_port["states"]["SYN_RECV"], 0);
    assert_eq!(by_port["states"]["TIME_WAIT"], 1);
    let v6 = snapshot(&ns, &["-6"]);
    assert_eq!(
        owners(&v6).iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![8112]
    );
    let by_comm = snapshot(&ns, &["--comm", "tw-client"]);
    assert_eq!(owners(&by_comm).len(), 0, "the client owns no listener");
    // Its third connection, and its side of the held handshake to 8111 (the final ACK was
    // dropped on the way in, not on the way out).
    assert_eq!(by_comm["states"]["ESTABLISHED"], 2, "{}", by_comm["states"]);
    assert_eq!(by_comm["states"]["FIN_WAIT2"], 1);
}

/// S5 in a snapshot window: the overflowing listener named, its limit explained, the count
/// equal to the kernel's ListenDrops delta.
fn s5_finding() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8113 2");
    server.ok("listen 127.0.0.1:8114 64");
    let drops0 = ns.counter("TcpExt", "ListenDrops");
    // The client lives until the snapshot ends.
    let (snap, _client) = snapshot_while(&ns, "5", 300, || {
        let mut client = ns.peer("tw-client");
        client.ok("connect_nb 127.0.0.1:8113 6");
        client
    });
    let drops = ns.counter("TcpExt", "ListenDrops") - drops0;
    assert!(drops > 0);
    let f = findings(&snap, "accept_queue_overflow");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    let f = f[0];
    assert_eq!(
        f["count"].as_u64(),
        Some(drops),
        "the finding counts what the kernel dropped"
    );
    assert!(
        f["what"].as_str().unwrap().contains("127.0.0.1:8113"),
        "{f}"
    );
    assert!(
        f["cause"].as_str().unwrap().contains("listen() backlog"),
        "{f}"
    );
    // This kernel has the final-ACK hook: the drops split into SYNs and final ACKs, and the
    // refused clients' SYNs (at least the first of each of the three) are among them.
    let what = f["what"].as_str().unwrap();
    let split: Vec<u64> = what
        .rsplit_once(": ")
        .map(|(_, t)| {
            t.split(", ")
                .filter_map(|p| p.split(' ').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(split.len(), 2, "{what}");
    assert_eq!(split[0] + split[1], drops, "{what}");
    assert!(split[0] >= 3, "{what}");
    assert!(
        f["cause"]
            .as_str()
            .unwrap()
            .contains("is dropped (tcp_abort_on_overflow = 0)"),
        "{f}"
    );
    let names: Vec<&str> = f["governed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"net.core.somaxconn") && names.contains(&"net.ipv4.tcp_abort_on_overflow"),
        "{names:?}"
    );
    assert_eq!(f["owner"]["pid"].as_u64(), Some(server.pid as u64));
    let l = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8113)
        .unwrap()
        .clone();
    assert_eq!(
        (
            l["accept_queue"]["now"].as_u64(),
            l["accept_queue"]["max"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(l["overflows"]["accept"].as_u64(), Some(drops));
    let other = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8114)
        .unwrap()
        .clone();
    assert_eq!(
        other["overflows"]["accept"], 0,
        "only the overflowing listener"
    );
    assert!(
        snap["retransmits"]["syn"].as_u64().unwrap() >= 3,
        "the refused clients retransmit"
    );
    assert_eq!(snap["counters"]["TcpExt:ListenDrops"].as_u64(), Some(drops));
}

/// A plain snapshot (no window, so no overflow seen happening) of a listener that is full
/// right now: the full queue is a finding by itself, with the socket's drop counter, and the
/// clients retrying their SYNs are told it is that local listener refusing them.
fn full_now() {
    let ns = Netns::new();
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8115 2");
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8115 6");
    // The first SYN retransmit is due after 1 s (tcp_syn_retries at its default).
    std::thread::sleep(Duration::from_millis(1500));
    let snap = snapshot(&ns, &[]);
    let f = findings(&snap, "accept_queue_full");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    let f = f[0];
    assert_eq!(f["severity"], "critical", "{f}");
    assert_eq!(
        f["count"].as_u64(),
        Some(ns.listener_queue(8115, &server)),
        "{f}"
    );
    let what = f["what"].as_str().unwrap();
    assert!(
        what.contains("127.0.0.1:8115 has a full accept queue now (3/2)"),
        "{what}"
    );
    assert_eq!(f["owner"]["pid"].as_u64(), Some(server.pid as u64));
    assert!(
        findings(&snap, "accept_queue_overflow").is_empty(),
        "{:#}",
        snap["findings"]
    );
    let stuck = findings(&snap, "syn_sent_stuck");
    assert_eq!(stuck.len(), 1, "{:#}", snap["findings"]);
    assert_eq!(stuck[0]["count"].as_u64(), Some(3), "{}", stuck[0]);
    let cause = stuck[0]["cause"].as_str().unwrap();
    assert!(
        cause.contains("listener 127.0.0.1:8115 in this namespace"),
        "{cause}"
    );
    drop(client);
}

/// S7: TIME_WAIT equal to ss, by remote endpoint; with a narrow ephemeral range, port pressure.
fn s7_finding() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 42999");
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8115 4096");
    server.cmd_timeout(&format!("churn {l} 2000"), Duration::from_secs(120));
    // Five more where the server closes first: their TIME_WAIT is on the listening port.
    let mut client = ns.peer("tw-client");
    for _ in 0..5 {
        let c = client.ok("connect 127.0.0.1:8115");
        let c = c.split_whitespace().next().unwrap();
        let a = server.ok(&format!("accept {l}"));
        server.ok(&format!("close {}", a.split_whitespace().next().unwrap()));
        assert_eq!(client.ok(&format!("recv {c} 1")), "0");
        client.ok(&format!("close {c}"));
    }
    let snap = snapshot(&ns, &[]);
    assert_states(&snap, &ns);
    let tw = &snap["time_wait"];
    assert_eq!(tw["total"], 2005);
    assert_eq!(tw["by_remote"][0]["port"], 8115);
    assert_eq!(tw["by_remote"][0]["count"], 2000);
    assert_eq!(tw["drift"][0]["sockstat"], 2005);
    assert_eq!(
        tw["drift"][0]["tracked"], 2005,
        "an instant snapshot tracks what it listed"
    );
    // Who closed them: the server side by its listener; the churn's client side closed
    // before tcpwatch looked, so nothing names it.
    assert_eq!(
        tw["by_owner"],
        serde_json::json!([{"pid": server.pid, "comm": "tw-server", "count": 5, "source": "listener"}])
    );
    assert_eq!(tw["owner_unknown"], 2000);
    assert_eq!(tw["port_headroom"][0]["in_use"], 2000);
    assert_eq!(tw["port_headroom"][0]["range"], 3000);
    let f = findings(&snap, "ephemeral_port_pressure");
    assert_eq!(f.len(), 1, "{:#}", snap["findings"]);
    let names: Vec<&str> = f[0]["governed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("net.ipv4.tcp_tw_reuse")),
        "{names:?}"
    );
    let range = f[0]["governed_by"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "net.ipv4.ip_local_port_range")
        .unwrap();
    assert_eq!(
        range["value"], "40000 42999",
        "with its value in that namespace"
    );
}
