//! `cargo xtask soak [--minutes N] [--every SECS] [--bin PATH] [--serve]`: the always-on mode
//! (`tcpwatch daemon` with its record; `serve` with `--serve`) under the
//! load it must live with for days, shortened: connection churn, listeners opened and
//! closed, network namespaces made and deleted, idle long-lived connections. Every `--every`
//! seconds it samples tcpwatch's RSS and loss; it fails when an event is lost or RSS does not
//! level off (the last third of the run may not grow past the middle third's peak by more
//! than 10 % + 8 MiB).
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::benchkit::{Netns, metric, scrape};

struct Opts {
    minutes: f64,
    every: f64,
    bin: Option<String>,
    serve: bool,
    history_mib: u32,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        minutes: 10.0,
        every: 10.0,
        bin: None,
        serve: false,
        history_mib: 64,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--minutes" => o.minutes = val()?.parse()?,
            "--every" => o.every = val()?.parse()?,
            "--bin" => o.bin = Some(val()?.clone()),
            "--serve" => o.serve = true,
            "--history-mib" => o.history_mib = val()?.parse()?,
            other => bail!(
                "unknown soak option {other} (--minutes N --every SECS --bin PATH --serve --history-mib N)"
            ),
        }
    }
    if !(o.minutes > 0.0 && o.every > 0.0) {
        bail!("--minutes and --every must be positive");
    }
    Ok(o)
}

