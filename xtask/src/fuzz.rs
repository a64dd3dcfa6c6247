//! `cargo xtask fuzz [--secs N] [TARGET...]`: the fuzz targets (`fuzz/`: ring and iterator
//! record decoding, capture replay, the HTTP endpoint) under libFuzzer for N seconds each,
//! from the committed seeds plus what earlier runs found (`target/fuzz-corpus`). Any panic,
//! hang past libFuzzer's timeout or memory past its limit fails the run.
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::status;

pub const TARGETS: &[&str] = &["decode", "replay", "http", "api"];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut secs = 20u64;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().context("--secs needs a value")?.parse()?,
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz option {other} (--secs N, targets {TARGETS:?})"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for t in &targets {
        let corpus = root.join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(t);
        eprintln!("xtask: fuzzing {t} for {secs} s");
        status(
            std::process::Command::new("rustup")
                .current_dir(&root)
                // The library without its eBPF object: the targets never load it.
                .env("AYA_BUILD_SKIP", "1")
                .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
                .args(["run", "nightly", "cargo", "fuzz", "run", "--sanitizer", "none", t])
                .arg("--")
                .arg(&corpus)
                .arg(&seeds)
                .arg(format!("-max_total_time={secs}"))
                .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]),
        )?;
    }
    Ok(())
}
