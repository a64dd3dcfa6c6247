//! The command line's behaviour around the events: in-kernel filters, loss counted and
//! reported, exit codes on a closed stdout and SIGTERM, running under `ip netns exec`, and
//! the kernel side's diagnostics on stderr.
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    (
        "event_modes_run_with_exactly_cap_bpf_and_cap_perfmon",
        documented_capabilities,
    ),
    ("hostile_process_names_are_escaped_in_text", hostile_names),
    ("filters_port_pid_family_in_kernel", filters),
    ("loss_is_counted_and_reported", loss_reported),
    ("closed_stdout_and_sigterm_exit_zero", exits),
    ("runs_under_ip_netns_exec", under_ip_netns_exec),
    (
        "netns_exec_scope_and_all_netns_widens_it",
        netns_exec_scope_and_all_netns,
    ),
    (
        "kernel_side_diagnostics_reach_stderr",
        kernel_side_diagnostics,
    ),
];

const W: Duration = Duration::from_secs(10);

/// --port, --pid and -6 are applied in the kernel: nothing else reaches the output.
fn filters() {
    let ns = Netns::new();
    let by_port = Tracer::start(&ns, &["--port", "8085"]);
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let by_pid = Tracer::start(&ns, &["--pid", &client.pid.to_string()]);
    let v6 = Tracer::start(&ns, &["-6"]);
    let l1 = server.ok("listen 127.0.0.1:8085 16");
    let l2 = server.ok("listen [::1]:8086 16");
    for target in ["127.0.0.1:8085", "[::1]:8086"] {
        let (c, _) = id_port(&client.ok(&format!("connect {target}")));
        let l = if target.ends_with("8085") { &l1 } else { &l2 };
        let (a, _) = id_port(&server.ok(&format!("accept {l}")));
        client.ok(&format!("close {c}"));
        server.ok(&format!("close {a}"));
    }
    for t in [&by_port, &by_pid, &v6] {
        t.wait_for("both connections", W, |evs| {
            evs.iter().any(|e| e["old"] == "FIN_WAIT2")
                && evs.iter().filter(|e| e["old"] == "FIN_WAIT2").count() >= 1
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let port_evs = by_port.stop();
    assert!(!port_evs.is_empty());
    for e in &port_evs {
        assert!(
            e["sport"] == 8085 || e["dport"] == 8085,
            "--port 8085 let through {e}"
        );
    }
    let pid_evs = by_pid.stop();
    assert_eq!(
        of_type(&pid_evs, "state").len(),
        10,
        "two client sockets x 5 transitions: {pid_evs:#?}"
    );
    for e in &pid_evs {
        assert_eq!(
            e["pid"].as_u64(),
            Some(client.pid as u64),
            "--pid let through {e}"
        );
    }
    let v6_evs = v6.stop();
    assert!(!v6_evs.is_empty());
    for e in &v6_evs {
        assert_eq!(e["family"], "inet6", "-6 let through {e}");
    }
}

/// A reader that stops reading makes the kernel drop records: they are counted, reported on
/// stderr and as `loss` records, and received + lost equals what happened.
fn loss_reported() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &["--ring-mib", "1"]);
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8087 4096");
    tracer.pause(true);
    let n = 3000;
    assert_eq!(server.ok_timeout(&format!("churn {l} {n}")), n.to_string());
    server.ok(&format!("close {l}"));
    tracer.pause(false);
    // Every connection is 10 transitions (5 per side), plus the listener's 2.
    let expected = n * 10 + 2;
    std::thread::sleep(Duration::from_millis(1500));
    let (evs, stderr) = tracer.finish();
    let states = of_type(&evs, "state").len() as u64;
    let lost: u64 = of_type(&evs, "loss")
        .iter()
        .map(|e| e["kernel_dropped_by_type"]["state"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        lost > 0,
        "a 1 MiB ring behind a stalled reader must overflow"
    );
    assert_eq!(
        states + lost,
        expected,
        "received {states} + lost {lost}: {:#?}",
        of_type(&evs, "loss")
    );
    assert!(
        stderr.contains("tcpwatch: lost "),
        "loss is reported on stderr: {stderr}"
    );
    let all_lost: u64 = of_type(&evs, "loss")
        .iter()
        .map(|e| e["kernel_dropped"].as_u64().unwrap())
        .sum();
    assert!(
        stderr.contains(&format!("{all_lost} lost")),
        "the final summary counts it: {stderr}"
    );
}

/// `tcpwatch trace | head -1` ends with status 0 when the pipe closes; SIGTERM ends it with 0.
fn exits() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let ns = Netns::new();
    let mut child = Command::new(TCPWATCH)
        .args(["trace", "--netns", &ns.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tcpwatch");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut server = ns.peer("tw-server");
    let l = server.ok("listen 127.0.0.1:8088 64");
    std::thread::sleep(Duration::from_millis(1500));
    server.ok(&format!("churn {l} 5"));
    let mut line = String::new();
    out.read_line(&mut line).expect("a first line");
    assert!(line.contains("state"), "{line}");
    drop(out);
    // More events make the writer hit the closed pipe.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        server.ok(&format!("churn {l} 20"));
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tcpwatch kept running after its stdout closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "closed pipe");

    let mut child = Command::new(TCPWATCH)
        .args(["trace", "--netns", &ns.name])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpwatch");
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("tracing;") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "tcpwatch exited early"
        );
    }
    // Its stderr closes while it runs (the reader went away): the summary it writes at the
    // end is lost, the exit is still clean.
    drop(err);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "SIGTERM with stderr closed"
    );
}

