//! `cargo xtask vm-test`: the smoke suite on other kernels. Debian's 5.10 (Debian 11, from
//! bullseye through an apt configuration of its own), 6.1 and 6.12 kernels,
//! QEMU and busybox come from the package manager (`apt-get download`, unpacked into a cache:
//! installing qemu-system-x86 would remove this image's backported qemu-utils); each kernel
//! boots under QEMU's software emulation (`/dev/kvm` here is PVM, which cannot run stock
//! kernels) with a busybox initramfs holding tcpwatch and the guest runner. The host kernel
//! runs the same suite in a network namespace.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::status;

/// Debian meta packages that name the current kernel of each series.
const KERNEL_META: &[&str] = &["linux-image-amd64", "linux-image-6.12-amd64"];
/// Per-kernel limit, boot to power-off.
const VM_TIMEOUT: Duration = Duration::from_secs(240);

fn out(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd.output().with_context(|| format!("running {shown}"))?;
    if !o.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The real package a meta package depends on (the ABI number moves with every update).
fn resolve_kernel(meta: &str) -> anyhow::Result<String> {
    let text = out(Command::new("apt-cache").args(["depends", meta]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
        })
        .map(str::to_string)
        .with_context(|| format!("{meta} depends on no linux-image package"))
}

/// The machine's own Debian mirrors, from its apt sources (one-line and deb822 formats): the
/// archive (a suite without a `-` suffix) and the security archive (`…-security`).
fn machine_mirrors() -> anyhow::Result<(String, String)> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".list") || n.ends_with(".sources") {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    // (uri, suite) pairs from both formats.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for t in &texts {
        for l in t.lines().map(str::trim) {
            if let Some(rest) = l.strip_prefix("deb ") {
                let w: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with('['))
                    .collect();
                if let [uri, suite, ..] = w[..] {
                    pairs.push((uri.to_string(), suite.to_string()));
                }
            }
        }
        for stanza in t.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                for u in uris.split_whitespace() {
                    for s in suites.split_whitespace() {
                        pairs.push((u.to_string(), s.to_string()));
                    }
                }
            }
        }
    }
    let archive = pairs
        .iter()
        .find(|(u, s)| !s.contains('-') && u.contains("debian") && !u.contains("security"))
        .map(|p| p.0.clone())
        .context("no Debian archive in the machine's apt sources")?;
    let security = pairs
        .iter()
        .find(|(_, s)| s.ends_with("-security"))
        .map(|p| p.0.clone())
        .context("no Debian security archive in the machine's apt sources")?;
    Ok((
        archive.trim_end_matches('/').into(),
        security.trim_end_matches('/').into(),
    ))
}

/// Debian 11's current 5.10 kernel (`linux-image-5.10.0-N-amd64-unsigned`), through an apt
/// configuration of xtask's own under `cache` (never the system's): bullseye and
/// bullseye-security on the machine's own mirrors, lists refreshed once a day.
fn bullseye_kernel(cache: &Path, debs: &Path) -> anyhow::Result<String> {
    let dir = cache.join("apt-bullseye");
    for d in ["lists/partial", "cache/archives/partial", "parts"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let (archive, security) = machine_mirrors()?;
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let list = dir.join("sources.list");
    std::fs::write(
        &list,
        format!(
            "deb [signed-by={keyring}] {archive} bullseye main\ndeb [signed-by={keyring}] {security} bullseye-security main\n"
        ),
    )?;
    let opts: Vec<String> = vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", list.display()),
        "-o".into(),
        format!("Dir::Etc::SourceParts={}", dir.join("parts").display()),
        "-o".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        "-o".into(),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "-o".into(),
        "Dir::State::status=/dev/null".into(),
    ];
    let fresh = std::fs::read_dir(dir.join("lists")).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("bullseye-security")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a < Duration::from_secs(86_400))
        })
    });
    if !fresh {
        status(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    }
    let deps = out(Command::new("apt-cache")
        .args(&opts)
        .args(["depends", "linux-image-amd64"]))?;
    let signed = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-5.10."))
        .context("bullseye's linux-image-amd64 names no 5.10 kernel")?;
    let pkg = format!("{signed}-unsigned");
    if !have_deb(debs, &pkg) {
        eprintln!("xtask: downloading {pkg} (Debian 11)");
        status(
            Command::new("apt-get")
                .current_dir(debs)
                .args(&opts)
                .args(["download", "-q", &pkg])
                .stdout(Stdio::null()),
        )?;
    }
    Ok(pkg)
}

