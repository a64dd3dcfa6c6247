//! What the programs are told before loading: kernel struct offsets and drop-reason numbers
//! resolved from BTF, the classic state tracepoint's record layout from tracefs,
//! `tw_timer_handler`'s address, the in-kernel filters and the ring sizes. Rust eBPF has no
//! CO-RE relocations: these globals stand in for them.
use std::path::{Path, PathBuf};

use aya::{Btf, EbpfLoader};

use super::config::{ProbeConfig, SignalStatus, VMLINUX_BTF};
use super::rings::{RINGS, ring_count, ring_size};
use super::{btf, kallsyms, tracefs};
use crate::model::event::RstReasons;

/// What was learned about this kernel before loading.
pub(super) struct KernelFacts {
    /// Kernel BTF as aya uses it (for tp_btf, fentry and iterators); `None` without BTF.
    pub aya_btf: Option<Btf>,
    /// The core field group resolved: programs may read sockets through offsets.
    pub core_ok: bool,
    /// Field groups that did not resolve, with why: their signals only are disabled.
    pub group_err: Vec<(&'static str, String)>,
    offsets: Vec<(&'static str, u32)>,
    /// Drop-reason globals (`u32::MAX` when the kernel lacks the reason).
    pub reasons: Vec<(&'static str, u32)>,
    pub rst_reasons: RstReasons,
    /// `tw_timer_handler`'s address (0 unknown: the timer strategy cannot be used).
    pub tw_handler: u64,
    /// The classic state tracepoint's format was readable.
    pub tps_ok: bool,
    /// Tracing programs may use socket local storage (5.11+) and take socket cookies
    /// (5.12+): probed by loading, never assumed from the version.
    pub sk_storage: bool,
    pub sock_cookie: bool,
    tps_globals: Vec<(&'static str, u32)>,
}

impl KernelFacts {
    /// The missing BTF is reported into `status` (everything BTF-based then degrades).
    pub fn read(
        cfg: &ProbeConfig,
        tracefs: Option<&Path>,
        status: &mut Vec<SignalStatus>,
        lap: &mut dyn FnMut(&'static str),
    ) -> KernelFacts {
        let facts = match btf::facts(Path::new(VMLINUX_BTF)) {
            Ok((f, _cached)) => Some(f),
            Err(e) => {
                status.push(SignalStatus {
                    signal: "kernel BTF",
                    hook: None,
                    note: Some(format!(
                        "{e}; no socket cookies, netns labels or tp_btf hooks"
                    )),
                });
                None
            }
        };
        // Offsets per field group; a group that does not resolve disables its signals only.
        let offsets = facts.as_ref().map(|f| f.globals()).unwrap_or_default();
        let group_err = btf::GROUPS
            .iter()
            .filter_map(|g| {
                facts
                    .as_ref()
                    .and_then(|f| f.group_error(g))
                    .map(|e| (g.name, e.to_string()))
            })
            .collect();
        let core_ok = facts.as_ref().is_some_and(|f| f.group_ok(&btf::CORE));
        lap("BTF offsets");
        let aya_btf = facts.as_ref().and_then(|_| Btf::from_sys_fs().ok());
        let reasons = vec![
            (
                "REASON_LISTEN_OVERFLOW",
                facts.as_ref().map_or(u32::MAX, |f| f.listen_overflow),
            ),
            (
                "REASON_NO_SOCKET",
                facts.as_ref().map_or(u32::MAX, |f| f.no_socket),
            ),
        ];
        let rst_reasons = RstReasons::new(
            facts
                .as_ref()
                .map(|f| f.rst_reasons.clone())
                .unwrap_or_default(),
        );
        lap("BTF (aya)");
        let tw_handler = if cfg.trace {
            kallsyms::kallsyms_cached("tw_timer_handler")
        } else {
            0
        };
        let tps = tracefs.and_then(|t| tracefs::read_format(t, "sock", "inet_sock_set_state").ok());
        let mut tps_globals = Vec::new();
        if let Some(f) = &tps {
            for (global, field) in [
                ("TPS_SKADDR", "skaddr"),
                ("TPS_OLDSTATE", "oldstate"),
                ("TPS_NEWSTATE", "newstate"),
                ("TPS_SPORT", "sport"),
                ("TPS_DPORT", "dport"),
                ("TPS_FAMILY", "family"),
                ("TPS_PROTOCOL", "protocol"),
                ("TPS_SADDR", "saddr"),
                ("TPS_DADDR", "daddr"),
                ("TPS_SADDR_V6", "saddr_v6"),
                ("TPS_DADDR_V6", "daddr_v6"),
            ] {
                if let Some(fl) = f.get(field) {
                    tps_globals.push((global, fl.offset));
                }
            }
        }
        lap("kallsyms");
        KernelFacts {
            aya_btf,
            core_ok,
            group_err,
            offsets,
            reasons,
            rst_reasons,
            tw_handler,
            tps_ok: tps.is_some(),
            tps_globals,
            sk_storage: true,
            sock_cookie: true,
        }
    }

    /// The reason a field group did not resolve, if it did not.
    pub fn group_error(&self, group: &btf::FieldGroup) -> Option<&str> {
        self.group_err
            .iter()
            .find(|(n, _)| *n == group.name)
            .map(|(_, e)| e.as_str())
    }
}

/// Every global the object is given, owned here: the loader keeps references to them.
pub(super) struct Globals {
    u32s: Vec<(&'static str, u32)>,
    tw_handler: u64,
    /// aya-log's level: warnings, or everything down to debug.
    log_level: u8,
    nrings: u32,
    per_ring: u32,
    trace: bool,
    map_entries: Vec<(String, u32)>,
}

impl Globals {
    pub fn new(cfg: &ProbeConfig, k: &KernelFacts) -> Globals {
        let nrings = ring_count();
        let f = cfg.filters;
        let mut u32s = vec![
            ("NRINGS", nrings),
            ("HAVE_BTF_OFFSETS", u32::from(k.core_ok)),
            ("NO_SK_STORAGE", u32::from(!k.sk_storage)),
            ("NO_SOCK_COOKIE", u32::from(!k.sock_cookie)),
        ];
        u32s.extend(k.offsets.iter().chain(&k.tps_globals).chain(&k.reasons));
        u32s.extend([
            ("FILTER_PORT", f.port as u32),
            ("FILTER_LPORT", f.lport as u32),
            ("FILTER_RPORT", f.rport as u32),
            ("FILTER_PID", f.pid),
            ("FILTER_FAMILY", f.family as u32),
            ("FILTER_NETNS", f.netns),
        ]);
        Globals {
            u32s,
            tw_handler: k.tw_handler,
            log_level: if cfg.log_ebpf {
                aya_log::Level::Debug as u8
            } else {
                aya_log::Level::Warn as u8
            },
            nrings,
            per_ring: if cfg.trace {
                ring_size(cfg.ring_bytes, nrings)
            } else {
                4096
            },
            trace: cfg.trace,
            map_entries: cfg.map_entries.clone(),
        }
    }

    /// Sets every global and map size of the object before it is loaded.
    pub fn configure<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        for (i, name) in RINGS.iter().enumerate() {
            let size = if (i as u32) < self.nrings {
                self.per_ring
            } else {
                4096
            };
            loader.map_max_entries(name, size);
        }
        if !self.trace {
            // Only the iterator runs: the event-side maps need not be preallocated.
            for m in ["SOCKS", "LISTENERS", "REQ_LAST"] {
                loader.map_max_entries(m, 1);
            }
        }
        for (name, n) in &self.map_entries {
            loader.map_max_entries(name, *n);
        }
        loader.override_global("TW_HANDLER", &self.tw_handler, true);
        loader.override_global(aya_log::LEVEL, &self.log_level, true);
        for (name, v) in &self.u32s {
            loader.override_global(name, v, true);
        }
    }
}

/// The tracefs mount the classic tracepoints need, or why there is none.
pub(super) fn tracefs() -> Result<PathBuf, String> {
    tracefs::locate()
}
