//! Loading, configuring and attaching the eBPF programs, with one strategy list per signal chosen
//! by what this kernel accepts, plus access to the ring buffer and the kernel-side counters.
pub mod btf;
mod counters;
pub mod decode;
mod globals;
mod iter;
mod kallsyms;
pub mod reader;
pub mod records;
mod rings;
mod strategies;
pub mod tracefs;
mod verifier;

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, PerCpuArray};
use aya::{Ebpf, EbpfLoader};
use tcpwatch_common::{ListenKey, Owner};

pub use counters::ProgStats;
use globals::KernelFacts;
pub use rings::ring_count;
use verifier::short;

use crate::model::event::RstReasons;

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpwatch"));

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Filters applied in the kernel (0 = off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFilters {
    pub port: u16,
    pub lport: u16,
    pub rport: u16,
    pub pid: u32,
    /// 2 (AF_INET), 10 (AF_INET6) or 0.
    pub family: u8,
    pub netns: u32,
}

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub filters: KernelFilters,
    pub ring_bytes: u32,
    /// Hooks the user asked not to use (for testing fallbacks): e.g. `tp_btf`.
    pub disabled: Vec<String>,
    /// Attach the tracing programs; without it only the inventory iterator is loaded (an
    /// instant snapshot needs nothing else).
    pub trace: bool,
    /// Whether NETLINK_SOCK_DIAG answers here (the caller asks it), or why not: the inventory
    /// falls back to it, and an instant snapshot needs no BPF when it answers.
    pub sock_diag: Result<(), String>,
    /// Limits of an unprivileged listing, to report with an instant snapshot's hooks.
    pub listing_limits: Option<String>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            filters: KernelFilters::default(),
            ring_bytes: 16 << 20,
            disabled: Vec::new(),
            trace: true,
            sock_diag: Ok(()),
            listing_limits: None,
        }
    }
}

/// Which hook serves a signal, or why none does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalStatus {
    pub signal: &'static str,
    /// The hook in use, `None` when the signal is unavailable.
    pub hook: Option<String>,
    /// Why a preferred hook was not used, or what degrades.
    pub note: Option<String>,
}

impl SignalStatus {
    pub fn line(&self) -> String {
        match (&self.hook, &self.note) {
            (Some(h), None) => format!("{}: {h}", self.signal),
            (Some(h), Some(n)) => format!("{}: {h} ({n})", self.signal),
            (None, n) => format!(
                "{}: UNAVAILABLE ({})",
                self.signal,
                n.as_deref().unwrap_or("no hook")
            ),
        }
    }
}

/// Where the socket inventory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inventory {
    /// The `iter/tcp` program: every namespace's hash tables walked in the kernel, the
    /// listeners-only walk ending at the first non-listener.
    Iter,
    /// NETLINK_SOCK_DIAG, as `ss` reads it: no BPF needed.
    SockDiag,
}

/// The loaded and attached programs (none for an instant snapshot served by sock_diag).
/// Dropping it detaches everything.
pub struct Probe {
    ebpf: Option<Ebpf>,
    pub status: Vec<SignalStatus>,
    counters: Option<PerCpuArray<MapData, u64>>,
    /// sock_diag lists both families in one request (`--disable-hook tcpdiag_getsock`: per
    /// family, the fallback for kernels that refuse it).
    pub sock_diag_one_walk: bool,
    /// How long each start-up phase took (shown by `doctor`).
    pub timings: Vec<(&'static str, std::time::Duration)>,
    /// Names of this kernel's reset reasons.
    pub rst_reasons: RstReasons,
}

fn one_walk(cfg: &ProbeConfig) -> bool {
    !cfg.disabled.iter().any(|d| d == "tcpdiag_getsock")
}

/// Whether this run needs BPF at all: everything but an instant snapshot served by sock_diag.
pub fn needs_bpf(cfg: &ProbeConfig) -> bool {
    cfg.trace || cfg.disabled.iter().any(|d| d == "sock_diag") || cfg.sock_diag.is_err()
}

fn sock_diag_status(cfg: &ProbeConfig, iter_error: Option<String>) -> SignalStatus {
    match &cfg.sock_diag {
        Ok(()) => SignalStatus {
            signal: "inventory",
            hook: Some("sock_diag".into()),
            note: iter_error.map(|e| format!("iter/tcp: {e}")),
        },
        Err(e) => SignalStatus {
            signal: "inventory",
            hook: None,
            note: Some(format!(
                "{}sock_diag: {e}; sockets that existed before start are not seen",
                iter_error.map_or(String::new(), |i| format!("iter/tcp: {i}; "))
            )),
        },
    }
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
        let tracefs = globals::tracefs()?;
        let mut status = Vec::new();
        let k = KernelFacts::read(cfg, &tracefs, &mut status, &mut lap);
        let globals = globals::Globals::new(cfg, &k);
        let mut loader = EbpfLoader::new();
        loader.btf(k.aya_btf.as_ref());
        globals.configure(&mut loader);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("loading the eBPF object: {}", short(&e)))?;
        lap("load object");
        if cfg.trace {
            strategies::attach_all(&mut ebpf, cfg, &k, &mut status)?;
        }
        lap("attach");
        iter::load_all(&mut ebpf, cfg, &k, &mut status);
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
        })
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
}