fn have_deb(dir: &Path, pkg: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pkg}_"))
        })
    })
}

fn deb_of(dir: &Path, pkg: &str) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .with_context(|| format!("{pkg}: no .deb in {}", dir.display()))
}

/// Downloads what is not cached yet; refreshes the package lists once if apt cannot find them.
fn download(debs: &Path, pkgs: &[String]) -> anyhow::Result<()> {
    let missing: Vec<&String> = pkgs.iter().filter(|p| !have_deb(debs, p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: downloading {} package(s) into {}",
        missing.len(),
        debs.display()
    );
    let get = || {
        Command::new("apt-get")
            .current_dir(debs)
            .args(["download", "-q"])
            .args(&missing)
            .stdout(Stdio::null())
            .status()
    };
    if !get()?.success() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        if !get()?.success() {
            bail!("apt-get download failed for {missing:?}");
        }
    }
    Ok(())
}

fn unpack(deb: &Path, into: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(into)?;
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// The shared libraries a binary loads, as `ldd` resolves them (copied into the initramfs
/// at the same paths, so the host's own build runs in the guest).
fn libs_of(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = out(Command::new("ldd").arg(bin))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn copy_into(root: &Path, src: &Path, at: &Path) -> anyhow::Result<()> {
    let dst = root.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(dst.parent().context("parent")?)?;
    std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
# sock_diag's TCP handler is a module on Debian kernels, and this guest has no modprobe.
for m in inet_diag tcp_diag; do insmod /lib/modules/$(uname -r)/$m.ko 2>/dev/null; done
echo "vm-info: diag modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "vm-info: userspace at uptime $(cut -d' ' -f1 /proc/uptime) s"
/bin/vm-guest vm-guest /bin/tcpwatch --expect-fentry
echo "VMTEST_EXIT=$?"
sync
poweroff -f
"#;

/// The sock_diag modules of kernel `ver` (`inet_diag`, `tcp_diag`), unpacked and decompressed
/// into `dir`: Debian builds them as modules, and the guest has no modprobe to load them.
fn diag_modules(deb: &Path, ver: &str, dir: &Path, busybox: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tar = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()?;
    let base = format!("./lib/modules/{ver}/kernel/net/ipv4");
    status(
        Command::new("tar")
            .args(["-x", "-C"])
            .arg(dir)
            .args(["--wildcards", "--strip-components=7"])
            .arg(format!("{base}/inet_diag.ko*"))
            .arg(format!("{base}/tcp_diag.ko*"))
            .stdin(tar.stdout.context("tar input")?),
    )?;
    for m in ["inet_diag", "tcp_diag"] {
        let xz = dir.join(format!("{m}.ko.xz"));
        if xz.exists() {
            let ko = std::fs::File::create(dir.join(format!("{m}.ko")))?;
            status(Command::new(busybox).arg("xzcat").arg(&xz).stdout(ko))?;
            std::fs::remove_file(&xz)?;
        }
    }
    Ok(())
}

fn initramfs(
    cache: &Path,
    busybox: &Path,
    tcpwatch: &Path,
    guest: &Path,
    modules: &[(String, PathBuf)],
) -> anyhow::Result<PathBuf> {
    let root = cache.join("initrd-root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    copy_into(&root, busybox, Path::new("/bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    copy_into(&root, tcpwatch, Path::new("/bin/tcpwatch"))?;
    copy_into(&root, guest, Path::new("/bin/vm-guest"))?;
    for (ver, dir) in modules {
        for m in ["inet_diag.ko", "tcp_diag.ko"] {
            let f = dir.join(m);
            if f.exists() {
                copy_into(&root, &f, &Path::new("/lib/modules").join(ver).join(m))?;
            }
        }
    }
    for b in [tcpwatch, guest] {
        for l in libs_of(b)? {
            copy_into(&root, &std::fs::canonicalize(&l)?, &l)?;
        }
    }
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let img = cache.join("initrd.cpio");
    let list = out(Command::new("find").arg(".").current_dir(&root))?;
    let mut cpio = Command::new(busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&img)?)
        .stderr(Stdio::null())
        .spawn()?;
    cpio.stdin
        .take()
        .context("stdin")?
        .write_all(list.as_bytes())?;
    if !cpio.wait()?.success() {
        bail!("cpio failed");
    }
    Ok(img)
}

struct Outcome {
    what: String,
    passed: Vec<String>,
    failed: Vec<String>,
    secs: f64,
}

fn parse(what: &str, text: &str, secs: f64) -> Outcome {
    let mut o = Outcome {
        what: what.to_string(),
        passed: vec![],
        failed: vec![],
        secs,
    };
    for l in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = l.strip_prefix("vm-case: ok ") {
            o.passed.push(rest.to_string());
        } else if let Some(rest) = l.strip_prefix("vm-case: FAIL ") {
            o.failed.push(rest.to_string());
        }
    }
    let exit = text
        .lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("VMTEST_EXIT="))
        .map(str::to_string);
    // A suite that stopped early (a panic, a timeout) printed some cases but not its status.
    match exit.as_deref() {
        Some("0") => {}
        _ if !o.failed.is_empty() => {}
        other => o.failed.push(format!(
            "the suite did not finish (exit status {}) after {} case(s)",
            other.unwrap_or("missing"),
            o.passed.len()
        )),
    }
    o
}

fn boot(
    qemu: &Path,
    qroot: Option<&Path>,
    kernel: &Path,
    initrd: &Path,
    log: &Path,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &VM_TIMEOUT.as_secs().to_string()])
        .arg(qemu);
    if let Some(r) = qroot {
        cmd.env(
            "LD_LIBRARY_PATH",
            format!(
                "{0}/lib/x86_64-linux-gnu:{0}/usr/lib/x86_64-linux-gnu",
                r.display()
            ),
        );
        for d in ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"] {
            cmd.arg("-L").arg(r.join(d));
        }
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::null());
    let _ = cmd.status().context("running qemu")?;
    Ok(std::fs::read_to_string(log).unwrap_or_default())
}

