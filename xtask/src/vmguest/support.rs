//! What the guest cases share: a tcpwatch trace running in the background, the kernel's
//! counters, timelines out of events, and the small loads the cases put on loopback.
use std::io::{BufRead, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// One attached `tcpwatch trace --json`, collecting its output.
pub(super) struct Trace {
    child: Child,
    status: Vec<String>,
    out: std::thread::JoinHandle<Vec<Value>>,
}

impl Trace {
    pub(super) fn start(bin: &str, extra: &[&str]) -> anyhow::Result<Trace> {
        let t0 = Instant::now();
        let mut child = Command::new(bin)
            .args(["trace", "--json", "--netns", "/proc/self/ns/net"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let out = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str(&l).ok())
                .collect()
        });
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().context("stderr")?;
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The closing summary lines matter too: echo everything.
                eprintln!("  tcpwatch: {l}");
                // Keep draining (and echoing) once start() stops listening.
                let _ = tx.send(l);
            }
        });
        let mut status = Vec::new();
        // Under software emulation start-up (BTF, verifier) takes seconds.
        let deadline = t0 + Duration::from_secs(150);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("tracing;") => break,
                Ok(l) => status.push(l),
                Err(_) => {
                    let _ = child.kill();
                    bail!("tcpwatch trace did not attach: {}", status.join(" | "));
                }
            }
        }
        println!(
            "vm-info: trace {} attached in {:.1} s",
            extra.join(" "),
            t0.elapsed().as_secs_f64()
        );
        Ok(Trace { child, status, out })
    }

    /// The hook a signal's status line names (`fentry/...`, `tp_btf/...`).
    pub(super) fn hook(&self, signal: &str) -> Option<String> {
        let prefix = format!("{signal}: ");
        self.status.iter().find_map(|l| {
            let at = l.find(&prefix)?;
            let rest = &l[at + prefix.len()..];
            (!rest.starts_with("UNAVAILABLE"))
                .then(|| rest.split(' ').next().unwrap_or("").to_string())
        })
    }

    pub(super) fn has(&self, signal: &str) -> bool {
        self.status
            .iter()
            .any(|l| l.contains(&format!("{signal}: ")) && !l.contains("UNAVAILABLE"))
    }

    pub(super) fn stop(self) -> anyhow::Result<Vec<Value>> {
        // The reader drains in-flight events on SIGTERM.
        std::thread::sleep(Duration::from_millis(600));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let mut child = self.child;
        let st = child.wait()?;
        if !st.success() {
            bail!("tcpwatch trace exited with {st}");
        }
        self.out
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))
    }
}

/// A MIB counter from /proc/net/netstat or snmp, e.g. ("TcpExt", "ListenOverflows").
pub(super) fn counter(group: &str, name: &str) -> u64 {
    for f in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for p in lines.chunks(2) {
            if p.len() == 2 && p[0].starts_with(&format!("{group}:")) {
                let names = p[0].split_whitespace().skip(1);
                let vals = p[1].split_whitespace().skip(1);
                for (n, v) in names.zip(vals) {
                    if n == name {
                        return v.parse().unwrap_or(0);
                    }
                }
            }
        }
    }
    0
}

pub(super) fn sockstat_tw() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let line = s.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let w: Vec<&str> = line.split_whitespace().collect();
    w.iter()
        .position(|x| *x == "tw")
        .and_then(|i| w.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub(super) fn u(e: &Value, k: &str) -> u64 {
    e[k].as_u64().unwrap_or(0)
}

/// The `(old, new)` transitions of one socket, in order. The kernel reuses socket memory
/// at once, so the address alone does not name a socket: the port does the rest.
pub(super) fn transitions(evs: &[Value], sk: &str, port: u16) -> Vec<(String, String)> {
    evs.iter()
        .filter(|e| e["type"] == "state" && e["sk"] == sk && on_port(e, port))
        .map(|e| {
            (
                e["old"].as_str().unwrap_or("").to_string(),
                e["new"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

pub(super) fn on_port(e: &Value, port: u16) -> bool {
    u(e, "sport") == port as u64 || u(e, "dport") == port as u64
}

/// Each timewait event as (event, `key`), `missing` where the key is absent: compared with
/// [`seq`].
pub(super) fn tw_pairs(evs: &[&Value], key: &str, missing: &str) -> Vec<(String, String)> {
    evs.iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("?").to_string(),
                e[key].as_str().unwrap_or(missing).to_string(),
            )
        })
        .collect()
}

pub(super) fn seq(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub(super) fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub(super) fn lifecycle(port: u16) -> anyhow::Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    let c = TcpStream::connect(("127.0.0.1", port))?;
    let (mut s, _) = l.accept()?;
    drop(c);
    let mut buf = [0u8; 16];
    let _ = s.read(&mut buf);
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

pub(super) fn churn(port: u16, n: u64) -> anyhow::Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    for _ in 0..n {
        let c = TcpStream::connect(("127.0.0.1", port))?;
        let (mut s, _) = l.accept()?;
        drop(c);
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// A connection from 127.0.0.1:`local` (SO_REUSEADDR, so a tuple in TIME_WAIT can be taken
/// again) to 127.0.0.1:`port`.
pub(super) fn connect_from(local: u16, port: u16) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let addr = |p: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: p.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the addresses live on
    // the stack for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let a = addr(local);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            bail!("bind :{local}: {}", std::io::Error::last_os_error());
        }
        let b = addr(port);
        if libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) != 0 {
            bail!("connect :{port}: {}", std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

pub(super) fn set_sysctl(name: &str, v: &str) -> anyhow::Result<String> {
    let path = format!("/proc/sys/net/ipv4/{name}");
    let old = std::fs::read_to_string(&path)?.trim().to_string();
    std::fs::write(&path, v).with_context(|| format!("writing {path}"))?;
    Ok(old)
}
