//! The loaded and attached programs: start-up in four phases (read the kernel, configure,
//! load, attach), the rings handed to the reader, listener owners seeded into the kernel.
use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use tcpwatch_common::{ListenKey, Owner};

use super::config::{
    EBPF_OBJECT, ProbeConfig, SignalStatus, needs_bpf, one_walk, sock_diag_status,
};
use super::diagnostics::Diagnostics;
use super::globals::{self, KernelFacts};
use super::rings::{RINGS, ring_count};
use super::strategies;
use super::verifier::short;
use crate::model::event::RstReasons;

/// The loaded and attached programs (none for an instant snapshot served by sock_diag).
/// Dropping it detaches everything.
pub struct Probe {
    pub(super) ebpf: Option<Ebpf>,
    pub status: Vec<SignalStatus>,
    pub(super) counters: Option<PerCpuArray<MapData, u64>>,
    /// sock_diag lists both families in one request (`--disable-hook tcpdiag_getsock`: per
    /// family, the fallback for kernels that refuse it).
    pub sock_diag_one_walk: bool,
    /// How long each start-up phase took (shown by `doctor`).
    pub timings: Vec<(&'static str, std::time::Duration)>,
    /// Names of this kernel's reset reasons.
    pub rst_reasons: RstReasons,
    /// The programs' diagnostics (aya-log), read by `diagnostics`.
    logger: Option<aya_log::EbpfLogger<Diagnostics>>,
    diagnostics: Diagnostics,
}

impl Probe {
    /// An instant snapshot's probe: no BPF at all when sock_diag answers (the BTF parse and
    /// program loads are most of the start-up time), owners from /proc/*/fd.
    fn without_bpf(cfg: &ProbeConfig) -> Option<Probe> {
        if needs_bpf(cfg) {
            return None;
        }
        let t0 = std::time::Instant::now();
        let mut status = vec![
            sock_diag_status(cfg, None),
            SignalStatus {
                signal: "socket owners",
                hook: Some("/proc/*/fd".into()),
                note: None,
            },
        ];
        if let Some(limits) = &cfg.listing_limits {
            status.push(SignalStatus {
                signal: "privileges",
                hook: Some("unprivileged listing".into()),
                note: Some(limits.clone()),
            });
        }
        Some(Probe {
            ebpf: None,
            status,
            counters: None,
            sock_diag_one_walk: one_walk(cfg),
            timings: vec![("sock_diag", t0.elapsed())],
            rst_reasons: Default::default(),
            logger: None,
            diagnostics: Diagnostics::default(),
        })
    }

