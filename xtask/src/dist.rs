//! `cargo xtask dist [--check]`: what an operator installs. One static (musl) binary with the
//! eBPF object embedded, so the same file runs on any glibc (Debian 11 and 12 alike); a
//! `.deb` with it, the systemd unit of deploy/, the `tcpwatch` group created on install, shell
//! completions and man pages generated from the clap definitions; a tarball of the same for
//! other distributions. `--check` (run by `cargo xtask test`) installs the `.deb` into a
//! scratch root and runs what it installed, and fails on any lintian error.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::setup::MUSL_TARGET;
use crate::{cargo, status};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let check = match args {
        [] => false,
        [a] if a == "--check" => true,
        _ => bail!("usage: cargo xtask dist [--check]"),
    };
    crate::setup::run()?;
    let out = root().join("target/dist");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)?;
    // Stripped once, for both packages (the eBPF object is data inside, untouched).
    let bin = out.join("tcpwatch");
    copy(&build_static()?, &bin, 0o755)?;
    status(Command::new("strip").arg("--strip-unneeded").arg(&bin))?;
    let assets = out.join("assets");
    status(
        cargo()
            .args(["run", "-q", "-p", "tcpwatch", "--features", "assets"])
            .args(["--bin", "tcpwatch-assets", "--"])
            .arg(&assets),
    )?;
    let deb = deb(&out, &bin, &assets)?;
    let tarball = tarball(&out, &bin, &assets)?;
    lintian(&deb)?;
    eprintln!("xtask: {}\nxtask: {}", deb.display(), tarball.display());
    if check {
        check_install(&out, &deb)?;
    }
    Ok(())
}

/// The release binary for musl, linked statically (checked: no program interpreter).
fn build_static() -> anyhow::Result<PathBuf> {
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "tcpwatch",
        "--target",
        MUSL_TARGET,
    ]))?;
    let bin = root().join(format!("target/{MUSL_TARGET}/release/tcpwatch"));
    let elf = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    if has_interpreter(&elf) {
        bail!("{} is dynamically linked", bin.display());
    }
    Ok(bin)
}

