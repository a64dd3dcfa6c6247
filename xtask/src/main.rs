//! Project automation: `cargo xtask setup | run | test | bench`. Setup is idempotent code, not a
//! README paragraph, so a fresh machine and CI get exactly the same toolchain.
mod bench;
mod bench_daemon;
mod benchkit;
mod dist;
mod fuzz;
mod setup;
mod soak;
mod vm;
mod vmguest;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
    setup     install what building and testing need (idempotent)
    run       setup, build, and start tcpwatch on this host (as root)
    test      setup, then lint and every test: unit, CLI, privileged, kernel matrix (as root)
    bench     [churn|aggregator|snapshot|tui|serve|daemon] benchmarks (all but aggregator as root)
    vm-test   the smoke suite on Debian's 5.10, 6.1 and 6.12 kernels under QEMU, and on this host (as root)
    lint      rustfmt check, clippy on the host crates and on the eBPF crate
    soak      [--minutes N] [--every SECS] [--serve] the daemon (or serve) under churn: flat RSS, no loss (as root)
    fuzz      [--secs N] [decode|replay|http] the fuzz targets under libFuzzer (cargo-fuzz, nightly)
    dist      [--check] the .deb and the tarball (static binary, unit, completions, man pages) in target/dist";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("lint") => lint(),
        Some("soak") => soak::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("vm-test") => vm::run(&args[1..]),
        // Run inside the VMs by vm-test (and on the host in a namespace); not for people.
        Some("vm-guest") => vmguest::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn run(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    status(cargo().args(["build", "--release", "-p", "tcpwatch"]))?;
    if !is_root() {
        bail!("tcpwatch needs root (or CAP_BPF + CAP_PERFMON): run `sudo -E cargo xtask run`");
    }
    let args: Vec<String> = if extra.is_empty() {
        vec!["top".into()]
    } else {
        extra.to_vec()
    };
    let err = exec_tcpwatch(&args);
    Err(err)
}

fn exec_tcpwatch(args: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcpwatch");
    let e = Command::new(&bin).args(args).exec();
    anyhow::anyhow!("cannot start {}: {e}", bin.display())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    if !is_root() {
        bail!("the privileged tests need root: run `sudo -E cargo xtask test` (CI runs as root)");
    }
    // Format, clippy (host and eBPF) and the workspace lints hold before anything runs.
    lint()?;
    // Default members only: the eBPF crate builds for the BPF target, through tcpwatch/build.rs.
    status(cargo().args(["test"]))?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "tcpwatch",
        "--features",
        "privileged-tests",
        "--test",
        "privileged",
        "--",
    ]);
    cmd.args(extra);
    status(&mut cmd)?;
    // The packages build, pass lintian, and what the .deb installs runs.
    if extra.is_empty() {
        dist::run(&["--check".into()])?;
    }
    // Every fuzz target for a CI-sized while: no input panics.
    if extra.is_empty() {
        fuzz::run(&["--secs".into(), "15".into()])?;
    }
    // The always-on mode under churn for a minute: memory levels off, nothing is lost.
    if extra.is_empty() {
        let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tcpwatch");
        soak::run(&[
            "--minutes".into(),
            "1".into(),
            "--every".into(),
            "5".into(),
            "--bin".into(),
            bin.to_string_lossy().into_owned(),
        ])?;
    }
    // A filter narrows the privileged tests only; the full run includes the kernel matrix.
    if extra.is_empty() {
        vm::run(&[])?;
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "tcpwatch-ebpf",
                "--all-targets",
            ])
            .args([
                "--features",
                "tcpwatch/privileged-tests,tcpwatch/assets",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    // The eBPF crate only builds for the BPF target, with nightly and build-std, as aya-build does.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tcpwatch-ebpf");
    status(
        Command::new("rustup")
            .current_dir(dir)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            )
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
    )
}
