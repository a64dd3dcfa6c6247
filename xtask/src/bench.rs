//! `cargo xtask bench`: loopback connection churn inside a fresh network namespace, untraced and
//! traced, as interleaved pairs so machine noise hits both sides alike. Prints connections/s,
//! the median traced/untraced ratio, tracer CPU and events lost.
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::benchkit::{Netns, churn, cpu_ticks, median, metric, populate, scrape, time_once};
use crate::status;

struct Opts {
    pairs: usize,
    secs: f64,
    clients: usize,
    tracer: Vec<String>,
    /// Another tcpwatch binary run as a second tracer in every round (a build of an earlier
    /// commit, say): both ratios come from the same rounds.
    baseline: Option<String>,
    /// Other arguments for this build, run as one more tracer in every round (`daemon …`
    /// beside `serve`, say).
    vs: Option<Vec<String>>,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        pairs: 5,
        secs: 3.0,
        clients: 2,
        tracer: vec!["trace".into(), "--json".into()],
        baseline: None,
        vs: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--pairs" => o.pairs = val()?.parse()?,
            "--secs" => o.secs = val()?.parse()?,
            "--clients" => o.clients = val()?.parse()?,
            "--tracer" => o.tracer = val()?.split_whitespace().map(String::from).collect(),
            "--baseline" => o.baseline = Some(val()?.clone()),
            "--vs" => o.vs = Some(val()?.split_whitespace().map(String::from).collect()),
            other => bail!(
                "unknown bench option {other} (--pairs N --secs S --clients N --tracer 'ARGS' --baseline BIN --vs 'ARGS')"
            ),
        }
    }
    Ok(o)
}

struct Traced {
    conns: u64,
    cpu_pct: f64,
    events: u64,
    lost: u64,
}

fn start_tracer(
    bin: &str,
    args: &[String],
    ns: &Netns,
) -> anyhow::Result<(Child, BufReader<std::process::ChildStderr>)> {
    let mut child = Command::new(bin)
        .args(args)
        .args(["--netns", &ns.0])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let mut err = BufReader::new(child.stderr.take().context("stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("tracer exited before attaching");
        }
        if line.contains("tracing;")
            || line.contains("watching")
            || line.contains("serving")
            || line.contains("Ctrl-C to stop")
        {
            return Ok((child, err));
        }
    }
}

fn run_traced(bin: &str, tracer: &[String], o: &Opts, tag: &str) -> anyhow::Result<Traced> {
    let ns = Netns::new(tag)?;
    let (mut child, mut err) = start_tracer(bin, tracer, &ns)?;
    let t0 = cpu_ticks(child.id());
    let start = Instant::now();
    let conns = churn(&ns, o.secs, o.clients)?;
    let wall = start.elapsed().as_secs_f64();
    let t1 = cpu_ticks(child.id());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    let mut line = String::new();
    while err.read_line(&mut line)? > 0 {
        rest.push_str(&line);
        line.clear();
    }
    child.wait()?;
    let (mut events, mut lost) = (0, 0);
    for l in rest.lines() {
        if l.starts_with("tcpwatch: lost") || l.contains(" LOST ") {
            // Which kind of loss: printed as it comes, ahead of the pair's line.
            println!("  tracer: {}", l.trim_start_matches("tcpwatch: "));
        }
        // "tcpwatch: N events, M lost"
        if let Some(s) = l.strip_prefix("tcpwatch: ") {
            let w: Vec<&str> = s.split_whitespace().collect();
            if w.len() == 4 && w[1] == "events," && w[3] == "lost" {
                events = w[0].parse().unwrap_or(0);
                lost = w[2].parse().unwrap_or(0);
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Traced {
        conns,
        cpu_pct: (t1 - t0) as f64 / hz / wall * 100.0,
        events,
        lost,
    })
}

fn time_cmd(cmd: &mut Command, runs: usize) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..runs {
        v.push(time_once(cmd)?);
    }
    Ok(median(v))
}

/// `tcpwatch snapshot` against `ss -tan` on 20 k TIME_WAIT + 5 k established sockets, run as
/// interleaved pairs so a change in the VM's speed hits both sides alike.
fn snapshot_bench(bin: &str) -> anyhow::Result<()> {
    let ns = Netns::new("snap")?;
    let (stop, h) = populate(&ns, 5_000, 20_000, 0)?;
    let path = format!("--net=/run/netns/{}", ns.0);
    let count = Command::new("nsenter")
        .args([path.as_str(), "ss", "-tanH"])
        .output()?;
    let lines = String::from_utf8_lossy(&count.stdout).lines().count();
    let mut ss_cmd = Command::new("nsenter");
    ss_cmd.args([path.as_str(), "ss", "-tan"]);
    let mut tw_cmd = Command::new(bin);
    tw_cmd.args(["snapshot", "--json", "--standalone", "--netns", &ns.0]);
    let (mut ss, mut tw, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..15 {
        let a = time_once(&mut ss_cmd)?;
        let b = time_once(&mut tw_cmd)?;
        ss.push(a);
        tw.push(b);
        ratio.push(b / a);
    }
    let ssp = time_cmd(
        Command::new("nsenter").args([path.as_str(), "ss", "-tanp"]),
        5,
    )?;
    let twt = time_cmd(
        Command::new(bin).args(["snapshot", "--standalone", "--netns", &ns.0]),
        5,
    )?;
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    println!(
        "snapshot: {lines} sockets; ss -tan {:.1} ms, ss -tanp {ssp:.1} ms; tcpwatch snapshot --json {:.1} ms (text {twt:.1} ms); median ratio tcpwatch/ss -tan over 15 pairs {:.2}",
        median(ss),
        median(tw),
        median(ratio)
    );
    Ok(())
}

fn aggregator_bench() -> anyhow::Result<()> {
    status(crate::cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "tcpwatch",
        "--example",
        "aggregator_bench",
    ]))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let which: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["churn", "aggregator", "snapshot", "tui", "serve", "daemon"].contains(a))
        .collect();
    let rest: Vec<String> = args
        .iter()
        .filter(|a| {
            !["churn", "aggregator", "snapshot", "tui", "serve", "daemon"].contains(&a.as_str())
        })
        .cloned()
        .collect();
    let all = which.is_empty();
    if all || which.contains(&"aggregator") {
        aggregator_bench()?;
    }
    if all
        || which
            .iter()
            .any(|w| ["snapshot", "churn", "tui", "serve", "daemon"].contains(w))
    {
        if !crate::is_root() {
            bail!(
                "the churn and snapshot benchmarks attach eBPF programs and make namespaces: run them as root"
            );
        }
        status(crate::cargo().args(["build", "--release", "-p", "tcpwatch"]))?;
    }
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcpwatch");
    let bin = bin.to_str().context("path")?.to_string();
    if all || which.contains(&"snapshot") {
        snapshot_bench(&bin)?;
    }
    if all || which.contains(&"serve") {
        serve_bench(&bin)?;
    }
    if all || which.contains(&"tui") {
        tui_bench(&bin)?;
    }
    if all || which.contains(&"daemon") {
        crate::bench_daemon::run(&bin)?;
    }
    if all || which.contains(&"churn") {
        churn_bench(&bin, &rest)?;
    }
    Ok(())
}

