//! `xtask vm-guest TCPWATCH`: the smoke suite that runs inside each VM (and on the host, in a
//! namespace): every hook strategy the kernel offers loads and attaches, and S1, S3, S5 and S7
//! in short form give the exact events the kernel's counters agree with. One `vm-case:` line
//! per case, parsed by `xtask vm-test`.
mod support;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;
use support::*;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// S1: one connection from connect to TIME_WAIT, with the right owner for every transition.
fn s1(evs: &[Value], port: u16, tw: Option<&str>) -> anyhow::Result<String> {
    let me = std::process::id() as u64;
    let first = |pred: &dyn Fn(&Value) -> bool| -> anyhow::Result<String> {
        evs.iter()
            .find(|e| pred(e))
            .and_then(|e| e["sk"].as_str().map(str::to_string))
            .context("socket not seen")
    };
    let client =
        first(&|e| e["type"] == "state" && e["new"] == "SYN_SENT" && u(e, "dport") == port as u64)?;
    let server =
        first(&|e| e["type"] == "state" && e["old"] == "LISTEN" && u(e, "sport") == port as u64)?;
    let c = transitions(evs, &client, port);
    let want_c = seq(&[
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "CLOSE"),
    ]);
    if c != want_c {
        bail!("client transitions {c:?}");
    }
    let s = transitions(evs, &server, port);
    let want_s = seq(&[
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ]);
    if s != want_s {
        bail!("server transitions {s:?}");
    }
    for e in evs
        .iter()
        .filter(|e| on_port(e, port) && (e["sk"] == client.as_str() || e["sk"] == server.as_str()))
    {
        if u(e, "pid") != me {
            bail!("owner of {e} is not pid {me}");
        }
    }
    if let Some(hook) = tw {
        let tw_evs: Vec<&Value> = evs
            .iter()
            .filter(|e| e["type"] == "timewait" && u(e, "dport") == port as u64)
            .collect();
        let seen = tw_pairs(&tw_evs, "substate", "?");
        // The client closed first: its timewait socket starts in the FIN_WAIT2 substate and
        // the server's FIN re-arms it as TIME_WAIT. Trampolines see every re-arm; the timer
        // hooks only one that moves the timer to another wheel bucket: both timeouts are
        // 60 s, 100 ms apart, so now and then a bucket boundary falls between them.
        let full = seq(&[("enter", "FIN_WAIT2"), ("rearm", "TIME_WAIT")]);
        let ok = if hook.starts_with("fentry/") {
            seen == full
        } else {
            seen == full[..1] || seen == full
        };
        let want = full;
        if !ok || tw_evs.iter().any(|e| u(e, "pid") != me) {
            let brief: Vec<String> = tw_evs
                .iter()
                .map(|e| {
                    format!(
                        "{}/{}/{} pid {} sport {} t {}",
                        e["event"].as_str().unwrap_or("?"),
                        e["substate"].as_str().unwrap_or("?"),
                        e["reason"].as_str().unwrap_or("-"),
                        e["pid"],
                        e["sport"],
                        e["ts_ns"]
                    )
                })
                .collect();
            bail!("timewait events with {hook}: {}", brief.join(", "));
        }
        let what = if seen.len() == want.len() {
            "entered and re-armed"
        } else {
            "entered"
        };
        return Ok(format!(
            "client and server sequences exact, owners right, TIME_WAIT {what} ({hook})"
        ));
    }
    Ok("client and server sequences exact, owners right (no TIME_WAIT hook)".into())
}

