//! `tcpwatch check -- CMD`: the real binary runs a scripted peer as its command inside a test
//! namespace; exit codes, the JSON report and JUnit XML are asserted on clean traffic, S5
//! (listen overflow), S8 (CLOSE_WAIT leak), and against traffic outside the command's tree.
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    (
        "check_passes_clean_traffic_and_scopes_to_the_command",
        clean,
    ),
    ("check_fails_on_s5_listen_overflow", overflow),
    ("check_fails_on_s8_close_wait_leak", leak),
    ("check_exit_codes_for_command_failures", exit_codes),
    ("check_killed_leaves_no_command_and_no_cgroup", killed_check),
    ("a_second_signal_ends_the_shutdown_at_once", second_signal),
];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    json: Value,
    junit: String,
}

/// `tcpwatch check ARGS -- ip netns exec NS <peer> tw-app`, the peer fed `script` on stdin.
fn check(ns: &Netns, args: &[&str], script: &str, during: impl FnOnce()) -> Run {
    let dir = std::env::temp_dir();
    let json = dir.join(format!("twcheck-{}.json", std::process::id()));
    let junit = dir.join(format!("twcheck-{}.xml", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(TCPWATCH);
    cmd.arg("check")
        .args(args)
        .args([
            "--json",
            json.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ])
        .args(["--", "ip", "netns", "exec", &ns.name])
        .arg(exe)
        .args(["peer", "tw-app"])
        .stdin(Stdio::piped());
    // `during` runs once tcpwatch is attached and has started the command.
    let mut run = Watching::start(&mut cmd, "tcpwatch: watching");
    // The peer reads its script only once tcpwatch is attached and has started it.
    run.child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    during();
    let out = run.finish();
    let stderr = out.stderr;
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let run = Run {
        code: out.code.unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        json: serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("JSON report ({e}): {text}\nstderr:\n{stderr}")),
        junit: std::fs::read_to_string(&junit).unwrap_or_default(),
        stderr,
    };
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&junit);
    run
}

fn assertion<'a>(r: &'a Run, name: &str) -> &'a Value {
    r.json["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no assertion {name}: {}", r.json))
}