/// `tcpwatch serve` on 20 k TIME_WAIT + 5 k established sockets and 101 listeners: the time
/// of a scrape that rebuilds the exposition, while connection churn runs in the namespace.
fn serve_bench(bin: &str) -> anyhow::Result<()> {
    let ns = Netns::new("serve")?;
    // Ephemeral ports above the fixed ones the listeners and the churn server use.
    ns.sysctl("net.ipv4.ip_local_port_range=10000 65535")?;
    let (stop, h) = populate(&ns, 5_000, 20_000, 100)?;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--netns",
            &ns.0,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(child.stderr.take().context("stderr")?);
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("serve exited");
        }
    }
    std::thread::spawn(move || err.lines().map_while(Result::ok).count());
    let res = (|| {
        let (_, first) = scrape(port)?;
        let sockets = metric(&first, "tcpwatch_sockets{");
        let listeners = metric(&first, "tcpwatch_listeners ");
        // 1. Scrapes of the quiet namespace, each older than the 1 s cache so each rebuilds.
        let (mut times, mut builds) = (Vec::new(), Vec::new());
        for _ in 0..11 {
            std::thread::sleep(Duration::from_millis(1100));
            let (ms, body) = scrape(port)?;
            times.push(ms);
            builds.push(metric(&body, "tcpwatch_snapshot_build_seconds") * 1e3);
        }
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!(
            "serve: {sockets:.0} sockets, {listeners:.0} listeners; scrape (rebuilding) median {:.1} ms, max {max:.1} ms; build median {:.1} ms",
            median(times),
            median(builds),
        );
        // 2. The same scrapes during connection churn in that namespace. TIME_WAIT is capped at
        // what is there, so the socket count stays put while events flow.
        let tw = metric(&first, "tcpwatch_sockets{state=\"TIME_WAIT\"}") as u64;
        ns.sysctl(&format!("net.ipv4.tcp_max_tw_buckets={tw}"))?;
        let (_, before) = scrape(port)?;
        let (ev0, lost0) = (
            metric(&before, "tcpwatch_events_total "),
            metric(&before, "tcpwatch_events_lost_total{"),
        );
        let ns2 = Netns(ns.0.clone());
        let churner = std::thread::spawn(move || {
            let r = churn(&ns2, 10.0, 2);
            std::mem::forget(ns2);
            r
        });
        let mut times = Vec::new();
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(1100));
            times.push(scrape(port)?.0);
        }
        let conns = churner
            .join()
            .map_err(|_| anyhow::anyhow!("churn panicked"))??;
        std::thread::sleep(Duration::from_millis(1100));
        let (_, last) = scrape(port)?;
        let lost = metric(&last, "tcpwatch_events_lost_total{") - lost0;
        let events = metric(&last, "tcpwatch_events_total ") - ev0;
        let socks = metric(&last, "tcpwatch_sockets{");
        for l in last
            .lines()
            .filter(|l| l.starts_with("tcpwatch_events_lost_total{"))
        {
            println!("  {l}");
        }
        println!(
            "serve under churn: {:.0} conn/s for 10 s, {events:.0} events, {lost:.0} lost; scrape median {:.1} ms; {socks:.0} sockets at the end",
            conns as f64 / 10.0,
            median(times),
        );
        Ok(())
    })();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    res
}

