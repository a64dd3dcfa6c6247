//! What the benchmarks and the soak share: a throwaway network namespace, loopback churn
//! inside it, sockets to fill it with, a process's CPU ticks, timing one command, a median,
//! and a /metrics scrape.
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::status;

pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("twbench-{}-{tag}", std::process::id());
        status(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns(name);
        status(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        // TIME_WAIT stays on for the whole run (the default 131072 buckets would overflow halfway
        // and make the second half of a run cheaper than the first).
        for kv in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_max_tw_buckets=2000000",
        ] {
            ns.sysctl(kv)?;
        }
        Ok(ns)
    }

    /// Sets `key=value` in this namespace.
    pub(crate) fn sysctl(&self, kv: &str) -> anyhow::Result<()> {
        status(Command::new("ip").args(["netns", "exec", &self.0, "sysctl", "-qw", kv]))
    }

    pub(crate) fn enter(&self) -> anyhow::Result<()> {
        let f = File::open(format!("/run/netns/{}", self.0))?;
        // SAFETY: setns on this thread with a valid nsfs fd.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs the churn for `secs`; returns completed connections.
pub(crate) fn churn(ns: &Netns, secs: f64, clients: usize) -> anyhow::Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let port = 7000u16;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The server reads to EOF before closing, so the client always closes first and TIME_WAIT
    // stays on the client side (spread over 250 destinations).
    let listener = {
        let nsname = Netns(ns.0.clone());
        std::thread::spawn(move || -> anyhow::Result<TcpListener> {
            let r = nsname.enter();
            std::mem::forget(nsname);
            r?;
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            // A deep accept queue: bursts must not turn into SYN drops and 1 s retransmits.
            // SAFETY: listen(2) again on our own bound socket only raises its backlog.
            if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
                bail!("listen: {}", std::io::Error::last_os_error());
            }
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bind thread panicked"))??
    };
    let listener = Arc::new(listener);
    let mut servers = Vec::new();
    for _ in 0..clients {
        let (stop, l) = (stop.clone(), listener.clone());
        servers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((mut s, _)) = l.accept() {
                    while matches!(std::io::Read::read(&mut s, &mut buf), Ok(n) if n > 0) {}
                }
            }
            Ok(())
        }));
    }
    ready_tx.send(()).ok();
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("server did not start")?;
    let mut handles = Vec::new();
    for c in 0..clients {
        let (stop, done) = (stop.clone(), done.clone());
        let nsname = Netns(ns.0.clone());
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let r = nsname.enter();
            std::mem::forget(nsname);
            r?;
            let mut i = c as u32;
            while !stop.load(Ordering::Relaxed) {
                // Spread over 127.0.0.0/8 so TIME_WAIT never exhausts one destination's ports.
                let dst = Ipv4Addr::from(0x7f00_0001 + (i % 250));
                i = i.wrapping_add(clients as u32);
                // Rare resets (a SYN landing on a recycled tuple) are retried, not counted.
                if let Ok(s) = TcpStream::connect(SocketAddr::from((dst, port))) {
                    drop(s);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::SeqCst);
    let n = done.load(Ordering::SeqCst);
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    // Wake the acceptors.
    let _ = std::thread::spawn({
        let nsname = Netns(ns.0.clone());
        move || {
            let _ = nsname.enter();
            std::mem::forget(nsname);
            for _ in 0..clients {
                let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
            }
        }
    })
    .join();
    for s in servers {
        s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    Ok(n)
}

pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the comm.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Connection pairs and listeners kept open by `populate`.
type Held = (Vec<(TcpStream, TcpStream)>, Vec<TcpListener>);

/// Holds `n` established connections inside `ns` (the returned threads keep them open until
/// `stop`), plus `tw` client-side TIME_WAIT sockets left behind by short connections.
pub(crate) fn populate(
    ns: &Netns,
    established: usize,
    tw: u64,
    listeners: u16,
) -> anyhow::Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let nsname = Netns(ns.0.clone());
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let r = (|| -> anyhow::Result<Held> {
            let r = nsname.enter();
            std::mem::forget(nsname);
            r?;
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7100))?;
            // First, before the clients take ephemeral ports (the range starts at 1024 here).
            let more = (0..listeners)
                .map(|i| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7200 + i)))
                .collect::<Result<Vec<_>, _>>()?;
            // SAFETY: listen(2) again on our own socket only raises its backlog.
            unsafe { libc::listen(l.as_raw_fd(), 4096) };
            let mut held = Vec::with_capacity(established / 2);
            for _ in 0..established / 2 {
                let c = TcpStream::connect((Ipv4Addr::LOCALHOST, 7100))?;
                let (a, _) = l.accept()?;
                held.push((c, a));
            }
            for i in 0..tw as u32 {
                let dst = Ipv4Addr::from(0x7f00_0001 + (i % 250));
                let c = TcpStream::connect(SocketAddr::from((dst, 7100)))?;
                let (mut a, _) = l.accept()?;
                drop(c);
                let mut b = [0u8; 1];
                let _ = std::io::Read::read(&mut a, &mut b);
            }
            Ok((held, more))
        })();
        match r {
            Ok(held) => {
                let _ = tx.send(Ok(()));
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(held);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx.recv().context("populating the namespace")??;
    Ok((stop, h))
}

pub(crate) fn time_once(cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !st.success() {
        bail!("{cmd:?} failed");
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

pub(crate) fn scrape(port: u16) -> anyhow::Result<(f64, String)> {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, body))
}

pub(crate) fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