    pub fn start(cfg: &ProbeConfig) -> anyhow::Result<Probe> {
        if let Some(p) = Probe::without_bpf(cfg) {
            return Ok(p);
        }
        let mut timings: Vec<(&'static str, std::time::Duration)> = Vec::new();
        let mut t = std::time::Instant::now();
        let mut lap = |what: &'static str| {
            timings.push((what, t.elapsed()));
            t = std::time::Instant::now();
        };
        let tracefs = globals::tracefs();
        let mut status = Vec::new();
        if let Some(limits) = &cfg.listing_limits {
            status.push(SignalStatus {
                signal: "privileges",
                hook: Some("limited".into()),
                note: Some(limits.clone()),
            });
        }
        let mut k = KernelFacts::read(cfg, tracefs.as_deref().ok(), &mut status, &mut lap);
        {
            (k.sk_storage, k.sock_cookie) = helper_support_cached(&k);
            lap("probe helpers");
            if !k.sk_storage {
                status.push(SignalStatus {
                    signal: "socket storage",
                    hook: Some("hash map by socket address".into()),
                    note: Some(
                        "tracing programs cannot use socket local storage on this kernel (5.11+): children of SO_REUSEPORT listeners get their port's owner, not their member's".into(),
                    ),
                });
            }
            if !k.sock_cookie {
                status.push(SignalStatus {
                    signal: "socket cookies",
                    hook: None,
                    note: Some(
                        "tracing programs cannot take socket cookies on this kernel (5.12+): sockets are told apart by address and 4-tuple, as with the classic tracepoint".into(),
                    ),
                });
            }
        }
        let globals = globals::Globals::new(cfg, &k);
        let mut loader = EbpfLoader::new();
        loader.btf(k.aya_btf.as_ref());
        globals.configure(&mut loader);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("loading the eBPF object: {}", short(&e)))?;
        lap("load object");
        // Without the log ring the programs still run; their diagnostics are then lost, and
        // doctor says so.
        let diagnostics = Diagnostics::default();
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, diagnostics.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                status.push(SignalStatus {
                    signal: "kernel diagnostics",
                    hook: None,
                    note: Some(format!("aya-log: {e}")),
                });
                None
            }
        };
        if cfg.trace {
            strategies::attach_all(&mut ebpf, cfg, &k, tracefs.as_ref().err(), &mut status)?;
        }
        lap("attach");
        strategies::load_iterators(&mut ebpf, cfg, &k, &mut status);
        lap("load iterator");
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .context("map COUNTERS missing from the eBPF object")?,
        )
        .map_err(|e| anyhow!("opening map COUNTERS: {e}"))?;
        Ok(Probe {
            ebpf: Some(ebpf),
            status,
            counters: Some(counters),
            sock_diag_one_walk: one_walk(cfg),
            timings,
            rst_reasons: k.rst_reasons,
            logger,
            diagnostics,
        })
    }

    /// The programs' diagnostics since the previous call, and how many more were not kept.
    pub fn diagnostics(&mut self) -> (Vec<String>, u64) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
        self.diagnostics.take()
    }

    /// Tells the kernel who owns a listener that existed before start, so its accepted
    /// children are attributed in the kernel too.
    pub fn seed_listener(&mut self, netns: u32, port: u16, owner: &crate::model::event::Owner) {
        let Some(map) = self.ebpf.as_mut().and_then(|e| e.map_mut("LISTENERS")) else {
            return;
        };
        let Ok(mut m) = aya::maps::HashMap::<&mut MapData, ListenKey, Owner>::try_from(map) else {
            return;
        };
        let v = Owner {
            cgroup_id: owner.cgroup_id,
            pid: owner.pid,
            tid: owner.tid,
            comm: owner.comm.0,
        };
        let _ = m.insert(
            ListenKey {
                netns,
                port,
                _pad: 0,
            },
            v,
            0,
        );
    }

    /// The event ring buffers in use (can be taken once).
    pub fn take_rings(&mut self) -> anyhow::Result<Vec<RingBuf<MapData>>> {
        let Some(ebpf) = self.ebpf.as_mut() else {
            return Ok(Vec::new());
        };
        let n = ring_count() as usize;
        RINGS[..n]
            .iter()
            .map(|name| {
                let map = ebpf
                    .take_map(name)
                    .with_context(|| format!("map {name} missing or already taken"))?;
                RingBuf::try_from(map).map_err(|e| anyhow!("opening ring buffer {name}: {e}"))
            })
            .collect()
    }
}

/// `helper_support`, remembered per kernel and build beside the BTF facts (the probe loads
/// the object a second time: 20 ms of every start otherwise).
fn helper_support_cached(k: &KernelFacts) -> (bool, bool) {
    use super::btf::{CACHE_DIR, cache_key};
    let Ok(len) = std::fs::metadata(super::config::VMLINUX_BTF).map(|m| m.len()) else {
        return helper_support(k);
    };
    let key = cache_key(len);
    let file = std::path::Path::new(CACHE_DIR).join("helpers");
    if let Ok(t) = std::fs::read_to_string(&file)
        && let Some((kk, v)) = t.rsplit_once('\n')
        && kk == key
        && let [a @ (b'0' | b'1'), c @ (b'0' | b'1')] = v.as_bytes()
    {
        return (*a == b'1', *c == b'1');
    }
    let r = helper_support(k);
    // Best effort, as the BTF facts (which made the root-only directory).
    if std::path::Path::new(CACHE_DIR).is_dir() {
        let tmp = file.with_extension("tmp");
        let v = format!("{key}\n{}{}", u8::from(r.0), u8::from(r.1));
        if std::fs::write(&tmp, v).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    r
}

/// Whether this kernel lets tracing programs use socket local storage and take socket
/// cookies: the object loaded once more with its maps at their smallest, and two programs
/// that are never attached (a refusal is the answer; the fallbacks work on every kernel).
fn helper_support(k: &KernelFacts) -> (bool, bool) {
    use aya::programs::BtfTracePoint;
    let Some(btf) = k.aya_btf.as_ref() else {
        return (true, true);
    };
    let mut loader = EbpfLoader::new();
    loader.btf(Some(btf));
    for name in super::rings::RINGS {
        loader.map_max_entries(name, 4096);
    }
    for m in ["SOCKS", "LISTENERS", "REQ_LAST"] {
        loader.map_max_entries(m, 1);
    }
    let Ok(mut ebpf) = loader.load(EBPF_OBJECT) else {
        return (true, true);
    };
    let mut accepted = |name: &str| -> bool {
        let Some(p) = ebpf.program_mut(name) else {
            return true;
        };
        let Ok(p): Result<&mut BtfTracePoint, _> = p.try_into() else {
            return true;
        };
        p.load("inet_sock_set_state", btf).is_ok()
    };
    (accepted("probe_sk_storage"), accepted("probe_sock_cookie"))
}