/// Idle cost of `tcpwatch top`: the real binary in a real terminal (tmux), watching every
/// namespace of this host at the default 4 Hz, CPU from /proc/PID/stat over 20 s.
fn tui_bench(bin: &str) -> anyhow::Result<()> {
    let session = format!("tcpwatch-bench-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output();
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        "-P",
        "-F",
        "#{pane_pid}",
        bin,
        "top",
    ])
    .context("starting tmux (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("tmux: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let result = (|| {
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("tmux pane pid")?;
        // Let it attach, take the inventory and settle before measuring.
        std::thread::sleep(Duration::from_secs(4));
        let screen = tmux(&["capture-pane", "-p", "-t", &session])?;
        if !String::from_utf8_lossy(&screen.stdout).contains("events/s") {
            bail!(
                "top did not start: {}",
                String::from_utf8_lossy(&screen.stdout).trim()
            );
        }
        let hz = 100.0; // USER_HZ on Linux
        let (t0, c0) = (Instant::now(), cpu_ticks(pid));
        std::thread::sleep(Duration::from_secs(20));
        let (el, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid));
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .map(|l| l.trim_start_matches("VmRSS:").trim().to_string())
            .unwrap_or_default();
        let pct = (c1 - c0) as f64 / hz / el * 100.0;
        println!(
            "tui: tcpwatch top idle at 4 Hz, 120x40, all namespaces: {pct:.2} % of one core over {el:.0} s, RSS {rss}"
        );
        Ok(())
    })();
    let _ = tmux(&["kill-session", "-t", &session]);
    result
}

fn churn_bench(bin: &str, args: &[String]) -> anyhow::Result<()> {
    if let [flag, ns, secs] = args
        && flag == "--churn-in"
    {
        {
            // Debug aid: churn inside an existing namespace and print conn/s.
            let ns = Netns(ns.clone());
            let n = churn(&ns, secs.parse()?, 2);
            std::mem::forget(ns);
            let secs: f64 = secs.parse()?;
            return n.map(|n| println!("{:.0} conn/s", n as f64 / secs));
        }
    }
    let o = parse(args)?;
    println!(
        "churn: {} client threads, {:.1} s per run, {} interleaved pairs; tracer: tcpwatch {}",
        o.clients,
        o.secs,
        o.pairs,
        o.tracer.join(" ")
    );
    if let Some(b) = &o.baseline {
        println!("baseline tracer: {b} {}", o.tracer.join(" "));
    }
    if let Some(v) = &o.vs {
        println!("and: tcpwatch {}", v.join(" "));
    }
    // Per tracer (this build, the --vs arguments, the baseline): ratios, CPU, loss.
    let mut tracers: Vec<(&str, &[String], &str)> = vec![(bin, &o.tracer, "")];
    if let Some(v) = &o.vs {
        tracers.push((bin, v, " (vs)"));
    }
    if let Some(b) = &o.baseline {
        tracers.push((b, &o.tracer, " (baseline)"));
    }
    let mut ratios = vec![Vec::new(); tracers.len()];
    let mut cpu = vec![Vec::new(); tracers.len()];
    let mut lost_total = vec![0u64; tracers.len()];
    for i in 0..o.pairs {
        // The untraced run and each tracer's run, in an order that rotates every round, so
        // machine noise over time hits all of them alike.
        let n = tracers.len() + 1;
        let mut base = 0.0;
        let mut runs: Vec<Option<Traced>> = (0..tracers.len()).map(|_| None).collect();
        for step in 0..n {
            let slot = (step + i) % n;
            if slot == tracers.len() {
                let ns = Netns::new(&format!("u{i}"))?;
                base = churn(&ns, o.secs, o.clients)? as f64 / o.secs;
            } else {
                let (b, args, _) = tracers[slot];
                runs[slot] = Some(run_traced(b, args, &o, &format!("t{i}{slot}"))?);
            }
        }
        for (k, t) in runs.into_iter().enumerate() {
            let t = t.expect("every tracer ran");
            let traced = t.conns as f64 / o.secs;
            let ratio = traced / base;
            ratios[k].push(ratio);
            lost_total[k] += t.lost;
            cpu[k].push(t.cpu_pct);
            let who = tracers[k].2;
            println!(
                "pair {i}{who}: untraced {base:>8.0} conn/s  traced {traced:>8.0} conn/s  ratio {ratio:.3}  tracer CPU {:>5.1}%  events {} lost {}",
                t.cpu_pct, t.events, t.lost
            );
        }
    }
    for (k, r) in ratios.into_iter().enumerate() {
        let who = tracers[k].2;
        println!(
            "median ratio traced/untraced{who}: {:.3}; median tracer CPU {:.1}%; events lost in all runs: {}",
            median(r),
            median(std::mem::take(&mut cpu[k])),
            lost_total[k]
        );
    }
    Ok(())
}