/// S3 + S5: a listener with backlog 1 that never accepts, five clients. The kernel drops the
/// SYNs of the three that do not fit and they retransmit them.
/// S3 + S5; `listen_first`: the listener exists before tcpwatch starts, so the queue sampler
/// knows it from the start-up inventory, not from its LISTEN transition.
fn s3_s5(bin: &str, extra: &[&str], port: u16, listen_first: bool) -> anyhow::Result<String> {
    std::fs::write("/proc/sys/net/ipv4/tcp_syn_retries", "1").context("tcp_syn_retries")?;
    let listen = || -> anyhow::Result<TcpListener> {
        let l = TcpListener::bind(("127.0.0.1", port))?;
        // SAFETY: shrink the backlog of our own listening socket.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 1) };
        Ok(l)
    };
    let early = if listen_first { Some(listen()?) } else { None };
    let t = Trace::start(bin, extra)?;
    let (retrans, synack) = (t.has("retransmits"), t.has("SYN-ACK retransmits"));
    let l = match early {
        Some(l) => l,
        None => listen()?,
    };
    let (lo0, ld0, sr0) = (
        counter("TcpExt", "ListenOverflows"),
        counter("TcpExt", "ListenDrops"),
        counter("TcpExt", "TCPSynRetrans"),
    );
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || TcpStream::connect(("127.0.0.1", port)).ok()))
        .collect();
    let conns: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().ok().flatten())
        .collect();
    // The listener's drop counter is sampled at 4 Hz, and once more at shutdown. Drops go on
    // meanwhile (SYN-ACK retransmits of requests whose final ACK met the full queue), and
    // closing the clients adds more (their FINs meet it too): tcpwatch must report at least
    // what the kernel had counted before it was stopped and at most what it had counted when
    // it exited.
    std::thread::sleep(Duration::from_millis(700));
    let (lo_before, ld_before, sr_before) = (
        counter("TcpExt", "ListenOverflows") - lo0,
        counter("TcpExt", "ListenDrops") - ld0,
        counter("TcpExt", "TCPSynRetrans") - sr0,
    );
    let evs = t.stop()?;
    let (lo, ld, sr) = (
        counter("TcpExt", "ListenOverflows") - lo0,
        counter("TcpExt", "ListenDrops") - ld0,
        counter("TcpExt", "TCPSynRetrans") - sr0,
    );
    drop(conns);
    drop(l);
    // Overflows from the counters account for every listen drop; final-ACK drops are also
    // reported one by one (source kfree_skb), as detail of the same drops: not added again.
    let ovs: Vec<&Value> = evs
        .iter()
        .filter(|e| {
            e["type"] == "overflow" && e["listener"]["port"] == port && e["source"] == "counters"
        })
        .collect();
    let ov: u64 = ovs.iter().map(|e| u(e, "count")).sum();
    let acc: u64 = ovs
        .iter()
        .filter(|e| e["queue"] == "accept")
        .map(|e| u(e, "count"))
        .sum();
    // Concurrent SYNs can also meet a full SYN queue (backlog 1): every listen drop is an
    // overflow, the accept-queue ones are exactly ListenOverflows.
    if lo == 0 || !(ld_before..=ld).contains(&ov) || !(lo_before..=lo).contains(&acc) {
        let each: Vec<String> = ovs
            .iter()
            .map(|e| {
                format!(
                    "{} {}x{} len {}",
                    e["ts_ns"], e["queue"], e["count"], e["len"]
                )
            })
            .collect();
        bail!(
            "overflows counted {ov} ({acc} accept queue), kernel ListenDrops +{ld_before}..{ld}, ListenOverflows +{lo_before}..{lo}: {}",
            each.join(", ")
        );
    }
    if !retrans {
        return Ok(format!(
            "{ov} overflows = ListenDrops, {acc} of the accept queue = ListenOverflows (no retransmit hook)"
        ));
    }
    let rt = evs
        .iter()
        .filter(|e| {
            // Attempts the kernel gave up before sending (segs 0) are not in its counters.
            e["type"] == "retransmit"
                && e["segs"] != 0
                && (e["kind"] == "syn" && u(e, "dport") == port as u64
                    || e["kind"] == "synack" && u(e, "sport") == port as u64)
        })
        .count() as u64;
    if sr == 0 || !(sr_before..=sr).contains(&rt) {
        bail!(
            "SYN + SYN-ACK retransmits {rt}, kernel TCPSynRetrans +{sr_before}..{sr} (SYN-ACK hook: {synack})"
        );
    }
    Ok(format!(
        "{ov} overflows = ListenDrops, {acc} of the accept queue = ListenOverflows, {rt} SYN/SYN-ACK retransmits = TCPSynRetrans"
    ))
}

