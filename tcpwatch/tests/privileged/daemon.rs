//! `tcpwatch daemon` and its clients: what happened before a client looked is there
//! (`snapshot --since`, `top` attached later), who may ask (group members without any
//! capability; others refused), a restart keeps the record and a subscribed trace goes on,
//! 50 subscribers during churn cost the daemon nothing while a stalled one only skips, and the
//! record stays inside `--history-mib`.
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("daemon_remembers_an_overflow_and_a_syn_storm", remembers),
    ("daemon_top_attached_later_shows_the_past", top_later),
    ("daemon_serves_its_group_without_capabilities", group),
    ("daemon_restart_keeps_the_record_and_the_trace", restart),
    ("daemon_50_subscribers_and_a_stalled_one", subscribers),
    ("daemon_record_stays_inside_history_mib", bounded),
];

/// A scratch directory (mode 0755, so other users can reach a socket in it), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = PathBuf::from(format!("/tmp/twd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(d)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("tcpwatch.sock")
    }

    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon, killed on drop.
struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Scratch, extra: &[&str]) -> Daemon {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = dir.0.join(format!("daemon-{n}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let sock = dir.sock();
        let mut args = vec![
            "daemon".to_string(),
            "--socket".into(),
            sock.display().to_string(),
            "--state-dir".into(),
            dir.state().display().to_string(),
            "--metrics".into(),
            "off".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(TCPWATCH)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawning the daemon");
        let d = Daemon {
            child: Some(child),
            sock,
            log,
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = UnixStream::connect(&d.sock) {
                let mut r = BufReader::new(s);
                let mut hello = String::new();
                if r.read_line(&mut hello).is_ok() && hello.contains("\"service\":\"tcpwatch\"") {
                    break;
                }
            }
            assert!(
                Instant::now() < end,
                "the daemon did not come up: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush anything (the record must be consistent anyway).
    fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request on a fresh connection; the response line as JSON.
fn api(sock: &Path, req: &str) -> Value {
    let mut s = UnixStream::connect(sock).expect("connecting to the daemon");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut hello = String::new();
    r.read_line(&mut hello).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Runs `cmd` (a client) against the daemon at `sock`: (exit code, stdout, stderr).
fn outcome(cmd: &mut Command, sock: &Path) -> (i32, String, String) {
    let o = cmd
        .env("TCPWATCH_SOCKET", sock)
        .output()
        .expect("running a client");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// tcpwatch as a client of the daemon at `sock`.
fn client(sock: &Path, args: &[&str]) -> (i32, String, String) {
    outcome(Command::new(TCPWATCH).args(args), sock)
}

/// A client that follows live (`trace`), interrupted after `secs`.
fn client_for(sock: &Path, secs: u32, args: &[&str]) -> (i32, String, String) {
    outcome(
        Command::new("timeout")
            .args(["-s", "INT", &secs.to_string(), TCPWATCH])
            .args(args),
        sock,
    )
}

fn snapshot_since(sock: &Path, since: &str, ns: &Netns) -> Value {
    let (code, out, err) = client(
        sock,
        &["snapshot", "--since", since, "--json", "--netns", &ns.name],
    );
    assert_eq!(code, 0, "snapshot --since failed: {err}");
    assert!(err.contains("using the daemon"), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// S5 and S3 in one namespace: listener 8131 (backlog 2, never accepting) refuses four of six
/// clients; connects to 8130 lose every SYN (tcp_syn_retries 2: three SYNs each).
fn overflow_and_syn_storm(ns: &Netns) -> (Peer, Peer) {
    ns.sysctl("net.ipv4.tcp_syn_retries", "2");
    ns.nft(&drop_rule("tcp dport 8130 tcp flags & (syn | ack) == syn"));
    let mut server = ns.peer("tw-busy");
    server.ok("listen 127.0.0.1:8131 2");
    let mut client = ns.peer("tw-caller");
    client.ok("connect_nb 127.0.0.1:8131 6");
    client.ok("connect_nb 127.0.0.1:8130 3");
    // The SYNs to 8130 are retransmitted for about 6 s, then the connects fail.
    client.ok_timeout("sleep 7500");
    (server, client)
}

fn remembers() {
    let dir = Scratch::new("remember");
    let daemon = Daemon::start(&dir, &[]);
    let ns = Netns::new();
    let (ld0, sr0) = (
        ns.counter("TcpExt", "ListenDrops"),
        ns.counter("TcpExt", "TCPSynRetrans"),
    );
    let (server, client) = overflow_and_syn_storm(&ns);
    let (ld, sr) = (
        ns.counter("TcpExt", "ListenDrops") - ld0,
        ns.counter("TcpExt", "TCPSynRetrans") - sr0,
    );
    assert!(
        ld >= 4 && sr >= 6,
        "the load: ListenDrops {ld}, TCPSynRetrans {sr}"
    );
    // The load is over; a client asks half a minute later.
    std::thread::sleep(Duration::from_secs(30));
    let snap = snapshot_since(&daemon.sock, "2m", &ns);
    let l = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8131)
        .unwrap_or_else(|| panic!("no listener 8131: {snap:#}"));
    let o = &l["overflows"];
    assert_eq!(
        o["accept"].as_u64().unwrap() + o["syn"].as_u64().unwrap(),
        ld,
        "the listener's overflows are the namespace's ListenDrops: {l:#}"
    );
    assert_eq!(l["owner"]["pid"].as_u64(), Some(server.pid as u64), "{l:#}");
    assert_eq!(l["owner"]["comm"], "tw-busy");
    let f = snap["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "accept_queue_overflow")
        .unwrap_or_else(|| panic!("no accept_queue_overflow: {:#}", snap["findings"]));
    assert_eq!(f["owner"]["comm"], "tw-busy", "{f:#}");
    // The storm: every SYN retransmit the kernel counted, and who suffered it.
    assert_eq!(
        snap["retransmits"]["syn"].as_u64(),
        Some(sr),
        "{:#}",
        snap["retransmits"]
    );
    assert_eq!(snap["counters"]["TcpExt:TCPSynRetrans"].as_u64(), Some(sr));
    let stuck: Vec<&Value> = snap["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["remote"] == "127.0.0.1:8130")
        .collect();
    assert_eq!(stuck.len(), 3, "{:#}", snap["sockets"]);
    for s in &stuck {
        // tcp_syn_retries 2, with this kernel's linear first timeouts: several, then
        // ETIMEDOUT.
        assert!(s["retransmits"]["syn"].as_u64().unwrap() >= 2, "{s:#}");
        assert_eq!(s["errors"][0], "ETIMEDOUT", "{s:#}");
        assert_eq!(s["owner"]["pid"].as_u64(), Some(client.pid as u64));
    }
    // What it was made of: the record from before the load, frames over the window.
    let h = &snap["history"];
    assert!(h["events"].as_u64().unwrap() > 0, "{h:#}");
    // One a 10 s since the daemon started (the window reaches further back).
    assert!(h["frames"].as_array().unwrap().len() >= 3, "{h:#}");
    assert!(
        h["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["port"] == 8131)),
        "a frame names the overflowing listener: {h:#}"
    );
    drop(daemon);
}

const W30: Duration = Duration::from_secs(30);

fn top_later() {
    let dir = Scratch::new("top");
    let daemon = Daemon::start(&dir, &[]);
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let mut server = ns.peer("tw-late");
    server.ok("listen 127.0.0.1:8132 2");
    let mut c = ns.peer("tw-early");
    c.ok("connect_nb 127.0.0.1:8132 6");
    c.ok_timeout("sleep 3500");
    // Everything happened before top starts.
    let t = Tmux::start(
        "twdtop",
        120,
        36,
        &format!(
            "TCPWATCH_SOCKET={} {TCPWATCH} top --netns {}",
            daemon.sock.display(),
            ns.name
        ),
    );
    // (The owner column is narrow: "PID/tw-lat".)
    let owner = format!("{}/tw-lat", server.pid);
    // The listener's row, with the overflows that happened before top started (the daemon
    // may find the young namespace a few seconds late; what it counted is not lost).
    let s = t.wait_for("the overflowing listener and its overflows", W30, |s| {
        s.lines()
            .any(|l| l.contains("127.0.0.1:8132") && l.contains(&owner) && !l.contains(" 0/0/0 "))
    });
    assert!(s.contains("via the daemon"), "{s}");
    // The events screen is filled from the record: the overflows and the refused clients'
    // SYN retransmits, which all ended before top started.
    t.keys("3");
    t.wait_for("recorded overflow and retransmit events", W30, |s| {
        s.lines()
            .any(|l| l.contains(" overflow ") && l.contains("tw-late"))
            && s.lines()
                .any(|l| l.contains(" retransmit ") && l.contains("tw-early"))
    });
    t.keys("q");
    drop(daemon);
}

/// Creates group `tcpwatch` for the test when the host has none (removed after).
struct TestGroup {
    gid: u32,
    made: bool,
}

impl TestGroup {
    fn get() -> TestGroup {
        let find = || -> Option<u32> {
            let g = std::fs::read_to_string("/etc/group").ok()?;
            g.lines()
                .find(|l| l.starts_with("tcpwatch:"))
                .and_then(|l| l.split(':').nth(2))
                .and_then(|n| n.parse().ok())
        };
        if let Some(gid) = find() {
            return TestGroup { gid, made: false };
        }
        assert!(
            Command::new("groupadd")
                .args(["--system", "tcpwatch"])
                .status()
                .unwrap()
                .success()
        );
        TestGroup {
            gid: find().expect("the group just made"),
            made: true,
        }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.made {
            let _ = Command::new("groupdel").arg("tcpwatch").status();
        }
    }
}

/// As uid 65534 with no capability at all, in group `gid` or in none: tcpwatch with `args`,
/// or, when `args` starts with `timeout`, that command line.
fn as_nobody(sock: &Path, gid: Option<u32>, args: &[&str]) -> (i32, String, String) {
    let groups = match gid {
        Some(g) => format!("--groups={g}"),
        None => "--clear-groups".into(),
    };
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            &groups,
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .args(if args.first() == Some(&"timeout") {
            &[][..]
        } else {
            &[TCPWATCH][..]
        })
        .args(args)
        .env("TCPWATCH_SOCKET", sock)
        .output()
        .expect("setpriv");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn group() {
    let g = TestGroup::get();
    let dir = Scratch::new("group");
    let daemon = Daemon::start(&dir, &[]);
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(&daemon.sock).unwrap();
    assert_eq!(
        (m.mode() & 0o777, m.gid()),
        (0o660, g.gid),
        "the socket's mode"
    );
    let ns = Netns::new();
    let mut server = ns.peer("tw-grp");
    server.ok("listen 127.0.0.1:8133 8");
    let mut c = ns.peer("tw-grpc");
    c.ok("connect 127.0.0.1:8133");
    // A member, no capability: the daemon's view.
    let (code, out, err) = as_nobody(
        &daemon.sock,
        Some(g.gid),
        &["snapshot", "--json", "--netns", &ns.name],
    );
    assert_eq!(code, 0, "a member is served: {err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    let l = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8133)
        .unwrap_or_else(|| panic!("{snap:#}"));
    assert_eq!(
        l["owner"]["comm"], "tw-grp",
        "owners too, which the user could not read itself"
    );
    assert_eq!(snap["states"]["ESTABLISHED"], 2);
    let (_, out, _) = as_nobody(
        &daemon.sock,
        Some(g.gid),
        &[
            "timeout", "-s", "INT", "4", TCPWATCH, "trace", "--json", "--since", "1m", "--netns",
            &ns.name,
        ],
    );
    assert!(
        out.contains("\"comm\":\"tw-grpc\""),
        "recorded events reach a member: {out}"
    );
    // Anyone else: one line, exit 2.
    let (code, out, err) = as_nobody(&daemon.sock, None, &["snapshot", "--json"]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("group tcpwatch"), "{err}");
    // Even with the socket's mode opened up, the daemon itself says no.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&daemon.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = as_nobody(&daemon.sock, None, &["snapshot", "--json"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refused") && err.contains("uid 65534"),
        "{err}"
    );
    drop(daemon);
}

fn restart() {
    let dir = Scratch::new("restart");
    let daemon = Daemon::start(&dir, &[]);
    let ns = Netns::new();
    let mut server = ns.peer("tw-before");
    server.ok("listen 127.0.0.1:8134 8");
    let mut c = ns.peer("tw-cl");
    c.ok("connect 127.0.0.1:8134");
    // A trace following the daemon.
    let sock = daemon.sock.display().to_string();
    let tracer = Tracer::start_args(&["trace", "--json", "--daemon", &sock, "--netns", &ns.name]);
    c.ok("connect 127.0.0.1:8134");
    tracer.wait_for("the second connection", Duration::from_secs(10), |evs| {
        evs.iter()
            .filter(|e| is(e, "SYN_SENT", "ESTABLISHED"))
            .count()
            >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    daemon.kill();
    let daemon = Daemon::start(&dir, &[]);
    let mut after = ns.peer("tw-after");
    after.ok("listen 127.0.0.1:8135 8");
    after.ok("connect 127.0.0.1:8135");
    tracer.wait_for("events of the new daemon", Duration::from_secs(30), |evs| {
        evs.iter()
            .any(|e| e["comm"] == "tw-after" && is(e, "SYN_SENT", "ESTABLISHED"))
    });
    let (_, err) = tracer.finish();
    assert!(
        err.contains("went away") && err.contains("reconnected"),
        "{err}"
    );
    // The record survived the SIGKILL: the first daemon's events are in it.
    let (code, out, err) = client(
        &daemon.sock,
        &["snapshot", "--since", "5m", "--json", "--netns", &ns.name],
    );
    assert_eq!(code, 0, "{err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    let ports: Vec<u64> = snap["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["port"].as_u64().unwrap())
        .collect();
    assert!(ports.contains(&8134) && ports.contains(&8135), "{ports:?}");
    let (_, out, _) = client_for(
        &daemon.sock,
        4,
        &["trace", "--json", "--since", "5m", "--netns", &ns.name],
    );
    assert!(out.contains("\"comm\":\"tw-before\""), "{out}");
    drop(daemon);
}

/// A raw subscriber: counts event lines and skip notes on a thread; `stall` never reads until
/// told.
struct Sub {
    lines: std::sync::Arc<std::sync::Mutex<(u64, u64, Option<Instant>)>>,
    stream: UnixStream,
}

fn subscribe(sock: &Path, ns: &Netns, read: bool) -> Sub {
    let mut s = UnixStream::connect(sock).unwrap();
    let req = format!(
        "{{\"api\":1,\"op\":\"subscribe\",\"filters\":{{\"netns\":{}}}}}",
        ns.inode()
    );
    writeln!(s, "{req}").unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, None)));
    if read {
        let (l, r) = (lines.clone(), s.try_clone().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { return };
                let mut g = l.lock().unwrap();
                if line.starts_with("{\"type\":\"skipped\"") {
                    g.1 += 1;
                } else if line.starts_with("{\"type\":\"state\"")
                    || line.starts_with("{\"type\":\"timewait\"")
                {
                    g.0 += 1;
                    g.2 = Some(Instant::now());
                }
            }
        });
    }
    Sub { lines, stream: s }
}

fn subscribers() {
    let dir = Scratch::new("subs");
    let daemon = Daemon::start(&dir, &[]);
    let ns = Netns::new();
    let subs: Vec<Sub> = (0..50)
        .map(|_| subscribe(&daemon.sock, &ns, true))
        .collect();
    let stalled = subscribe(&daemon.sock, &ns, false);
    std::thread::sleep(Duration::from_millis(500));
    let loss0 = api(&daemon.sock, r#"{"api":1,"op":"readings"}"#)["loss"].clone();
    let mut p = ns.peer("tw-churn");
    p.ok("listen 127.0.0.1:8136 512");
    // About 1000 connections a second for 3 s (the soak's rate): 11 events each.
    let n = 3000;
    for _ in 0..30 {
        p.ok("churn 1 100");
        p.ok("sleep 60");
    }
    let churn_end = Instant::now();
    // Every active subscriber gets every event within moments of the end.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let counts: Vec<u64> = subs.iter().map(|s| s.lines.lock().unwrap().0).collect();
        if counts.iter().all(|c| *c == counts[0]) && counts[0] >= 10 * n {
            break;
        }
        assert!(Instant::now() < end, "subscribers fell behind: {counts:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = subs
        .iter()
        .map(|s| s.lines.lock().unwrap().2.unwrap())
        .max()
        .unwrap();
    assert!(
        last.saturating_duration_since(churn_end) < Duration::from_secs(3),
        "the last event reached a subscriber {:?} after the load",
        last.saturating_duration_since(churn_end)
    );
    for s in &subs {
        assert_eq!(s.lines.lock().unwrap().1, 0, "an active subscriber skipped");
    }
    let r = api(&daemon.sock, r#"{"api":1,"op":"readings"}"#);
    assert_eq!(r["loss"], loss0, "the daemon lost events: {:#}", r["loss"]);
    // The stalled one was skipped, not waited for; reading now it learns how much.
    let mut rd = BufReader::new(stalled.stream);
    let mut skipped = None;
    let mut line = String::new();
    rd.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut first = 0;
    while rd.read_line(&mut line).is_ok_and(|n| n > 0) {
        first += 1;
        if line.starts_with("{\"type\":\"skipped\"") {
            skipped = Some(line.clone());
            break;
        }
        line.clear();
    }
    // One more event gets the note out.
    let skipped = skipped.unwrap_or_else(|| {
        p.ok("churn 1 1");
        let mut l = String::new();
        loop {
            l.clear();
            let r = rd.read_line(&mut l);
            assert!(
                r.as_ref().is_ok_and(|n| *n > 0),
                "the stalled subscriber heard nothing more after {first} lines: {r:?} {l:?}"
            );
            if l.starts_with("{\"type\":\"skipped\"") {
                return l;
            }
        }
    });
    let v: Value = serde_json::from_str(&skipped).unwrap();
    assert!(v["count"].as_u64().unwrap() > 0, "{v}");
    let _ = rd.get_mut().read(&mut [0u8; 1]);
    drop(subs);
    drop(daemon);
}

fn bounded() {
    let dir = Scratch::new("bounded");
    let daemon = Daemon::start(&dir, &["--history-mib", "16"]);
    let ns = Netns::new();
    let t0 = std::time::SystemTime::now();
    let mut p = ns.peer("tw-flood");
    p.ok("listen 127.0.0.1:8137 512");
    // About 13 events a connection, ~350 bytes each: 25 000 connections are ~110 MB of
    // events, seven times the bound.
    for _ in 0..5 {
        p.ok_timeout("churn 1 5000");
    }
    std::thread::sleep(Duration::from_secs(3));
    let size = |name: &str| std::fs::metadata(dir.state().join(name)).map_or(0, |m| m.len());
    let disk = size("record.sqlite") + size("record.sqlite-wal");
    assert!(
        disk <= 16 << 20,
        "the record takes {disk} bytes, over 16 MiB"
    );
    let hello = {
        let s = UnixStream::connect(&daemon.sock).unwrap();
        let mut l = String::new();
        BufReader::new(s).read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap()
    };
    let rec = &hello["record"];
    assert!(rec["pruned"]["events"].as_u64().unwrap() > 0, "{rec:#}");
    // The bursts offer far more than the plain-event rate the record writes (20 000 a
    // second): a sample of the connections was kept, the rest counted, not silent.
    assert!(rec["dropped"].as_u64().unwrap() > 0, "{rec:#}");
    // A client asking for more than is left is told where the record starts.
    let since = t0.elapsed().unwrap().as_secs() + 30;
    let (code, out, err) = client(
        &daemon.sock,
        &[
            "snapshot",
            "--since",
            &format!("{since}s"),
            "--json",
            "--netns",
            &ns.name,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("were pruned"), "{err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert!(
        snap["history"]["events_from_wall_ns"].as_i64().unwrap()
            > snap["history"]["from_wall_ns"].as_i64().unwrap()
    );
    drop(daemon);
}