/// Whether an ELF64 file names a program interpreter (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let rd16 = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let rd32 = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let rd64 = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return true;
    }
    let (phoff, phentsize, phnum) = (rd64(0x20), rd16(0x36), rd16(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= elf.len() && rd32(o) == PT_INTERP
    })
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` (no name, no time: the same input makes the same package).
fn gzip(path: &Path) -> anyhow::Result<()> {
    status(Command::new("gzip").args(["-9nf"]).arg(path))
}

/// deploy/'s unit, for a packaged binary.
fn unit() -> anyhow::Result<String> {
    let src = std::fs::read_to_string(root().join("deploy/tcpwatch.service"))?;
    if !src.contains("/usr/local/bin/tcpwatch") {
        bail!("deploy/tcpwatch.service no longer starts /usr/local/bin/tcpwatch; update dist");
    }
    // Its install comment is for a hand install; the package does those steps.
    let body: String = src
        .lines()
        .filter(|l| !l.starts_with("# Install:") && !l.starts_with("#          "))
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(body.replace("/usr/local/bin/tcpwatch", "/usr/bin/tcpwatch"))
}

/// debian/copyright (machine-readable): the MIT text in full (from LICENSE-MIT), Apache-2.0
/// by reference to the copy every Debian system has.
fn copyright() -> anyhow::Result<String> {
    let mit = std::fs::read_to_string(root().join("LICENSE-MIT"))?;
    let mit: String = mit
        .lines()
        .map(|l| {
            if l.trim().is_empty() {
                " .\n".to_string()
            } else {
                format!(" {}\n", l.trim_end())
            }
        })
        .collect();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tcpwatch
Source: https://github.com/tcpwatch/tcpwatch

Files: *
Copyright: 2026 The tcpwatch developers
License: MIT or Apache-2.0
Comment: The binary statically links Rust crates under MIT or Apache-2.0, musl (MIT)
 and SQLite (public domain).

License: MIT
{mit}
License: Apache-2.0
 On Debian systems, the complete text of the Apache License, Version 2.0
 can be found in /usr/share/common-licenses/Apache-2.0.
"
    ))
}

const POSTINST: &str = r#"#!/bin/sh
# The group whose members may use the daemon's socket and read its record.
set -e
if [ "$1" = "configure" ]; then
    if ! getent group tcpwatch >/dev/null; then
        if command -v systemd-sysusers >/dev/null 2>&1; then
            systemd-sysusers tcpwatch.conf
        else
            addgroup --system tcpwatch
        fi
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        deb-systemd-helper enable tcpwatch.service >/dev/null || true
        deb-systemd-invoke start tcpwatch.service >/dev/null || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = "remove" ]; then
    deb-systemd-invoke stop tcpwatch.service >/dev/null || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = "purge" ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge tcpwatch.service >/dev/null || true
    fi
    # The flight recorder.
    rm -rf /var/lib/tcpwatch
fi
exit 0
"#;

/// The files both packages hold, under `stage` (a root: usr/bin, usr/share, lib/systemd).
fn stage_files(stage: &Path, bin: &Path, assets: &Path) -> anyhow::Result<()> {
    copy(bin, &stage.join("usr/bin/tcpwatch"), 0o755)?;
    write(
        &stage.join("lib/systemd/system/tcpwatch.service"),
        &unit()?,
        0o644,
    )?;
    copy(
        &root().join("deploy/tcpwatch.sysusers"),
        &stage.join("usr/lib/sysusers.d/tcpwatch.conf"),
        0o644,
    )?;
    let c = assets.join("completions");
    copy(
        &c.join("tcpwatch.bash"),
        &stage.join("usr/share/bash-completion/completions/tcpwatch"),
        0o644,
    )?;
    copy(
        &c.join("_tcpwatch"),
        &stage.join("usr/share/zsh/vendor-completions/_tcpwatch"),
        0o644,
    )?;
    copy(
        &c.join("tcpwatch.fish"),
        &stage.join("usr/share/fish/vendor_completions.d/tcpwatch.fish"),
        0o644,
    )?;
    let man = stage.join("usr/share/man/man1");
    for e in std::fs::read_dir(assets.join("man"))? {
        let p = e?.path();
        let to = man.join(p.file_name().unwrap());
        copy(&p, &to, 0o644)?;
        gzip(&to)?;
    }
    let doc = stage.join("usr/share/doc/tcpwatch");
    write(&doc.join("copyright"), &copyright()?, 0o644)?;
    copy(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    gzip(&doc.join("README.md"))?;
    Ok(())
}

fn deb(out: &Path, bin: &Path, assets: &Path) -> anyhow::Result<PathBuf> {
    let stage = out.join("deb");
    stage_files(&stage, bin, assets)?;
    let doc = stage.join("usr/share/doc/tcpwatch");
    write(
        &doc.join("changelog"),
        &format!(
            "tcpwatch ({VERSION}) unstable; urgency=medium\n\n  * Packaged by cargo xtask dist.\n\n -- tcpwatch developers <tcpwatch@users.noreply.github.com>  Tue, 08 Dec 2026 00:00:00 +0000\n"
        ),
        0o644,
    )?;
    gzip(&doc.join("changelog"))?;
    // The binary is static on purpose (one file for every glibc); a static PIE is an ELF of
    // the shared-object type without an interpreter, which lintian takes for a library.
    write(
        &stage.join("usr/share/lintian/overrides/tcpwatch"),
        "tcpwatch: statically-linked-binary [usr/bin/tcpwatch]\ntcpwatch: shared-library-lacks-prerequisites [usr/bin/tcpwatch]\n",
        0o644,
    )?;
    let installed_kib = du_kib(&stage)?;
    let ctl = stage.join("DEBIAN");
    write(
        &ctl.join("control"),
        &format!(
            "Package: tcpwatch
Version: {VERSION}
Architecture: amd64
Maintainer: tcpwatch developers <tcpwatch@users.noreply.github.com>
Installed-Size: {installed_kib}
Depends: adduser
Section: net
Priority: optional
Homepage: https://github.com/tcpwatch/tcpwatch
Description: live TCP connection-state observer (eBPF)
 tcpwatch follows every TCP socket from connect to the end of TIME_WAIT with
 eBPF programs on the kernel's TCP tracepoints: state timelines with their
 owners, SYN/SYN-ACK/data retransmits, resets, SYN and accept queue overflows
 per listener, TIME_WAIT and CLOSE_WAIT piles, and the sysctls that govern
 them. The daemon keeps a flight recorder of the host's TCP history; top,
 snapshot, trace and check use it without privileges for members of the
 tcpwatch group. Prometheus metrics on 127.0.0.1:9924.
"
        ),
        0o644,
    )?;
    write(&ctl.join("postinst"), POSTINST, 0o755)?;
    write(&ctl.join("prerm"), PRERM, 0o755)?;
    write(&ctl.join("postrm"), POSTRM, 0o755)?;
    write(&ctl.join("md5sums"), &md5sums(&stage)?, 0o644)?;
    let deb = out.join(format!("tcpwatch_{VERSION}_amd64.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sk"]).arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du")
}

fn md5sums(stage: &Path) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find usr lib -type f | LC_ALL=C sort | xargs md5sum")
        .current_dir(stage)
        .output()?;
    if !out.status.success() {
        bail!("md5sum failed");
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn tarball(out: &Path, bin: &Path, assets: &Path) -> anyhow::Result<PathBuf> {
    let name = format!("tcpwatch-{VERSION}-x86_64-linux-musl");
    let stage = out.join("tar").join(&name);
    stage_files(&stage, bin, assets)?;
    // Where a hand install differs from the package (deploy/README.md explains the rest).
    copy(
        &root().join("deploy/tcpwatch.service"),
        &stage.join("deploy/tcpwatch.service"),
        0o644,
    )?;
    let tgz = out.join(format!("{name}.tar.gz"));
    status(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "--sort=name", "-czf"])
            .arg(&tgz)
            .arg("-C")
            .arg(out.join("tar"))
            .arg(&name),
    )?;
    Ok(tgz)
}

/// lintian must report no error (warnings are printed for whoever reads them).
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{text}");
    if !out.status.success() || text.lines().any(|l| l.starts_with("E: ")) {
        bail!("lintian reports errors on {}", deb.display());
    }
    Ok(())
}

/// The `.deb` unpacked into a scratch root: what it installs is there and runs.
fn check_install(out: &Path, deb: &Path) -> anyhow::Result<()> {
    let scratch = out.join("root");
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
    let bin = scratch.join("usr/bin/tcpwatch");
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let o = Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("running the installed tcpwatch {args:?}"))?;
        if !o.status.success() {
            bail!(
                "installed tcpwatch {args:?} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let v = run(&["--version"])?;
    if v.trim() != format!("tcpwatch {VERSION}") {
        bail!("installed --version says {v:?}");
    }
    let d = run(&["doctor"])?;
    if !d.contains("state") {
        bail!("installed doctor printed no signal table:\n{d}");
    }
    let s = run(&["snapshot", "--json", "--standalone"])?;
    let snap: serde_json::Value =
        serde_json::from_str(&s).context("the installed snapshot's JSON")?;
    if snap["states"].as_object().is_none() {
        bail!("the installed snapshot has no states: {s}");
    }
    for f in [
        "usr/share/bash-completion/completions/tcpwatch",
        "usr/share/zsh/vendor-completions/_tcpwatch",
        "usr/share/fish/vendor_completions.d/tcpwatch.fish",
        "usr/share/man/man1/tcpwatch.1.gz",
        "usr/share/man/man1/tcpwatch-top.1.gz",
        "usr/share/man/man1/tcpwatch-daemon.1.gz",
        "lib/systemd/system/tcpwatch.service",
        "usr/lib/sysusers.d/tcpwatch.conf",
    ] {
        let p = scratch.join(f);
        if std::fs::metadata(&p).map_or(true, |m| m.len() == 0) {
            bail!("the package lacks {f}");
        }
    }
    // The completions know the subcommands; the man page renders.
    let bash =
        std::fs::read_to_string(scratch.join("usr/share/bash-completion/completions/tcpwatch"))?;
    if !bash.contains("snapshot") || !bash.contains("--since") {
        bail!("the bash completion does not know snapshot --since");
    }
    let man = Command::new("man")
        .arg("-l")
        .arg(scratch.join("usr/share/man/man1/tcpwatch-snapshot.1.gz"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output();
    if let Ok(m) = man
        && m.status.success()
        && !String::from_utf8_lossy(&m.stdout).contains("--since")
    {
        bail!("man tcpwatch-snapshot does not mention --since");
    }
    let unit = std::fs::read_to_string(scratch.join("lib/systemd/system/tcpwatch.service"))?;
    if !unit.contains("ExecStart=/usr/bin/tcpwatch daemon") {
        bail!("the packaged unit does not start /usr/bin/tcpwatch daemon");
    }
    eprintln!(
        "xtask: the package installs and runs (--version, doctor, snapshot; completions, man pages, unit)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interpreter_is_found() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are dynamically linked on the glibc host.
        assert!(has_interpreter(&me));
        assert!(has_interpreter(b"not an elf"));
    }
}