fn app_pid(r: &Run) -> u32 {
    r.stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("ok "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the peer's pid reply: {}", r.stdout))
}

const ALL: &[&str] = &[
    "--no-listen-overflow",
    "--max-retransmits",
    "0",
    "--max-resets",
    "0",
    "--close-wait-leak",
    "2",
    "--max-syn-sent-ms",
    "500",
    "--max-time-wait",
    "1",
];

fn clean() {
    let ns = Netns::new();
    // One connection, closed by the client first: one TIME_WAIT, no resets, no retransmits.
    let script = "pid\nlisten 127.0.0.1:8130 16\nconnect 127.0.0.1:8130\naccept 1\nclose 2\nsleep 300\nclose 3\nsleep 1200\n";
    // Meanwhile a process outside the command's tree is refused five times (five resets).
    let mut noise = ns.peer("tw-noise");
    let during = || {
        std::thread::sleep(Duration::from_millis(400));
        for _ in 0..5 {
            assert!(noise.cmd("connect 127.0.0.1:9").contains("ECONNREFUSED"));
        }
    };
    let r = check(&ns, ALL, script, during);
    assert_eq!(r.code, 0, "exit 0 on clean traffic:\n{}", r.stderr);
    assert_eq!(r.json["verdict"], "pass");
    let pid = app_pid(&r);
    assert!(
        r.json["assertions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["passed"] == true),
        "{}",
        r.json
    );
    assert_eq!(r.json["assertions"].as_array().unwrap().len(), 6);
    let o = &r.json["observed"];
    assert_eq!(o["time_wait_entered"], 1, "{o}");
    assert_eq!(o["time_wait_peak"], 1);
    assert_eq!(
        o["resets_received"], 0,
        "the noise is not the command's: {o}"
    );
    assert_eq!(o["resets_sent"], 0);
    assert_eq!(o["retransmits"]["syn"], 0);
    // Listener, client, accepted child; the client's TIME_WAIT counts as a socket of its own.
    assert_eq!(o["sockets"], 4, "{o}");
    assert_eq!(o["syn_sent_longest"][0]["owner"]["pid"], pid);
    assert_eq!(o["syn_sent_longest"][0]["remote"], "127.0.0.1:8130");
    assert_eq!(r.json["command_exit"]["code"], 0);
    assert!(
        r.json["scope"].as_str().unwrap().contains("cgroup"),
        "{}",
        r.json["scope"]
    );
    assert!(
        r.stderr.contains("tcpwatch check: PASS, exit 0"),
        "{}",
        r.stderr
    );
    assert!(
        r.junit.contains(r#"tests="8" failures="0" errors="0""#),
        "{}",
        r.junit
    );

    // The same with --any-process: the noise's resets now count and fail the run.
    let mut noise = ns.peer("tw-noise");
    let noise_pid = noise.pid;
    let during = || {
        std::thread::sleep(Duration::from_millis(400));
        for _ in 0..5 {
            assert!(noise.cmd("connect 127.0.0.1:9").contains("ECONNREFUSED"));
        }
    };
    let script = "pid\nsleep 1500\n";
    let r = check(
        &ns,
        &["--any-process", "--netns", &ns.name, "--max-resets", "0"],
        script,
        during,
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json["verdict"], "fail");
    let a = assertion(&r, "--max-resets 0");
    // Both ends are here: the kernel's RST for the closed port (no socket, no owner) and the
    // noise's socket receiving it.
    assert_eq!(a["observed"], "10 (5 sent, 5 received)", "{a}");
    assert!(
        a["details"][1]
            .as_str()
            .unwrap()
            .contains(&format!("({noise_pid}/tw-noise) in SYN_SENT")),
        "{a}"
    );
}

fn overflow() {
    // S5: backlog 2, six clients, nobody accepts. The kernel holds 3, drops the rest.
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let before = ns.counter("TcpExt", "ListenOverflows");
    let script = "pid\nlisten 127.0.0.1:8131 2\nconnect_nb 127.0.0.1:8131 6\nsleep 1500\n";
    let r = check(
        &ns,
        &["--no-listen-overflow", "--max-time-wait", "100"],
        script,
        || (),
    );
    let kernel = ns.counter("TcpExt", "ListenOverflows") - before;
    assert_eq!(r.code, 1, "exit 1 on an overflow:\n{}", r.stderr);
    assert_eq!(r.json["verdict"], "fail");
    let pid = app_pid(&r);
    let a = assertion(&r, "--no-listen-overflow");
    assert_eq!(a["passed"], false);
    assert!(kernel > 0, "the kernel counted overflows");
    assert_eq!(
        a["observed"],
        kernel.to_string(),
        "every overflow the kernel counted (ListenOverflows delta {kernel}): {a}"
    );
    let d = a["details"][0].as_str().unwrap();
    assert!(
        d.starts_with(&format!(
            "listener 127.0.0.1:8131 ({pid}/tw-app): {kernel} accept queue overflow(s)"
        )),
        "{d}"
    );
    assert_eq!(assertion(&r, "--max-time-wait 100")["passed"], true);
    let ov = &r.json["observed"]["overflows"][0];
    assert_eq!(
        (ov["listener"].as_str(), ov["queue"].as_str()),
        (Some("127.0.0.1:8131"), Some("accept"))
    );
    assert!(
        r.json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == "accept_queue_overflow"
                && f["what"]
                    .as_str()
                    .unwrap()
                    .contains("with its accept queue full (peak 3/2)")),
        "the snapshot's finding names the sysctl: {}",
        r.json["findings"]
    );
    assert!(
        r.stderr.contains("FAIL --no-listen-overflow"),
        "{}",
        r.stderr
    );
    assert!(
        r.junit.contains(r#"failures="1" errors="0""#),
        "{}",
        r.junit
    );
    assert!(
        r.junit
            .contains(r#"<testcase name="--no-listen-overflow" classname="tcpwatch.check""#)
    );
}

fn leak() {
    // S8: the client closes, the application keeps its end for 2.5 s.
    let ns = Netns::new();
    let script =
        "pid\nlisten 127.0.0.1:8132 16\nconnect 127.0.0.1:8132\naccept 1\nclose 2\nsleep 2500\n";
    let r = check(&ns, &["--close-wait-leak", "1.5"], script, || ());
    assert_eq!(r.code, 1, "{}", r.stderr);
    let pid = app_pid(&r);
    let a = assertion(&r, "--close-wait-leak 1.5");
    assert_eq!(a["passed"], false);
    let d = a["details"][0].as_str().unwrap();
    // The command's exit closes the socket: CLOSE_WAIT lasted the 2.5 s of sleep.
    assert!(
        d.starts_with("127.0.0.1:8132 -> 127.0.0.1:") && d.contains(&format!("({pid}/tw-app) 2.")),
        "{d}"
    );
    assert!(d.contains("s in CLOSE_WAIT: the peer closed"), "{d}");
    let cw = &r.json["observed"]["close_wait_longest"][0];
    let ms = cw["ms"].as_f64().unwrap();
    assert!((2500.0..3500.0).contains(&ms), "CLOSE_WAIT for {ms} ms");
}

fn exit_codes() {
    let ns = Netns::new();
    // A command that succeeds with nothing to judge: 0.
    let r = check(&ns, &["--max-resets", "0"], "pid\nexit\n", || ());
    assert_eq!(r.code, 0, "a peer that exits 0: {}", r.stderr);
    assert_eq!(r.json["observed"]["events"], 0);
    // The command fails, no assertion does: 3, and the report says how it ended.
    let out = Command::new(TCPWATCH)
        .args(["check", "--max-resets", "0", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("tcpwatch check: COMMAND FAILED (assertions held), exit 3"),
        "{err}"
    );
    assert!(err.contains("exited 7"), "{err}");
    // An assertion failure wins over the command's failure.
    let out = Command::new(TCPWATCH)
        .args([
            "check",
            "--max-resets",
            "0",
            "--",
            "bash",
            "-c",
            ": 2>/dev/null <>/dev/tcp/127.0.0.1/9; exit 5",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("FAIL --max-resets 0") && err.contains("exited 5"),
        "{err}"
    );
    // A command that cannot start is a usage error: 2, one line.
    let out = Command::new(TCPWATCH)
        .args(["check", "--", "/nonexistent/cmd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim().lines().last().unwrap(),
        "tcpwatch: cannot run `/nonexistent/cmd`: No such file or directory (os error 2)"
    );
    // No command at all: clap's usage error.
    let out = Command::new(TCPWATCH)
        .args(["check", "--no-listen-overflow"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No cgroup left behind.
    let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tcpwatch-check-"))
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

/// The directory where `tcpwatch-check-*` cgroups of a run started from here appear: this
/// process's cgroup, where the cgroup2 hierarchy is mounted in process `pid`'s view (the
/// test binary's own mounts may differ from tcpwatch's).
fn check_cgroup_dir(pid: u32) -> std::path::PathBuf {
    let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim();
    let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mount = mi
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .expect("a cgroup2 mount")
        .to_string();
    std::path::Path::new(&mount).join(rel.trim_start_matches('/'))
}

fn check_cgroups(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("tcpwatch-check-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `check` killed with SIGKILL (no cleanup runs): its command dies with it instead of living
/// on under init, and the cgroup it leaves is removed by the next run.
fn killed_check() {
    let pidfile = std::env::temp_dir().join(format!("twcheck-pid-{}", std::process::id()));
    let _ = std::fs::remove_file(&pidfile);
    let mut check = Command::new(TCPWATCH)
        .args([
            "check",
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 300", pidfile.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let cmd_pid: u32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(Instant::now() < end, "the command never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&pidfile);
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    let ours = format!("tcpwatch-check-{}", check.id());
    let dir = check_cgroup_dir(check.id());
    let check_cgroups = || check_cgroups(&dir);
    assert!(
        check_cgroups().iter().any(|p| p.ends_with(&ours)),
        "the run's cgroup exists: {:?}",
        check_cgroups()
    );
    check.kill().unwrap();
    check.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while alive(cmd_pid) {
        assert!(
            Instant::now() < end,
            "the command outlived its killed check"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        check_cgroups().iter().any(|p| p.ends_with(&ours)),
        "SIGKILL leaves the cgroup behind"
    );
    let next = Command::new(TCPWATCH)
        .args(["check", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        next.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    assert!(
        !check_cgroups().iter().any(|p| p.ends_with(&ours)),
        "the next run removed the stale cgroup: {:?}",
        check_cgroups()
    );
}

/// The first SIGTERM starts the shutdown (check passes it on and waits up to 10 s for a
/// command that ignores it); a second one ends tcpwatch at once, with 128 + SIGTERM.
fn second_signal() {
    // stderr to a file: the command's own child (sleep) keeps a pipe open after tcpwatch
    // is gone.
    let errf = std::env::temp_dir().join(format!("twsig-{}", std::process::id()));
    let mut check = Command::new(TCPWATCH)
        .args([
            "check",
            "--",
            "sh",
            "-c",
            "trap '' TERM INT; sleep 31.234; :",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(check.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        check.try_wait().unwrap().is_none(),
        "still waiting for the command after the first signal"
    );
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(check.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(st) = check.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the second signal did not end it"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let err = std::fs::read_to_string(&errf).unwrap_or_default();
    let _ = std::fs::remove_file(&errf);
    let _ = Command::new("pkill").args(["-f", "sleep 31.234"]).status();
    assert!(err.contains("signalled again: exiting now"), "{err}");
}
