//! `tcpwatch serve` scraped by a real Prometheus (Debian's package, unpacked by `cargo xtask
//! setup`) on loopback while S5 and S7 run in a test namespace; the series Prometheus stored
//! are asserted through its HTTP API against the kernel's counters and `ss`.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("serve_scraped_by_prometheus_s5_s7", scraped),
    (
        "serve_answers_while_50_abusers_of_each_kind_hold_on",
        abused,
    ),
];

fn prometheus_bin(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/prometheus/usr/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: `cargo xtask setup` unpacks Debian's prometheus package",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(url: &str) -> Option<String> {
    let o = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A scratch directory removed on drop (declared before the processes using it, so it goes last).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One instant-vector query: the values of the matching series.
fn query(prom: u16, q: &str) -> Vec<(Value, f64)> {
    let url = format!(
        "http://127.0.0.1:{prom}/api/v1/query?query={}",
        q.bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let Some(body) = curl(&url) else {
        return vec![];
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    (
                        s["metric"].clone(),
                        s["value"][1]
                            .as_str()
                            .unwrap_or("nan")
                            .parse()
                            .unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls until the query's single value equals `want` (Prometheus scrapes every second).
fn eventually(prom: u16, q: &str, want: f64) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = query(prom, q);
        if r.len() == 1 && r[0].1 == want {
            return r[0].0.clone();
        }
        assert!(
            Instant::now() < end,
            "{q}: Prometheus has {r:?}, expected one series = {want}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn scraped() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let (port, prom) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("twprom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tcpwatch\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();

    let serve = Killed(
        Command::new(TCPWATCH)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--netns",
                &ns.name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpwatch serve"),
    );
    let _prometheus = Killed(
        Command::new(prometheus_bin("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    let end = Instant::now() + Duration::from_secs(60);
    while curl(&format!("http://127.0.0.1:{prom}/-/ready")).is_none() {
        assert!(Instant::now() < end, "Prometheus did not get ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // tcpwatch is attached once Prometheus sees the target up.
    eventually(prom, "up{job=\"tcpwatch\"}", 1.0);

    // The exposition itself passes Prometheus's own linter.
    let text = curl(&format!("http://127.0.0.1:{port}/metrics")).expect("/metrics");
    let mut lint = Command::new(prometheus_bin("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let lo = lint.wait_with_output().unwrap();
    assert!(
        lo.status.success() && lo.stdout.is_empty() && lo.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&lo.stdout),
        String::from_utf8_lossy(&lo.stderr)
    );
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/healthz")).as_deref(),
        Some("ok\n")
    );

    // S5: backlog 2, six clients, nobody accepts.
    let lo0 = ns.counter("TcpExt", "ListenOverflows");
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8140 2");
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8140 6");
    client.ok("sleep 3500");
    // S7: twenty connections closed by the client first.
    let l = server.ok("listen 127.0.0.1:8141 64");
    server.ok(&format!("churn {l} 20"));
    let overflows = ns.counter("TcpExt", "ListenOverflows") - lo0;
    assert!(overflows > 0);
    let tw = ns.ss(&["state", "time-wait"]).len() as f64;
    assert_eq!(tw, 20.0, "ss sees the client ends in TIME_WAIT");

    let m = eventually(
        prom,
        "tcpwatch_listener_overflows_total{port=\"8140\",queue=\"accept\"}",
        overflows as f64,
    );
    assert_eq!(m["owner"], "tw-server", "{m}");
    assert_eq!(m["addr"], "127.0.0.1");
    eventually(prom, "tcpwatch_listener_accept_queue{port=\"8140\"}", 3.0);
    eventually(
        prom,
        "tcpwatch_listener_accept_queue_max{port=\"8140\"}",
        2.0,
    );
    eventually(
        prom,
        "tcpwatch_listener_overflows_total{port=\"8141\",queue=\"accept\"}",
        0.0,
    );
    eventually(prom, "tcpwatch_sockets{state=\"TIME_WAIT\"}", tw);
    // Twenty client ports: ten series and the other ten summed; one remote endpoint.
    eventually(
        prom,
        "tcpwatch_time_wait_by_local_port{port=\"other\"}",
        10.0,
    );
    eventually(prom, "count(tcpwatch_time_wait_by_local_port)", 11.0);
    eventually(
        prom,
        "tcpwatch_time_wait_by_remote{addr=\"127.0.0.1\",port=\"8141\"}",
        20.0,
    );
    eventually(prom, "tcpwatch_time_wait_entered_total", 20.0);
    eventually(prom, "tcpwatch_findings{id=\"accept_queue_overflow\"}", 1.0);
    eventually(prom, "sum(tcpwatch_events_lost_total)", 0.0);
    let syn = query(prom, "tcpwatch_retransmits_total{kind=\"syn\"}");
    assert!(
        syn.len() == 1 && syn[0].1 >= 3.0,
        "SYN retransmits: {syn:?}"
    );

    // SIGTERM ends serve cleanly.
    let mut serve = serve;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = serve.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st.code(), Some(0));
}

/// Starts `serve` on a free port and waits until it answers.
fn serve_on(ns: &Netns) -> (Killed, u16) {
    let port = free_port();
    let child = Command::new(TCPWATCH)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--netns",
            &ns.name,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting serve");
    let serve = Killed(child);
    let end = Instant::now() + Duration::from_secs(20);
    while curl(&format!("http://127.0.0.1:{port}/healthz")).is_none() {
        assert!(Instant::now() < end, "serve did not answer within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    (serve, port)
}

/// One scrape of /metrics over a fresh connection: the body, and how long it took.
fn scrape(port: u16) -> (String, Duration) {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    (body, t.elapsed())
}

/// The defects the hardening issue reproduced, 50 connections of each at once: bodies of
/// absurd announced length (one that allocates it all, one that overflows), a partial body
/// held open, a pipelining client that never reads its answers, idle keep-alive. Through all
/// of it /metrics answers within a second, and the process is still the same one.
fn abused() {
    use std::io::Write as _;
    let ns = Netns::new();
    let (mut serve, port) = serve_on(&ns);
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut a = connect();
        let _ = a.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 4611686018427387904\r\n\r\nab",
        );
        let mut b = connect();
        let _ = b.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n",
        );
        let mut c = connect();
        let _ =
            c.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf");
        let mut d = connect();
        d.set_nonblocking(true).unwrap();
        for _ in 0..200 {
            let _ = d.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        let e = connect();
        held.extend([a, b, c, d, e]);
    }
    for i in 0..5 {
        let (body, took) = scrape(port);
        assert!(
            body.contains("tcpwatch_build_info"),
            "scrape {i} got no metrics: {body:.200}"
        );
        assert!(
            took < Duration::from_secs(1),
            "scrape {i} took {took:?} with 250 abusive connections open"
        );
    }
    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "serve exited under abuse"
    );
    drop(held);
    assert!(curl(&format!("http://127.0.0.1:{port}/healthz")).is_some());
}
