//! Privileged integration tests (root): real sockets in throwaway network namespaces, observed by
//! the real tcpwatch binary, asserting exact kernel behaviour. Run with
//! `cargo test -p tcpwatch --features privileged-tests --test privileged [-- FILTER]`.
//! A custom harness runs tests one at a time (they attach system-wide hooks) and lets the same
//! binary act as the scripted TCP peer (`privileged peer NAME`).
mod check;
mod daemon;
mod findings;
mod harness;
mod modes;
mod overflows;
mod peer;
mod serve;
mod signals;
mod snapshot;
mod states;
mod timewait;
mod tui;

use std::panic::AssertUnwindSafe;
use std::time::Instant;

type Test = (&'static str, fn());

fn all() -> Vec<Test> {
    let mut v = Vec::new();
    v.extend_from_slice(states::TESTS);
    v.extend_from_slice(modes::TESTS);
    v.extend_from_slice(signals::TESTS);
    v.extend_from_slice(overflows::TESTS);
    v.extend_from_slice(timewait::TESTS);
    v.extend_from_slice(snapshot::TESTS);
    v.extend_from_slice(findings::TESTS);
    v.extend_from_slice(tui::TESTS);
    v.extend_from_slice(check::TESTS);
    v.extend_from_slice(serve::TESTS);
    v.extend_from_slice(daemon::TESTS);
    v
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("peer") {
        peer::main(args.get(1).map(String::as_str).unwrap_or("tw-peer"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "privileged tests must run as root (CI runs them as root): sudo -E cargo xtask test"
        );
        std::process::exit(1);
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let tests: Vec<Test> = all()
        .into_iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("running {} privileged tests", tests.len());
    let mut failed = Vec::new();
    for (name, f) in &tests {
        let t = Instant::now();
        let res = std::panic::catch_unwind(AssertUnwindSafe(f));
        let secs = t.elapsed().as_secs_f64();
        match res {
            Ok(()) => println!("test {name} ... ok ({secs:.1}s)"),
            Err(payload) => {
                println!("test {name} ... FAILED ({secs:.1}s)");
                failed.push((*name, panic_text(payload.as_ref())));
            }
        }
    }
    println!(
        "\nprivileged test result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        tests.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        // Repeated here because a CI log is often cut to its tail: the reason must survive.
        for (name, why) in &failed {
            println!("failed: {name}: {why}");
        }
        let names: Vec<&str> = failed.iter().map(|(n, _)| *n).collect();
        println!("failures: {}", names.join(", "));
        std::process::exit(1);
    }
}

/// The first lines of a panic's message (assertion text with its left/right values).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(non-text panic)");
    let lines: Vec<&str> = text.lines().take(6).collect();
    let mut out = lines.join(" | ");
    if out.len() > 600 {
        let mut cut = 600;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}
