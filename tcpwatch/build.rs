//! Builds the eBPF object with aya-build (nightly, `-Z build-std=core`) so plain `cargo build`
//! embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tcpwatch-ebpf")
        .ok_or_else(|| anyhow!("tcpwatch-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())?;
    // AYA_BUILD_SKIP=1 (the fuzz targets: library code only, built with instrumentation the
    // BPF target cannot take): no object is built, and an empty one stands in, so the library
    // compiles; loading it would fail with a clear error, and nothing there loads it.
    let obj = std::path::Path::new(&std::env::var("OUT_DIR")?).join("tcpwatch");
    if !obj.exists() {
        std::fs::write(&obj, [])?;
    }
    Ok(())
}
