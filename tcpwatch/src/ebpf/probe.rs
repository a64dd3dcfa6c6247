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
        let k = KernelFacts::read(cfg, tracefs.as_deref().ok(), &mut status, &mut lap);
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
