//! Command-line contract without root: help, usage errors and the privilege error (the latter run
//! as an unprivileged user even when the suite runs as root).
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tcpwatch");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running tcpwatch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_exits_zero_with_examples() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("trace") && out.contains("EXAMPLES"), "{out}");
    let o = run(&["trace", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--json", "--port", "--lport", "--rport", "--pid", "--comm", "--netns", "--ipv4", "--ipv6",
    ] {
        assert!(out.contains(flag), "trace --help lacks {flag}: {out}");
    }
}

#[test]
fn usage_errors_exit_two() {
    for args in [
        &["trace", "--bogus"][..],
        &["trace", "--port", "0"],
        &["trace", "--port", "70000"],
        &["trace", "--pid", "abc"],
        &["trace", "-4", "-6"],
        &["trace", "--ring-mib", "3"],
        &["nosuchcommand"],
        &[],
        &["check", "--no-listen-overflow"],
        &["check", "--max-retransmits", "rst=1", "--", "true"],
        &["check", "--max-retransmits", "-1", "--", "true"],
        &["check", "--close-wait-leak", "soon", "--", "true"],
        &["check", "--grace", "-1", "--", "true"],
        &["snapshot", "--netns", "/etc/passwd"],
        &["snapshot", "--netns", "/proc/self/ns/mnt"],
        &["snapshot", "--netns", "4294967295"],
        &["top", "--replay", "x", "--speed", "inf"],
        &["top", "--replay", "x", "--speed", "nan"],
        &["top", "--replay", "x", "--speed", "-1"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty(), "{args:?} explains itself");
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
    }
}

#[test]
fn bad_values_get_one_line() {
    let o = run(&["trace", "--netns", "no-such-namespace-here"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("tcpwatch: --netns no-such-namespace-here: no such namespace"),
        "{e}"
    );
    let o = run(&["check", "--max-retransmits", "rst=1", "--", "true"]);
    assert!(
        stderr(&o).contains("`rst` is not a retransmit kind (syn, synack, data, fin)"),
        "{}",
        stderr(&o)
    );
    let o = run(&["trace", "--comm", "a-name-longer-than-15"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

fn unprivileged(args: &[&str]) -> Output {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(BIN)
            .args(args)
            .output()
            .expect("running setpriv (util-linux)")
    } else {
        run(args)
    }
}

#[test]
fn unprivileged_user_gets_the_capability_named() {
    for cmd in [&["trace"][..], &["doctor"], &["check", "--", "true"]] {
        let o = unprivileged(cmd);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        assert!(
            e.contains("CAP_BPF") && e.contains("CAP_PERFMON") && e.contains("root"),
            "{e}"
        );
    }
}

#[test]
fn unprivileged_instant_snapshot_lists_this_namespace_and_names_what_it_misses() {
    let o = unprivileged(&["snapshot", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let snap: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let hook = |signal: &str| {
        snap["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["signal"] == signal)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(hook("inventory")["hook"], "sock_diag", "{}", snap["hooks"]);
    let note = hook("privileges")["note"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        note.contains("CAP_SYS_ADMIN") && note.contains("CAP_SYS_PTRACE"),
        "{note}"
    );
    assert_eq!(
        snap["namespaces"].as_array().unwrap().len(),
        1,
        "its own only"
    );
    assert!(stderr(&o).contains("not root"), "{}", stderr(&o));
    // Watching events needs BPF: the capabilities are named as for trace.
    let o = unprivileged(&["snapshot", "--duration", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("CAP_BPF"), "{}", stderr(&o));
}

/// A capture is read in bounded memory and time, whatever it holds: endless input without a
/// newline, or lines that are no events, end in one line naming the first bad line.
#[test]
fn replaying_something_that_is_no_capture_exits_two() {
    let t = std::time::Instant::now();
    let o = run(&["top", "--replay", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim(),
        "tcpwatch: --replay /dev/zero: no tcpwatch event in it (line 1: longer than 65536 bytes)"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    let dir = std::env::temp_dir().join(format!("twcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("not-a-capture.jsonl");
    std::fs::write(&f, "\n{\"a\": 1}\n\x1b[31mred\n").unwrap();
    let o = run(&["top", "--replay", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).ends_with("no tcpwatch event in it (line 2: not a tcpwatch event)\n"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
