//! `tcpwatch top` in a real terminal (tmux): the overflowing listener's row appears while S5
//! runs and its detail view opens; a capture replays without root.
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub const TESTS: &[crate::Test] = &[
    ("tui_shows_a_live_overflow_and_its_detail", live_overflow),
    ("tui_replays_a_capture_without_root", replay),
];

fn live_overflow() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1");
    let mut server = ns.peer("tw-server");
    server.ok("listen 127.0.0.1:8120 2");
    server.ok("listen 127.0.0.1:8121 64");
    let status = std::env::temp_dir().join(format!("twtui-exit-{}", std::process::id()));
    let _ = std::fs::remove_file(&status);
    let t = Tmux::start(
        "twtui",
        110,
        32,
        &format!(
            "{TCPWATCH} top --netns {}; echo $? > {}",
            ns.name,
            status.display()
        ),
    );
    t.wait_for("the listeners", Duration::from_secs(20), |s| {
        s.contains("listeners (2)") && s.contains("127.0.0.1:8120")
    });
    let mut client = ns.peer("tw-client");
    client.ok("connect_nb 127.0.0.1:8120 6");
    // The queue comes from the inventory, refreshed every second; the overflow from the 4 Hz
    // listener sampler.
    let s = t.wait_for("the overflow", Duration::from_secs(15), |s| {
        s.contains("[critical] listener 127.0.0.1:8120 dropped")
            && s.lines()
                .any(|l| l.starts_with("127.0.0.1:8120") && l.contains("3/2"))
    });
    let row = s
        .lines()
        .find(|l| l.starts_with("127.0.0.1:8120"))
        .expect("the listener's row")
        .to_string();
    assert!(
        row.contains(&format!("{}/tw-", server.pid)),
        "owner in the row: {row}"
    );
    assert!(
        row.contains("[######] 3/2 3"),
        "accept queue at its limit: {row}"
    );
    let other = s
        .lines()
        .find(|l| l.starts_with("127.0.0.1:8121"))
        .expect("the other listener")
        .to_string();
    assert!(
        other.contains("0/0/0"),
        "the other listener has no overflow: {other}"
    );
    // The overflowing listener is the first row: open its detail view.
    t.keys("Enter");
    let d = t.wait_for("the detail view", Duration::from_secs(5), |s| {
        s.contains("listener 127.0.0.1:8120 ─")
    });
    assert!(
        d.contains("the kernel holds max + 1") && d.contains("overflows: accept "),
        "{d}"
    );
    assert!(!d.contains("overflows: accept 0,"), "{d}");
    t.keys("Escape");
    t.keys("2");
    t.wait_for("the connections view", Duration::from_secs(5), |s| {
        s.contains("connections") && s.contains("SYN_SENT")
    });
    t.keys("q");
    let end = Instant::now() + Duration::from_secs(10);
    while t.alive() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!t.alive(), "q quits");
    assert_eq!(
        std::fs::read_to_string(&status).unwrap_or_default().trim(),
        "0",
        "exit status 0"
    );
    let _ = std::fs::remove_file(&status);
}

fn replay() {
    // Capture S8 (a CLOSE_WAIT leak) with trace --json, then replay it as nobody.
    let ns = Netns::new();
    let tracer = Tracer::start(&ns, &[]);
    let mut server = ns.peer("tw-leaky");
    let mut client = ns.peer("tw-client");
    let l = server.ok("listen 127.0.0.1:8122 16");
    let c = id_port(&client.ok("connect 127.0.0.1:8122")).0;
    server.ok(&format!("accept {l}"));
    client.ok(&format!("close {c}"));
    tracer.wait_for("CLOSE_WAIT", Duration::from_secs(10), |evs| {
        evs.iter().any(|e| is(e, "ESTABLISHED", "CLOSE_WAIT"))
    });
    let evs = tracer.stop();
    let cap = std::env::temp_dir().join(format!("twtui-cap-{}.jsonl", std::process::id()));
    let text: String = evs.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&cap, text).unwrap();
    // World-readable so the unprivileged replay can open it.
    let _ = Command::new("chmod")
        .args(["644", cap.to_str().unwrap()])
        .status();
    let t = Tmux::start(
        "twtui",
        110,
        32,
        &format!(
            "setpriv --reuid=65534 --regid=65534 --clear-groups {TCPWATCH} top --replay {}",
            cap.display()
        ),
    );
    let s = t.wait_for("the replayed state", Duration::from_secs(10), |s| {
        s.contains("replay") && s.contains("CLOSE_WAIT")
    });
    assert!(
        s.lines()
            .any(|l| l.starts_with("CLOSE_WAIT") && l.contains(" 1 ")),
        "one CLOSE_WAIT from the events: {s}"
    );
    t.keys("2");
    let s = t.wait_for("the connections", Duration::from_secs(5), |s| {
        s.contains("tw-leaky")
    });
    assert!(s.contains("CLOSE_WAIT"), "{s}");
    t.keys("q");
    let _ = std::fs::remove_file(&cap);
}