/// `ip netns exec` remounts /sys without tracefs: tcpwatch mounts it and still sees events.
/// Without `--netns` it watches the namespace it was started in (as `ss` does), not the
/// host: a connection in another namespace at the same time is not in its output.
fn under_ip_netns_exec() {
    let ns = Netns::new();
    let other = Netns::new();
    let args = ["netns", "exec", &ns.name, TCPWATCH, "trace", "--json"];
    let tracer = Tracer::start_cmd("ip", &args);
    let mut elsewhere = other.peer("tw-elsewhere");
    let mut client = ns.peer("tw-client");
    assert_eq!(elsewhere.cmd("connect 127.0.0.1:9"), "err ECONNREFUSED");
    assert_eq!(client.cmd("connect 127.0.0.1:9"), "err ECONNREFUSED");
    tracer.wait_for("SYN_SENT -> CLOSE", W, |evs| {
        evs.iter().any(|e| is(e, "SYN_SENT", "CLOSE"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let (evs, stderr) = tracer.finish();
    assert!(
        stderr.contains(&format!("watching network namespace {}", ns.inode())),
        "{stderr}"
    );
    assert!(
        evs.iter().all(|e| e["netns"] == ns.inode()),
        "events from outside the namespace: {}",
        census(&evs)
    );
    let tl = timeline(&evs, |e| is(e, "CLOSE", "SYN_SENT"));
    assert_eq!(
        transitions(&tl),
        seq(&[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")])
    );
    assert_owner(&tl, &client);
}

/// The same scope for a snapshot, and `--all-netns` widens it to every namespace; from the
/// host's namespace the default stays host-wide.
fn netns_exec_scope_and_all_netns() {
    let ns = Netns::new();
    let other = Netns::new();
    let mut inside = ns.peer("tw-inside");
    inside.ok("listen 127.0.0.1:8152 8");
    let mut outside = other.peer("tw-outside");
    outside.ok("listen 127.0.0.1:8153 8");
    let run = |cmd: &mut Command| -> (Vec<u64>, String) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ports: Vec<u64> = v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["port"].as_u64())
            .filter(|p| *p == 8152 || *p == 8153)
            .collect();
        ports.sort();
        (ports, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let inside_ns = |extra: &[&str]| {
        run(Command::new("ip")
            .args(["netns", "exec", &ns.name, TCPWATCH])
            .args(["snapshot", "--json", "--standalone"])
            .args(extra))
    };
    let (ports, err) = inside_ns(&[]);
    assert_eq!(ports, [8152], "{err}");
    assert!(err.contains("--all-netns"), "{err}");
    let (ports, err) = inside_ns(&["--all-netns"]);
    assert_eq!(ports, [8152, 8153], "{err}");
    assert!(!err.contains("watching network namespace"), "{err}");
    let (ports, err) = run(Command::new(TCPWATCH).args(["snapshot", "--json", "--standalone"]));
    assert_eq!(ports, [8152, 8153], "from the host: {err}");
    // --netns and --all-netns contradict each other.
    let out = Command::new(TCPWATCH)
        .args(["snapshot", "--netns", &ns.name, "--all-netns"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The programs' diagnostics (aya-log) reach stderr: with the listener-owner map shrunk to
/// one entry, the second listener's insert fails in the kernel, which says so — and the
/// events go on (its transitions are still reported).
fn kernel_side_diagnostics() {
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &["--map-entries", "LISTENERS=1"]);
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:9101 16");
    server.ok("listen 127.0.0.1:9102 16");
    tracer.wait_for("both listeners", W, |evs| {
        evs.iter().filter(|e| is(e, "CLOSE", "LISTEN")).count() >= 2
    });
    // Diagnostics are read with the loss counters, once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (evs, stderr) = tracer.finish();
    assert!(
        stderr.contains("kernel side warn: listener port 9102: the listener map is full"),
        "{stderr}"
    );
    assert_eq!(
        evs.iter().filter(|e| is(e, "CLOSE", "LISTEN")).count(),
        2,
        "{evs:#?}"
    );
}

/// A process that names itself with terminal escape sequences: `snapshot` and `trace` text
/// show the name escaped, never the raw bytes a terminal would obey.
fn hostile_names() {
    use std::io::Read as _;
    let ns = Netns::new();
    let evil = "\x1b]0;pwn\x07\x1b[2J";
    let mut trace = Command::new(TCPWATCH)
        .args(["trace", "--netns", &ns.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting trace");
    std::thread::sleep(Duration::from_millis(1500));
    let mut server = ns.peer(evil);
    server.ok("listen 127.0.0.1:9201 16");
    let snap = Command::new(TCPWATCH)
        .args(["snapshot", "--netns", &ns.name])
        .output()
        .expect("snapshot");
    let text = String::from_utf8_lossy(&snap.stdout).into_owned();
    assert!(text.contains("\\x1b]0;pwn"), "{text}");
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(trace.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    trace
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = trace.wait();
    assert!(out.contains("\\x1b]0;pwn"), "{out}");
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
}

/// The README's promise: root, or CAP_BPF and CAP_PERFMON. As an unprivileged user with
/// exactly those two (no tracefs access, no setns, no kallsyms), `trace` and `snapshot
/// --duration` run, report what they lack by name, and see S1's transitions.
fn documented_capabilities() {
    let ns = Netns::new();
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon",
            "--ambient-caps=-all,+bpf,+perfmon",
            "--bounding-set=-all,+bpf,+perfmon",
            TCPWATCH,
        ])
        .args(args);
        c
    };
    let tracer = Tracer::start_cmd(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon",
            "--ambient-caps=-all,+bpf,+perfmon",
            "--bounding-set=-all,+bpf,+perfmon",
            TCPWATCH,
            "trace",
            "--json",
            "--netns",
            &ns.name,
        ],
    );
    let mut server = ns.peer("tw-server");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:9301 16");
    let snap = as_nobody(&["snapshot", "--json", "--duration", "3", "--netns", &ns.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("snapshot");
    std::thread::sleep(Duration::from_millis(1500));
    let (c, _) = id_port(&client.ok("connect 127.0.0.1:9301"));
    server.ok(&format!("accept {l}"));
    client.ok(&format!("close {c}"));
    tracer.wait_for("the client's close", W, |evs| {
        evs.iter().any(|e| is(e, "FIN_WAIT2", "CLOSE"))
    });
    let (evs, stderr) = tracer.finish();
    assert!(
        evs.iter().any(|e| is(e, "SYN_SENT", "ESTABLISHED")),
        "transitions seen: {stderr}"
    );
    assert!(!stderr.contains("not mounted"), "{stderr}");
    assert!(
        stderr.contains("privileges: limited") && stderr.contains("CAP_SYSLOG"),
        "what is missing is named: {stderr}"
    );
    let out = snap.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snapshot JSON");
    assert!(
        v["histograms"]["handshake_us"]["count"].as_u64() >= Some(1),
        "the handshake was watched: {v}"
    );
}
