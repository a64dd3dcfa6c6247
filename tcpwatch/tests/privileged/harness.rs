//! Test plumbing: network namespaces that clean up after themselves, peer processes driven by
//! commands, and tcpwatch itself as a child process whose JSON lines are collected.
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TCPWATCH: &str = env!("CARGO_BIN_EXE_tcpwatch");

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with `lo` up, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "tw{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Loads an nft ruleset into this namespace (rules vanish with it).
    pub fn nft(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected:\n{script}");
    }

    /// A kernel counter in this namespace, e.g. ("TcpExt", "ListenDrops").
    pub fn counter(&self, group: &str, name: &str) -> u64 {
        nstat(self, group, name)
    }

    /// /proc/net/sockstat `tw` in this namespace.
    pub fn sockstat_tw(&self) -> u64 {
        let text = self.exec(&["cat", "/proc/net/sockstat"]);
        let line = text
            .lines()
            .find(|l| l.starts_with("TCP:"))
            .expect("TCP line");
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "tw").expect("tw field");
        w[i + 1].parse().unwrap()
    }

    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
    }

    /// The accept queue of `peer`'s listener on `port` as `ss -ltnp` shows it (a listener's
    /// Recv-Q): how SO_REUSEPORT members are told apart from outside.
    pub fn listener_queue(&self, port: u16, peer: &Peer) -> u64 {
        let ss = self.exec(&["ss", "-ltnpH", "sport", &format!("= :{port}")]);
        let line = ss
            .lines()
            .find(|l| l.contains(&format!("pid={},", peer.pid)))
            .unwrap_or_else(|| panic!("ss has no listener of {} on {port}: {ss}", peer.comm));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn peer(&self, comm: &str) -> Peer {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(exe)
            .args(["peer", comm])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning a peer");
        let stdin = child.stdin.take().expect("peer stdin");
        let stdout = BufReader::new(child.stdout.take().expect("peer stdout"));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Peer {
            child,
            stdin,
            replies: rx,
            pid: 0,
            comm: comm.to_string(),
        };
        p.pid = p.ok("pid").parse().expect("peer pid");
        p
    }

    /// Sockets in this namespace as `ss -tanH` lists them (state local peer).
    pub fn ss(&self, filter: &[&str]) -> Vec<String> {
        let mut args = vec!["ss", "-tanH"];
        args.extend_from_slice(filter);
        self.exec(&args)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever is left in the namespace, then delete it.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
    pub pid: u32,
    pub comm: String,
}

impl Peer {
    /// Sends one command and returns the raw reply (`ok …` or `err …`).
    pub fn cmd_timeout(&mut self, cmd: &str, timeout: Duration) -> String {
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .expect("writing to peer");
        self.replies.recv_timeout(timeout).unwrap_or_else(|_| {
            panic!(
                "peer {} gave no reply to {cmd:?} within {timeout:?}",
                self.comm
            )
        })
    }

    pub fn cmd(&mut self, cmd: &str) -> String {
        self.cmd_timeout(cmd, Duration::from_secs(30))
    }

    /// Sends a command that must succeed; returns what follows `ok `.
    pub fn ok(&mut self, cmd: &str) -> String {
        let r = self.cmd(cmd);
        match r.strip_prefix("ok ") {
            Some(v) => v.to_string(),
            None => panic!("peer {}: {cmd:?} -> {r:?}", self.comm),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tcpwatch trace --json` running as a child, its lines collected by a thread.
pub struct Tracer {
    child: Option<Child>,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    paused: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Tracer {
    /// Starts tracing the namespace and waits until it is attached.
    pub fn start(ns: &Netns, extra: &[&str]) -> Tracer {
        let ns_name = ns.name.clone();
        let mut args = vec!["trace", "--json", "--netns", ns_name.as_str()];
        args.extend_from_slice(extra);
        Tracer::start_args(&args)
    }

    pub fn start_args(args: &[&str]) -> Tracer {
        Tracer::start_cmd(TCPWATCH, args)
    }

    /// Any command line that ends up running tcpwatch (e.g. under `ip netns exec`).
    pub fn start_cmd(program: &str, args: &[&str]) -> Tracer {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcpwatch");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let paused = Arc::new(AtomicBool::new(false));
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let (ev, ps) = (events.clone(), paused.clone());
        let r1 = std::thread::spawn(move || {
            let mut lines = out.lines();
            loop {
                while ps.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let Some(Ok(line)) = lines.next() else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
                ev.lock().unwrap().push(v);
            }
        });
        let se = stderr.clone();
        let r2 = std::thread::spawn(move || {
            for line in err.lines() {
                let Ok(line) = line else { break };
                let mut s = se.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let t = Tracer {
            child: Some(child),
            events,
            stderr,
            paused,
            readers: vec![r1, r2],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !t.stderr().contains("tracing;") {
            if Instant::now() > deadline {
                panic!("tcpwatch did not attach: {}", t.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Stops reading stdout, so tcpwatch's writer blocks (to provoke back-pressure).
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::SeqCst);
    }

    /// Waits until `pred` holds on the events collected so far.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.events()) {
                return;
            }
            if Instant::now() > deadline {
                let evs = self.events();
                let tail: Vec<String> = evs
                    .iter()
                    .rev()
                    .take(5)
                    .rev()
                    .map(|e| e.to_string())
                    .collect();
                panic!(
                    "timed out waiting for {what}; {} events by kind: {}; tcpwatch stderr: {:?}; \
                     last: {}",
                    evs.len(),
                    census(&evs),
                    self.stderr(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then the exit status must be 0; returns every event line.
    pub fn stop(self) -> Vec<Value> {
        self.finish().0
    }

    /// Like [`Tracer::stop`], also returning everything tcpwatch wrote to stderr.
    pub fn finish(mut self) -> (Vec<Value>, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for tcpwatch") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tcpwatch did not exit on SIGINT: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        assert_eq!(
            status.code(),
            Some(0),
            "tcpwatch exit status; stderr: {}",
            self.stderr()
        );
        (self.events(), self.stderr())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- event helpers ---------------------------------------------------------------------------

pub fn of_type<'a>(evs: &'a [Value], ty: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["type"] == ty).collect()
}

/// The key that identifies one socket's events: the cookie, or the kernel address when the hook
/// gives no cookie.
pub fn sock_key(e: &Value) -> u64 {
    match e["cookie"].as_u64() {
        Some(c) if c != 0 => c,
        _ => e["sk"]
            .as_str()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(0),
    }
}

/// State events of the socket that made the first transition matching `first`.
pub fn timeline(evs: &[Value], first: impl Fn(&Value) -> bool) -> Vec<&Value> {
    let states = of_type(evs, "state");
    let Some(start) = states.iter().position(|e| first(e)) else {
        return Vec::new();
    };
    let key = sock_key(states[start]);
    assert_ne!(key, 0, "state events carry a socket cookie or address");
    states.into_iter().filter(|e| sock_key(e) == key).collect()
}

pub fn transitions(tl: &[&Value]) -> Vec<(String, String)> {
    tl.iter()
        .map(|e| {
            (
                e["old"].as_str().unwrap_or("?").to_string(),
                e["new"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

pub fn seq(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub fn is(e: &Value, old: &str, new: &str) -> bool {
    e["type"] == "state" && e["old"] == old && e["new"] == new
}

/// Every event of the timeline names `peer` as owner.
pub fn assert_owner(tl: &[&Value], peer: &Peer) {
    for e in tl {
        assert_eq!(e["pid"].as_u64(), Some(peer.pid as u64), "owner pid of {e}");
        assert_eq!(
            e["comm"].as_str(),
            Some(peer.comm.as_str()),
            "owner comm of {e}"
        );
    }
}

/// A kernel counter from /proc/net/{netstat,snmp} inside a namespace, e.g. ("TcpExt", "ListenDrops").
pub fn nstat(ns: &Netns, group: &str, name: &str) -> u64 {
    for file in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = ns.exec(&["cat", file]);
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            if pair.len() < 2 {
                continue;
            }
            let (h, v) = (pair[0], pair[1]);
            if !h.starts_with(&format!("{group}:")) {
                continue;
            }
            let names: Vec<&str> = h.split_whitespace().skip(1).collect();
            let vals: Vec<&str> = v.split_whitespace().skip(1).collect();
            if let Some(i) = names.iter().position(|n| *n == name) {
                return vals[i].parse().expect("counter value");
            }
        }
    }
    panic!("no counter {group}:{name}");
}

/// Events of a type whose `key` field equals `val`.
pub fn with<'a>(evs: &'a [Value], ty: &str, key: &str, val: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["type"] == ty && e[key] == val)
        .collect()
}

/// Asserts `got` is within `tol` of `want` (both in ns), with a message.
pub fn near(what: &str, got: u64, want: u64, tol: u64) {
    assert!(
        got + tol >= want && got <= want + tol,
        "{what}: {:.3} s, expected {:.3} s ± {:.3} s",
        got as f64 / 1e9,
        want as f64 / 1e9,
        tol as f64 / 1e9
    );
}

/// Counts by `type` (and `event`/`kind` where present), the first thing to read when a wait
/// times out: it tells lost, late and never-emitted events apart.
pub fn census(evs: &[Value]) -> String {
    let mut n: std::collections::BTreeMap<String, usize> = Default::default();
    for e in evs {
        let mut k = e["type"].as_str().unwrap_or("?").to_string();
        for sub in ["event", "kind"] {
            if let Some(v) = e[sub].as_str() {
                k = format!("{k}/{v}");
            }
        }
        *n.entry(k).or_default() += 1;
    }
    let parts: Vec<String> = n.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(" ")
}

/// A tcpwatch run whose output is read once it ends, started and then waited on until its
/// stderr says it is attached: a fixed delay from spawn loses the first events whenever
/// loading is slow (a cold debug build, a loaded CI machine).
pub struct Watching {
    pub child: Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<String>,
}

pub struct Finished {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Watching {
    /// Spawns `cmd` (stdin is left to the caller) and returns once a stderr line contains
    /// `marker`.
    pub fn start(cmd: &mut Command, marker: &'static str) -> Watching {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcpwatch");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let (tx, rx) = channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in err.lines().map_while(Result::ok) {
                if line.contains(marker) {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tcpwatch never said {marker:?}: {}",
                stderr.join().unwrap_or_default()
            );
        }
        Watching {
            child,
            stdout,
            stderr,
        }
    }

    pub fn finish(mut self) -> Finished {
        let status = self.child.wait().expect("waiting for tcpwatch");
        Finished {
            code: status.code(),
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// `ID PORT` as a peer replies to `connect` and `accept`.
pub fn id_port(reply: &str) -> (String, u16) {
    let mut it = reply.split_whitespace();
    (
        it.next().expect("socket id").to_string(),
        it.next().and_then(|p| p.parse().ok()).expect("port"),
    )
}

/// A numeric field of an event, which must be there.
pub fn u(e: &Value, k: &str) -> u64 {
    e[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {e}"))
}

/// An nft table dropping what `rule` matches on input (loopback traffic passes input once).
pub fn drop_rule(rule: &str) -> String {
    format!(
        "table inet tw {{\n chain in {{\n  type filter hook input priority -10;\n  {rule} drop\n }}\n}}\n"
    )
}

impl Peer {
    /// `ok` with a long timeout, for commands that wait for the kernel to give up.
    pub fn ok_timeout(&mut self, cmd: &str) -> String {
        let r = self.cmd_timeout(cmd, Duration::from_secs(120));
        r.strip_prefix("ok ")
            .unwrap_or_else(|| panic!("{cmd}: {r}"))
            .to_string()
    }
}

/// Retransmits the kernel made (attempts it gave up before sending have `segs` 0).
pub fn retransmits<'a>(evs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["type"] == "retransmit" && e["kind"] == kind && e["segs"] != 0)
        .collect()
}

/// A detached tmux session running one command; killed on drop.
pub struct Tmux {
    name: String,
}

impl Tmux {
    /// `cmd` in a `w`×`h` terminal, in a session named by `tag` and this process.
    pub fn start(tag: &str, w: u16, h: u16, cmd: &str) -> Tmux {
        let name = format!("{tag}{}", std::process::id());
        let (w, h) = (w.to_string(), h.to_string());
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", &name, "-x", &w, "-y", &h, cmd])
            .status()
            .expect("running tmux");
        assert!(st.success(), "tmux new-session");
        Tmux { name }
    }

    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn keys(&self, keys: &str) {
        assert!(
            Command::new("tmux")
                .args(["send-keys", "-t", &self.name, keys])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.name])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}