/// S7: twenty client-closed connections: twenty TIME_WAIT enters, sockstat up by twenty.
/// `start`, `now`: sockstat's tw and the CLOCK_MONOTONIC time it was read at. TIME_WAIT
/// sockets of earlier cases expire meanwhile (60 s after their enter, a burst of them in one
/// timer-wheel bucket): the exits seen between the two readings are subtracted, so the count
/// is exact rather than usually right.
fn s7(
    evs: &[Value],
    port: u16,
    (tw0, start_ns): (u64, u64),
    now: (u64, u64),
    n: u64,
) -> anyhow::Result<String> {
    let enters = evs
        .iter()
        .filter(|e| {
            e["type"] == "timewait" && e["event"] == "enter" && u(e, "dport") == port as u64
        })
        .count() as u64;
    let exits = evs
        .iter()
        .filter(|e| {
            e["type"] == "timewait"
                && e["event"] == "exit"
                && (start_ns..now.1).contains(&u(e, "ts_ns"))
        })
        .count() as u64;
    let tw = (now.0 + exits).saturating_sub(tw0);
    if enters != n || tw != n {
        bail!(
            "{enters} TIME_WAIT enters, sockstat tw +{} with {exits} older ones gone, expected {n}",
            now.0 as i64 - tw0 as i64
        );
    }
    Ok(format!(
        "{n} TIME_WAIT enters = sockstat tw (+ {exits} older ones gone)"
    ))
}