fn host_leg(guest: &Path, tcpwatch: &Path) -> anyhow::Result<String> {
    let ns = format!("twvm{}", std::process::id());
    status(Command::new("ip").args(["netns", "add", &ns]))?;
    let res = (|| {
        status(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        let o = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(guest)
            .arg("vm-guest")
            .arg(tcpwatch)
            .stderr(Stdio::inherit())
            .output()?;
        // The same status marker the guests print.
        Ok(format!(
            "{}\nVMTEST_EXIT={}\n",
            String::from_utf8_lossy(&o.stdout),
            o.status
                .code()
                .map_or("signal".to_string(), |c| c.to_string())
        ))
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    res
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask vm-test");
    }
    if !crate::is_root() {
        bail!("vm-test boots VMs and attaches eBPF programs on the host: run it as root");
    }
    let t_all = Instant::now();
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    status(crate::cargo().args(["build", "--release", "-p", "tcpwatch"]))?;
    let tcpwatch = top.join("target/release/tcpwatch");
    let guest = std::env::current_exe()?;
    let cache = top.join("target/vm-cache");
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;

    let t = Instant::now();
    let mut kernels: Vec<String> = KERNEL_META
        .iter()
        .map(|m| resolve_kernel(m))
        .collect::<anyhow::Result<_>>()?;
    // Debian 11's 5.10, the LTS kernel of many fleets: its own apt lists, not the system's.
    kernels.push(bullseye_kernel(&cache, &debs)?);
    let system_qemu = which("qemu-system-x86_64");
    let qemu_pkgs: Vec<String> = if system_qemu.is_some() {
        vec![]
    } else {
        let sim = out(Command::new("apt-get").args([
            "install",
            "-s",
            "-y",
            "--no-install-recommends",
            "qemu-system-x86",
        ]))?;
        sim.lines()
            .filter_map(|l| l.strip_prefix("Inst "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let mut pkgs: Vec<String> = kernels
        .iter()
        .filter(|k| !have_deb(&debs, k))
        .cloned()
        .collect();
    pkgs.extend(qemu_pkgs.iter().cloned());
    pkgs.push("busybox-static".into());
    download(&debs, &pkgs)?;
    let qroot = cache.join("qroot");
    let qemu = match &system_qemu {
        Some(q) => q.clone(),
        None => {
            let bin = qroot.join("usr/bin/qemu-system-x86_64");
            if !bin.exists() {
                for p in &qemu_pkgs {
                    unpack(&deb_of(&debs, p)?, &qroot)?;
                }
            }
            bin
        }
    };
    let bb = cache.join("busybox");
    if !bb.join("bin/busybox").exists() {
        unpack(&deb_of(&debs, "busybox-static")?, &bb)?;
    }
    let kdir = cache.join("kernels");
    std::fs::create_dir_all(&kdir)?;
    let mut images = Vec::new();
    let mut modules = Vec::new();
    for k in &kernels {
        // The unsigned package's kernel is named like the signed one.
        let ver = k
            .trim_start_matches("linux-image-")
            .trim_end_matches("-unsigned");
        let img = kdir.join(format!("vmlinuz-{ver}"));
        if !img.exists() {
            let deb = deb_of(&debs, k)?;
            let tar = Command::new("dpkg-deb")
                .arg("--fsys-tarfile")
                .arg(&deb)
                .stdout(Stdio::piped())
                .spawn()?;
            status(
                Command::new("tar")
                    .args(["-x", "-C"])
                    .arg(&kdir)
                    .args(["--strip-components=2", &format!("./boot/vmlinuz-{ver}")])
                    .stdin(tar.stdout.context("tar input")?),
            )?;
        }
        let mods = kdir.join(format!("modules-{ver}"));
        if !mods.join("tcp_diag.ko").exists() {
            diag_modules(&deb_of(&debs, k)?, ver, &mods, &bb.join("bin/busybox"))?;
        }
        modules.push((ver.to_string(), mods));
        images.push((ver.to_string(), img));
    }
    let initrd = initramfs(&cache, &bb.join("bin/busybox"), &tcpwatch, &guest, &modules)?;
    eprintln!(
        "xtask: vm-test ready in {:.1} s: kernels {}, qemu {}",
        t.elapsed().as_secs_f64(),
        kernels.join(" "),
        if system_qemu.is_some() {
            "installed"
        } else {
            "unpacked"
        }
    );

    // The VMs run at once (one emulated CPU each, two cores here); the host leg after.
    let qr = system_qemu.is_none().then_some(qroot.clone());
    let handles: Vec<_> = images
        .into_iter()
        .map(|(ver, img)| {
            let (qemu, qr, initrd) = (qemu.clone(), qr.clone(), initrd.clone());
            let log = cache.join(format!("console-{ver}.log"));
            std::thread::spawn(move || {
                let t = Instant::now();
                let text = boot(&qemu, qr.as_deref(), &img, &initrd, &log)
                    .unwrap_or_else(|e| format!("{e:#}"));
                (
                    parse(
                        &format!("kernel {ver} (QEMU TCG)"),
                        &text,
                        t.elapsed().as_secs_f64(),
                    ),
                    text,
                    log,
                )
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        let (o, text, log) = h
            .join()
            .map_err(|_| anyhow::anyhow!("VM thread panicked"))?;
        if !o.failed.is_empty() {
            eprintln!("--- console of {} ({}), last lines:", o.what, log.display());
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
        outcomes.push(o);
    }
    let t = Instant::now();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let text = host_leg(&guest, &tcpwatch).unwrap_or_else(|e| format!("{e:#}"));
    outcomes.push(parse(
        &format!("kernel {} (this host, in a namespace)", host_kernel.trim()),
        &text,
        t.elapsed().as_secs_f64(),
    ));

    let (mut pass, mut fail) = (0, 0);
    for o in &outcomes {
        println!(
            "{}: {} passed, {} failed in {:.0} s",
            o.what,
            o.passed.len(),
            o.failed.len(),
            o.secs
        );
        for p in &o.passed {
            println!("    ok   {p}");
        }
        for f in &o.failed {
            println!("    FAIL {f}");
        }
        pass += o.passed.len();
        fail += o.failed.len();
    }
    println!(
        "vm-smoke: {pass} passed, {fail} failed ({:.0} s in all)",
        t_all.elapsed().as_secs_f64()
    );
    if fail > 0 {
        bail!("{fail} VM smoke case(s) failed");
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