/// Resident set size of `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// The load, on threads inside namespace `ns` (and in namespaces of their own).
fn load(
    ns: &Netns,
    stop: &Arc<AtomicBool>,
    conns: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut hs = Vec::new();
    // Connection churn, about 1 000 a second, and 200 idle connections held all along.
    {
        let (stop, conns, name) = (stop.clone(), conns.clone(), ns.0.clone());
        hs.push(std::thread::spawn(move || {
            let ns = Netns(name);
            let ok = ns.enter().is_ok();
            std::mem::forget(ns);
            if !ok {
                return;
            }
            let Ok(l) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7100)) else {
                return;
            };
            let port = l.local_addr().map(|a| a.port()).unwrap_or(7100);
            let acceptor = std::thread::spawn(move || {
                let mut held = Vec::new();
                for s in l.incoming().flatten() {
                    if held.len() < 400 {
                        held.push(s);
                    } else {
                        drop(s);
                    }
                }
            });
            let idle: Vec<TcpStream> = (0..200)
                .filter_map(|_| TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok())
                .collect();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                for _ in 0..100 {
                    let dst = Ipv4Addr::from(0x7f00_0001 + (i % 200));
                    i = i.wrapping_add(1);
                    if TcpStream::connect(SocketAddr::from((dst, port))).is_ok() {
                        conns.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(left) = Duration::from_millis(100).checked_sub(t.elapsed()) {
                    std::thread::sleep(left);
                }
            }
            drop(idle);
            drop(acceptor);
        }));
    }
    // Listener churn: a new listener every 20 ms, each taking a connection, then closed.
    {
        let (stop, name) = (stop.clone(), ns.0.clone());
        hs.push(std::thread::spawn(move || {
            let ns = Netns(name);
            let ok = ns.enter().is_ok();
            std::mem::forget(ns);
            if !ok {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    && let Ok(a) = l.local_addr()
                {
                    let c = TcpStream::connect(a);
                    drop(c);
                    drop(l);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // Namespace churn: every 2 s a namespace with a listener and a few connections, deleted.
    {
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if let Ok(ns) = Netns::new(&format!("c{n}")) {
                    let name = ns.0.clone();
                    let _ = std::thread::spawn(move || {
                        let ns = Netns(name);
                        let ok = ns.enter().is_ok();
                        std::mem::forget(ns);
                        if ok && let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, 7200)) {
                            for _ in 0..5 {
                                let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, 7200));
                            }
                            drop(l);
                        }
                    })
                    .join();
                    drop(ns);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }));
    }
    hs
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    if !crate::is_root() {
        bail!("the soak attaches eBPF programs and makes namespaces: run it as root");
    }
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => {
            crate::status(crate::cargo().args(["build", "--release", "-p", "tcpwatch"]))?;
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/release/tcpwatch")
                .to_string_lossy()
                .into_owned()
        }
    };
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    // A short run (CI's) cannot wait for the model's one-minute retention to fill and turn
    // over: it shortens it, so the plateau comes within the run.
    let retention = if o.minutes < 3.0 { "5" } else { "60" };
    let dir = std::env::temp_dir().join(format!("xtask-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mode = if o.serve { "serve" } else { "daemon" };
    let mut cmd = Command::new(&bin);
    if o.serve {
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    } else {
        cmd.arg("daemon")
            .args(["--metrics", &format!("127.0.0.1:{port}")])
            .arg("--socket")
            .arg(dir.join("tcpwatch.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--history-mib", &o.history_mib.to_string()]);
    }
    let mut serve = cmd
        .args(["--retention-secs", retention])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let pid = serve.id();
    let started = Instant::now();
    while scrape(port).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = serve.kill();
            bail!("tcpwatch {mode} did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ns = Netns::new("soak")?;
    // TIME_WAIT sockets are the kernel's to bound; here a few thousand, so they level off
    // within seconds instead of after TIME_WAIT's minute.
    ns.sysctl(if o.minutes < 3.0 {
        "net.ipv4.tcp_max_tw_buckets=4000"
    } else {
        "net.ipv4.tcp_max_tw_buckets=100000"
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(AtomicU64::new(0));
    let threads = load(&ns, &stop, &conns);
    println!(
        "soak: tcpwatch {mode} (pid {pid}) for {:.1} min; churn ~1000 conn/s, a listener every 20 ms, a namespace every 2 s, 200 idle connections",
        o.minutes
    );
    let total = Duration::from_secs_f64(o.minutes * 60.0);
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64, f64, f64)> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        while t0.elapsed() < total {
            std::thread::sleep(
                Duration::from_secs_f64(o.every).min(total.saturating_sub(t0.elapsed())),
            );
            if let Some(st) = serve.try_wait()? {
                bail!("tcpwatch {mode} exited during the soak ({st})");
            }
            let rss = rss_kib(pid)?;
            let (ms, body) = scrape(port)?;
            let lost = metric(&body, "tcpwatch_events_lost_total");
            let listeners = metric(&body, "tcpwatch_listeners ");
            let at = t0.elapsed().as_secs_f64();
            let record = if o.serve {
                String::new()
            } else {
                format!(
                    "  record {:.1} MiB (pruned {:.0})",
                    metric(&body, "tcpwatch_record_bytes") / 1048576.0,
                    metric(&body, "tcpwatch_record_pruned_total")
                )
            };
            println!(
                "t={at:>6.0}s rss {:>7.1} MiB  lost {lost:.0}  listeners {listeners:.0}  connections {}  scrape {ms:.0} ms{record}",
                rss as f64 / 1024.0,
                conns.load(Ordering::Relaxed)
            );
            samples.push((at, rss, lost, listeners));
            if lost > 0.0 {
                bail!("events were lost ({lost})");
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    for h in threads {
        let _ = h.join();
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    // Level: the last third's RSS against the middle third's peak.
    let n = samples.len();
    if n < 3 {
        bail!("too few samples ({n}) to judge: run longer or sample more often");
    }
    let mid: Vec<u64> = samples[n / 3..2 * n / 3].iter().map(|s| s.1).collect();
    let last = samples[2 * n / 3..].iter().map(|s| s.1).max().unwrap_or(0);
    let peak = mid.iter().copied().max().unwrap_or(0);
    let bound = peak + peak / 10 + 8 * 1024;
    println!(
        "soak: RSS middle third peak {:.1} MiB, last third peak {:.1} MiB (bound {:.1} MiB); events lost 0",
        peak as f64 / 1024.0,
        last as f64 / 1024.0,
        bound as f64 / 1024.0
    );
    if last > bound {
        bail!("RSS did not level off: {last} KiB against a bound of {bound} KiB");
    }
    Ok(())
}