/// Both inventories list the same sockets: an instant snapshot (sock_diag, no BPF) and one
/// from `iter/tcp`, over a listener with TIME_WAIT, CLOSE_WAIT, FIN_WAIT2 and ESTABLISHED
/// sockets of its own port.
fn inventory_sources(bin: &str, port: u16) -> anyhow::Result<String> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    let mut keep = Vec::new();
    for i in 0..3 {
        let c = TcpStream::connect(("127.0.0.1", port))?;
        let (mut s, _) = l.accept()?;
        match i {
            0 => {
                drop(c);
                let _ = s.read(&mut [0u8; 16]);
            }
            1 => {
                c.shutdown(std::net::Shutdown::Write)?;
                keep.push(c);
                keep.push(s);
            }
            _ => {
                keep.push(c);
                keep.push(s);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let snap = |extra: &[&str]| -> anyhow::Result<Value> {
        let p = port.to_string();
        let out = Command::new(bin)
            .args(["snapshot", "--json", "--port", &p])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!(
                "snapshot {extra:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let hook = |v: &Value| -> String {
        v["hooks"]
            .as_array()
            .and_then(|h| h.iter().find(|h| h["signal"] == "inventory"))
            .map(|h| h["hook"].as_str().unwrap_or("none").to_string())
            .unwrap_or_default()
    };
    let diag = snap(&[])?;
    let iter = snap(&["--disable-hook", "sock_diag"])?;
    if hook(&diag) != "sock_diag" || hook(&iter) != "iter/tcp" {
        bail!(
            "inventories: {} and {} (sock_diag needs the inet_diag and tcp_diag modules)",
            hook(&diag),
            hook(&iter)
        );
    }
    // Where tracing programs cannot take socket cookies (5.10: doctor names it), the
    // iterator's records have none while sock_diag makes one: compare the rest.
    let no_cookies = iter["hooks"].as_array().is_some_and(|h| {
        h.iter()
            .any(|h| h["signal"] == "socket cookies" && h["hook"].is_null())
    });
    let (mut diag, mut iter) = (diag, iter);
    if no_cookies {
        for v in [&mut diag, &mut iter] {
            for l in v["listeners"].as_array_mut().into_iter().flatten() {
                if let Some(o) = l.as_object_mut() {
                    o.remove("cookie");
                }
            }
        }
    }
    for k in ["states", "listeners", "time_wait"] {
        if diag[k] != iter[k] {
            bail!("{k} differ: sock_diag {} vs iter/tcp {}", diag[k], iter[k]);
        }
    }
    let st = &diag["states"];
    let want = [
        ("LISTEN", 1),
        ("ESTABLISHED", 2),
        ("TIME_WAIT", 1),
        ("CLOSE_WAIT", 1),
        ("FIN_WAIT2", 1),
    ];
    for (k, n) in want {
        if st[k] != n {
            bail!("{k}: {} (want {n}) in {st}", st[k]);
        }
    }
    drop(keep);
    Ok("sock_diag and iter/tcp list the same sockets, queues and TIME_WAIT".into())
}

/// The two early ends of a timewait socket, as load: one left in the FIN_WAIT2 substate
/// (the peer never closes) expires after tcp_fin_timeout = 1 s; one in TIME_WAIT is taken by
/// a connect() from the same bound port (with timestamps the kernel takes the tuple at once,
/// whatever tcp_tw_reuse: tcp_twsk_unique has no twp for a bound port).
fn tw_exits_load(port: u16, client_port: u16) -> anyhow::Result<()> {
    let fin = set_sysctl("tcp_fin_timeout", "1")?;
    let res = (|| {
        let l = TcpListener::bind(("127.0.0.1", port))?;
        let c = TcpStream::connect(("127.0.0.1", port))?;
        let (held, _) = l.accept()?;
        drop(c);
        let c1 = connect_from(client_port, port)?;
        let (mut s1, _) = l.accept()?;
        drop(c1);
        let mut buf = [0u8; 16];
        let _ = s1.read(&mut buf);
        drop(s1);
        // Long enough for the FIN_WAIT2 one to expire before the trace stops.
        std::thread::sleep(Duration::from_millis(1300));
        let c2 = connect_from(client_port, port)?;
        let (mut s2, _) = l.accept()?;
        drop(c2);
        let _ = s2.read(&mut buf);
        drop(s2);
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        Ok(())
    })();
    set_sysctl("tcp_fin_timeout", &fin)?;
    res
}

/// What `tw_exits_load` must give: an `expired` exit after about a second in FIN_WAIT2, and a
/// `reused` exit of the first socket on `client_port` followed by the second one's enter.
fn tw_exits(evs: &[Value], port: u16, client_port: u16, recycled: u64) -> anyhow::Result<String> {
    let tw: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "timewait" && u(e, "dport") == port as u64)
        .collect();
    let brief = |v: &[&Value]| -> String {
        v.iter()
            .map(|e| {
                format!(
                    "{}/{}/{} sport {} cookie {}",
                    e["event"].as_str().unwrap_or("?"),
                    e["substate"].as_str().unwrap_or("?"),
                    e["reason"].as_str().unwrap_or("-"),
                    e["sport"],
                    e["cookie"]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let expired: Vec<&Value> = tw
        .iter()
        .copied()
        .filter(|e| e["event"] == "exit" && e["reason"] == "expired")
        .collect();
    let [x] = expired[..] else {
        bail!("expected one expiry: {}", brief(&tw));
    };
    let d = x["duration_ns"].as_u64().unwrap_or(0);
    if !(900_000_000..3_000_000_000).contains(&d) || x["substate"] != "FIN_WAIT2" {
        bail!("expiry after {d} ns in {}: {}", x["substate"], brief(&tw));
    }
    let mine: Vec<&Value> = tw
        .iter()
        .copied()
        .filter(|e| u(e, "sport") == client_port as u64 && e["event"] != "rearm")
        .collect();
    let seen = tw_pairs(&mine, "reason", "-");
    // Without tp_btf no socket has a cookie (the classic state hook cannot take one).
    let cookies = mine.len() == 3 && mine.iter().all(|e| u(e, "cookie") != 0);
    if seen != seq(&[("enter", "-"), ("exit", "reused"), ("enter", "-")])
        || (cookies
            && (mine[0]["cookie"] != mine[1]["cookie"] || mine[1]["cookie"] == mine[2]["cookie"]))
    {
        bail!("reuse of :{client_port}: {}", brief(&mine));
    }
    if recycled != 1 {
        bail!("TWRecycled +{recycled}, expected 1");
    }
    Ok(format!(
        "expired after {:.2} s in FIN_WAIT2; reused by connect(), TWRecycled +1",
        d as f64 / 1e9
    ))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let bin = args
        .first()
        .context("usage: xtask vm-guest TCPWATCH [--expect-fentry]")?
        .clone();
    // The VM kernels have BPF trampolines; this host refuses them.
    let expect_fentry = args.iter().any(|a| a == "--expect-fentry");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut results: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    let mut record = |name: &str, r: anyhow::Result<String>| {
        match &r {
            Ok(d) => println!("vm-case: ok {name}: {d}"),
            Err(e) => {
                let m = format!("{e:#}");
                let cut: String = m.chars().take(400).collect();
                println!("vm-case: FAIL {name}: {cut}");
            }
        }
        results.insert(name.to_string(), r.map_err(|e| format!("{e:#}")));
    };
    println!("vm-info: kernel {kernel}");

    // Every strategy the kernel supports loads and attaches; what it lacks is named.
    let doctor = (|| {
        let out = Command::new(&bin).arg("doctor").output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in text.lines() {
            println!("vm-info: doctor: {l}");
        }
        if !out.status.success() {
            bail!(
                "doctor failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let missing: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("UNAVAILABLE"))
            .map(|l| l.split(':').next().unwrap_or(l))
            .collect();
        if !text.contains("state: tp_btf/inet_sock_set_state") {
            bail!("the BTF state hook did not attach");
        }
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("segments per retransmit unknown"))
        {
            bail!("every kernel of the matrix has the segment offsets: {l}");
        }
        let tw_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("TIME_WAIT:"))
            .unwrap_or("no TIME_WAIT line");
        if expect_fentry && !tw_line.contains("TIME_WAIT: fentry/") {
            bail!("this kernel has BPF trampolines, TIME_WAIT should use them: {tw_line}");
        }
        // The VM kernels allow the listener-map iterator (this host refuses it: EPERM),
        // unless doctor names the missing socket storage of tracing programs (5.10).
        let no_storage = text.contains("socket storage: hash map by socket address");
        if expect_fentry
            && !no_storage
            && !text.contains("listener samples: iter/bpf_sk_storage_map")
        {
            bail!("the queue sampler should iterate LISTEN_SK on this kernel");
        }
        Ok(if missing.is_empty() {
            "every signal has a hook".to_string()
        } else {
            format!("degraded, named: {}", missing.join(", "))
        })
    })();
    record("doctor", doctor);
    record("inventory_sources", inventory_sources(&bin, 7400));

    // Default: the best hooks (fentry for TIME_WAIT where trampolines exist); `timer`: the
    // timer tracepoints instead of trampolines; `classic`: no tp_btf at all.
    for (mode, extra, base) in [
        ("tp_btf", &[][..], 7100u16),
        ("timer", &["--disable-hook", "fentry"][..], 7300),
        ("classic", &["--disable-hook", "tp_btf"][..], 7200),
    ] {
        let r = (|| {
            let t = Trace::start(&bin, extra)?;
            let tw = t.hook("TIME_WAIT");
            let tw0 = sockstat_tw();
            let tw0_ns = monotonic_ns();
            lifecycle(base + 1)?;
            churn(base + 3, 20)?;
            // s7 compares sockstat with the enters: sample it before the exits load.
            let tw_now = sockstat_tw();
            let tw_now_ns = monotonic_ns();
            let recycled0 = counter("TcpExt", "TWRecycled");
            let exits_load = tw.as_ref().map(|_| tw_exits_load(base + 4, base + 50));
            let recycled = counter("TcpExt", "TWRecycled") - recycled0;
            let evs = t.stop()?;
            let a = s1(&evs, base + 1, tw.as_deref())?;
            let (b, c) = match (&tw, exits_load) {
                (Some(hook), Some(load)) => (
                    s7(&evs, base + 3, (tw0 + 1, tw0_ns), (tw_now, tw_now_ns), 20)
                        .map(|m| format!("{m} ({hook})")),
                    load.and_then(|()| tw_exits(&evs, base + 4, base + 50, recycled))
                        .map(|m| format!("{m} ({hook})")),
                ),
                _ => {
                    let m = "TIME_WAIT unavailable with this strategy (named by doctor)";
                    (Ok(m.to_string()), Ok(m.to_string()))
                }
            };
            Ok::<_, anyhow::Error>((a, b, c))
        })();
        match r {
            Ok((a, b, c)) => {
                record(&format!("{mode}/s1_lifecycle"), Ok(a));
                record(&format!("{mode}/s7_time_wait"), b);
                record(&format!("{mode}/time_wait_exits"), c);
            }
            Err(e) => {
                let m = format!("{e:#}");
                for case in ["s1_lifecycle", "s7_time_wait", "time_wait_exits"] {
                    record(&format!("{mode}/{case}"), Err(anyhow::anyhow!("{m}")));
                }
            }
        }
        // The overflow path does not depend on the TIME_WAIT hook.
        if mode != "timer" {
            record(
                &format!("{mode}/s3_s5_overflow_retransmits"),
                s3_s5(&bin, extra, base + 2, false),
            );
            record(
                &format!("{mode}/s5_listener_from_before_start"),
                s3_s5(&bin, extra, base + 5, true),
            );
        }
    }
    let failed = results.values().filter(|r| r.is_err()).count();
    println!(
        "vm-info: {kernel}: {} passed, {failed} failed",
        results.len() - failed
    );
    if failed > 0 {
        bail!("{failed} case(s) failed");
    }
    Ok(())
}
