//! `cargo xtask setup`: installs what this project needs on a Debian 12 machine, checking first so
//! a second run only spends seconds: Debian packages (LLVM 22 for bpf-linker, test tools), the
//! nightly `rust-src` component for `-Z build-std=core`, bpf-linker itself, and cargo-fuzz.
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::status;

/// LLVM 22 comes from bookworm-security; bpf-linker loads `libLLVM.so.22.1` at run time.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "build-essential",
    // The static (musl) build of the packages: musl-gcc compiles the bundled SQLite.
    "musl-tools",
];
/// Tools the privileged tests and the benchmark drive.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "iptables",
    "util-linux",
    "procps",
    "tmux",
    "curl",
    // `cargo xtask dist` checks the .deb it makes.
    "lintian",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The fuzz targets run with cargo-fuzz (libFuzzer) on the installed nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> anyhow::Result<()> {
    apt(BUILD_PACKAGES
        .iter()
        .chain(TEST_PACKAGES)
        .copied()
        .collect())?;
    nightly_rust_src()?;
    musl_target()?;
    bpf_linker()?;
    cargo_fuzz()?;
    prometheus()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt(pkgs: Vec<&str>) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages {}: run `sudo -E cargo xtask setup`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && listed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    if !out.status.success() {
        eprintln!("xtask: installing the nightly toolchain");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    eprintln!("xtask: adding rust-src to nightly");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The static build of the packages (`cargo xtask dist`): one binary for every glibc.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn musl_target() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: adding the {MUSL_TARGET} target");
    status(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Where the unpacked Prometheus server and promtool live (the serve test starts its own).
pub fn prometheus_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/prometheus")
}

/// Debian's Prometheus, downloaded and unpacked, not installed: installing the package would
/// start a Prometheus service on this host.
fn prometheus() -> anyhow::Result<()> {
    let root = prometheus_root();
    if root.join("usr/bin/prometheus").exists() {
        return Ok(());
    }
    if !crate::is_root() {
        // Only the privileged tests use it, and they run as root.
        return Ok(());
    }
    let dl = root.with_extension("debs");
    std::fs::create_dir_all(&dl)?;
    eprintln!(
        "xtask: fetching Debian's prometheus package into {}",
        root.display()
    );
    let get = || {
        Command::new("apt-get")
            .current_dir(&dl)
            .args(["download", "-q", "prometheus"])
            .stdout(Stdio::null())
            .status()
    };
    if !get()?.success() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        if !get()?.success() {
            bail!("apt-get download prometheus failed");
        }
    }
    let deb = std::fs::read_dir(&dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("prometheus_"))
        })
        .context("no prometheus .deb downloaded")?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let ok = crate::cargo()
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(crate::cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    status(
        crate::cargo()
            .env("PATH", path)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}
