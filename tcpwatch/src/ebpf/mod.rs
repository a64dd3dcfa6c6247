//! Loading, configuring and attaching the eBPF programs, with one strategy list per signal chosen
//! by what this kernel accepts, plus access to the ring buffer and the kernel-side counters.
pub mod btf;
pub mod decode;
pub mod reader;
pub mod records;
pub mod tracefs;

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, FEntry, Iter, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use tcpwatch_common::{ListenKey, Owner, counter};

use crate::model::event::RstReasons;

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpwatch"));

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Ring buffers in the object; CPU c writes to ring c % ring_count().
const RINGS: [&str; 4] = ["EVENTS_0", "EVENTS_1", "EVENTS_2", "EVENTS_3"];

/// One ring per CPU up to the four the object has.
pub fn ring_count() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1) as u32;
    cpus.clamp(1, RINGS.len() as u32)
}

/// Bytes per ring: the total split evenly, a power of two, at least 64 KiB.
pub fn ring_size(total: u32, rings: u32) -> u32 {
    let each = (total / rings.max(1)).max(64 << 10);
    if each.is_power_of_two() {
        each
    } else {
        each.next_power_of_two() >> 1
    }
}

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

/// Run statistics of one attached program (run time needs `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub name: String,
    pub run_ns: u64,
    pub runs: u64,
    /// Times the kernel skipped the program because it was already running on that CPU (a
    /// softirq interrupting it): events lost before any of our code ran.
    pub recursion_misses: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD`; aya 0.14's `ProgramInfo` does not expose `recursion_misses`.
fn prog_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: zeroed C structs are valid; the kernel fills at most info_len bytes of `info`.
    unsafe {
        let mut info: aya_obj::generated::bpf_prog_info = std::mem::zeroed();
        let mut attr: aya_obj::generated::bpf_attr = std::mem::zeroed();
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info_len = std::mem::size_of_val(&info) as u32;
        attr.info.info = &mut info as *mut _ as u64;
        let rc = libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut _,
            std::mem::size_of_val(&attr),
        );
        (rc == 0).then_some(info)
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

/// One line for an aya error: its chain joined, and of a verifier log only the verdict.
fn short(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    // TCPWATCH_VERIFIER_LOG=1 keeps the whole verifier log, for debugging a refused program.
    if std::env::var_os("TCPWATCH_VERIFIER_LOG").is_some() {
        return s;
    }
    one_line(&s)
}

pub fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.len() <= 1 {
        return s.trim().to_string();
    }
    let head = lines[0]
        .split("Verifier output:")
        .next()
        .unwrap_or(lines[0])
        .trim_end();
    let verdict = lines
        .iter()
        .rev()
        .find(|l| {
            !(l.starts_with("verification time")
                || l.starts_with("stack depth")
                || l.starts_with("processed ")
                || l.starts_with(':'))
        })
        .copied()
        .unwrap_or("");
    format!("{head} verifier: {verdict}")
}

/// Address of a text symbol in /proc/kallsyms content (0 when absent or hidden).
pub fn kallsyms_addr(text: &str, name: &str) -> u64 {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_ty), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if sym == name && it.next().is_none() {
            return u64::from_str_radix(addr, 16).unwrap_or(0);
        }
    }
    0
}

/// A text symbol's address, cached per boot in /run/tcpwatch (reading /proc/kallsyms takes
/// ~50 ms; the address only changes with a reboot, which also clears /run).
pub fn kallsyms_cached(name: &str) -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let file = Path::new(btf::CACHE_DIR).join(format!("kallsyms-{name}"));
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((b, a)) = text.split_once(' ')
        && b == boot.trim()
        && let Ok(addr) = u64::from_str_radix(a.trim(), 16)
    {
        return addr;
    }
    let addr = std::fs::read_to_string("/proc/kallsyms")
        .map(|t| kallsyms_addr(&t, name))
        .unwrap_or(0);
    if addr != 0 && std::fs::create_dir_all(btf::CACHE_DIR).is_ok() {
        let _ = std::fs::write(&file, format!("{} {addr:x}", boot.trim()));
    }
    addr
}

/// One signal: the field groups its programs read and its strategies in order of preference.
struct SignalSpec {
    name: &'static str,
    groups: &'static [&'static btf::FieldGroup],
    strategies: &'static [Strategy],
    degrade: &'static str,
}

const SIGNALS: &[SignalSpec] = &[
    SignalSpec {
        name: "retransmits",
        groups: &[&btf::PACKET],
        strategies: &[
            Strategy::Btf(&[("retrans_btf", "tcp_retransmit_skb")]),
            Strategy::Btf(&[("retrans_btf_noerr", "tcp_retransmit_skb")]),
        ],
        degrade: "no SYN, data or FIN retransmit events",
    },
    SignalSpec {
        name: "SYN-ACK retransmits",
        groups: &[&btf::LISTENER, &btf::MISC],
        strategies: &[Strategy::Btf(&[("synack_btf", "tcp_retransmit_synack")])],
        degrade: "no SYN-ACK retransmit events (listeners' SYN queues still sampled)",
    },
    SignalSpec {
        name: "resets sent",
        groups: &[&btf::PACKET],
        strategies: &[
            Strategy::Btf(&[("rst_send_btf", "tcp_send_reset")]),
            Strategy::Btf(&[("rst_send_btf_noreason", "tcp_send_reset")]),
        ],
        degrade: "no events for resets sent",
    },
    SignalSpec {
        name: "resets received",
        groups: &[],
        strategies: &[Strategy::Btf(&[("rst_recv_btf", "tcp_receive_reset")])],
        degrade: "no events for resets received",
    },
    SignalSpec {
        name: "socket errors",
        groups: &[&btf::MISC],
        strategies: &[Strategy::Btf(&[("sk_error_btf", "inet_sk_error_report")])],
        degrade: "no socket error events (ECONNREFUSED, ETIMEDOUT, ...)",
    },
    SignalSpec {
        name: "accept overflow at final ACK",
        groups: &[&btf::LISTENER, &btf::PACKET],
        strategies: &[Strategy::Btf(&[("kfree_skb_btf", "kfree_skb")])],
        degrade: "overflows only inferred from listener drop counters",
    },
    SignalSpec {
        name: "TIME_WAIT",
        groups: &[&btf::TIMEWAIT],
        strategies: &[
            // Trampolines run for timewait sockets only; the timer hooks for every timer.
            Strategy::Fentry(&[
                ("tw_enter_fentry", "inet_twsk_hashdance_schedule"),
                ("tw_rearm_fentry", "__inet_twsk_schedule"),
                ("tw_expire_fentry", "tw_timer_handler"),
                ("tw_deschedule_fentry", "inet_twsk_deschedule_put"),
            ]),
            Strategy::Fentry(&[
                ("tw_enter_old_fentry", "inet_twsk_hashdance"),
                ("tw_rearm_fentry", "__inet_twsk_schedule"),
                ("tw_expire_fentry", "tw_timer_handler"),
                ("tw_deschedule_fentry", "inet_twsk_deschedule_put"),
            ]),
            Strategy::Btf(&[
                ("tw_start_btf", "timer_start"),
                ("tw_cancel_btf", "timer_cancel"),
                ("tw_expire_btf", "timer_expire_entry"),
            ]),
        ],
        degrade: "TIME_WAIT only counted from /proc/net/sockstat, without enter/exit events",
    },
];

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
        let t0 = std::time::Instant::now();
        let mut timings: Vec<(&'static str, std::time::Duration)> = Vec::new();
        let mut lap = |what: &'static str, t: &mut std::time::Instant| {
            timings.push((what, t.elapsed()));
            *t = std::time::Instant::now();
        };
        let mut t = t0;
        let tracefs = tracefs::ensure_mounted()?;
        let mut status = Vec::new();
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
        let offsets: Vec<(&'static str, u32)> =
            facts.as_ref().map(|f| f.globals()).unwrap_or_default();
        let group_err: Vec<(&'static str, String)> = btf::GROUPS
            .iter()
            .filter_map(|g| {
                facts
                    .as_ref()
                    .and_then(|f| f.group_error(g))
                    .map(|e| (g.name, e.to_string()))
            })
            .collect();
        let core_ok = facts.as_ref().is_some_and(|f| f.group_ok(&btf::CORE));
        let have_offsets: u32 = u32::from(core_ok);
        lap("BTF offsets", &mut t);
        let aya_btf = if facts.is_some() {
            Btf::from_sys_fs().ok()
        } else {
            None
        };
        let reasons: Vec<(&'static str, u32)> = vec![
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
        lap("BTF (aya)", &mut t);
        let tw_handler: u64 = if cfg.trace {
            kallsyms_cached("tw_timer_handler")
        } else {
            0
        };

        let tps = tracefs::read_format(&tracefs, "sock", "inet_sock_set_state").ok();
        let mut tps_globals: Vec<(&'static str, u32)> = Vec::new();
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

        let f = cfg.filters;
        let filter_globals: [(&str, u32); 6] = [
            ("FILTER_PORT", f.port as u32),
            ("FILTER_LPORT", f.lport as u32),
            ("FILTER_RPORT", f.rport as u32),
            ("FILTER_PID", f.pid),
            ("FILTER_FAMILY", f.family as u32),
            ("FILTER_NETNS", f.netns),
        ];
        let mut loader = EbpfLoader::new();
        loader.btf(aya_btf.as_ref());
        let nrings = ring_count();
        let per_ring = if cfg.trace {
            ring_size(cfg.ring_bytes, nrings)
        } else {
            4096
        };
        for (i, name) in RINGS.iter().enumerate() {
            loader.map_max_entries(name, if (i as u32) < nrings { per_ring } else { 4096 });
        }
        loader.override_global("NRINGS", &nrings, true);
        if !cfg.trace {
            // Only the iterator runs: the event-side maps need not be preallocated.
            for m in ["SOCKS", "LISTENERS", "REQ_LAST"] {
                loader.map_max_entries(m, 1);
            }
        }
        loader.override_global("HAVE_BTF_OFFSETS", &have_offsets, true);
        loader.override_global("TW_HANDLER", &tw_handler, true);
        for (name, v) in offsets.iter().chain(&tps_globals).chain(&reasons) {
            loader.override_global(name, v, true);
        }
        for (name, v) in &filter_globals {
            loader.override_global(name, v, true);
        }
        lap("kallsyms", &mut t);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("loading the eBPF object: {}", short(&e)))?;

        lap("load object", &mut t);
        let btf_ok = aya_btf.is_some() && core_ok && !cfg.disabled.iter().any(|d| d == "tp_btf");
        let fentry_ok = aya_btf.is_some() && core_ok && !cfg.disabled.iter().any(|d| d == "fentry");
        let ctx = Attach {
            btf: aya_btf.as_ref().filter(|_| btf_ok),
            fentry: aya_btf.as_ref().filter(|_| fentry_ok),
            tw_handler_known: tw_handler != 0,
        };

        if cfg.trace {
            // Execution context first: every other program reads the per-CPU softirq flag.
            let ctx_status = ctx.first(
                &mut ebpf,
                "owner context",
                &[
                    Strategy::Btf(&[
                        ("softirq_entry_btf", "softirq_entry"),
                        ("softirq_exit_btf", "softirq_exit"),
                    ]),
                    Strategy::Tp(&[
                        ("softirq_entry", "irq", "softirq_entry"),
                        ("softirq_exit", "irq", "softirq_exit"),
                    ]),
                ],
                "softirq events may name the interrupted task as owner",
            );
            status.push(ctx_status);

            // State transitions: tp_btf gives the cookie; the classic tracepoint is the fallback.
            let state = ctx.first(
                &mut ebpf,
                "state",
                &[
                    // Order matters: `main` must run before `nested` (see the eBPF side).
                    Strategy::Btf(&[
                        ("state_btf_main", "inet_sock_set_state"),
                        ("state_btf_nested", "inet_sock_set_state"),
                    ]),
                    Strategy::Tp(&[("state_tp", "sock", "inet_sock_set_state")]),
                ],
                "no TCP state transitions",
            );
            if state.hook.is_none() {
                anyhow::bail!("cannot trace TCP state transitions: {}", state.line());
            }
            if tps.is_none()
                && state
                    .hook
                    .as_deref()
                    .is_some_and(|h| h.starts_with("tracepoint"))
            {
                anyhow::bail!("sock/inet_sock_set_state has no readable format in tracefs");
            }
            status.push(state);

            for spec in SIGNALS {
                let missing: Vec<String> = spec
                    .groups
                    .iter()
                    .filter_map(|g| {
                        group_err
                            .iter()
                            .find(|(n, _)| *n == g.name)
                            .map(|(_, e)| e.clone())
                    })
                    .collect();
                let extra = match spec.name {
                    "accept overflow at final ACK" if reasons[0].1 == u32::MAX => {
                        Some("no TCP_LISTEN_OVERFLOW drop reason in this kernel".to_string())
                    }
                    _ => None,
                };
                let st = if let Some(why) = missing.into_iter().next().or(extra) {
                    SignalStatus {
                        signal: spec.name,
                        hook: None,
                        note: Some(format!("{why}; {}", spec.degrade)),
                    }
                } else {
                    ctx.first(&mut ebpf, spec.name, spec.strategies, spec.degrade)
                };
                status.push(st);
            }
            // Retransmits still load without the segment offsets, one segment each: say so.
            if let Some((_, e)) = group_err.iter().find(|(n, _)| *n == btf::RETRANS_SEGS.name)
                && let Some(s) = status
                    .iter_mut()
                    .find(|s| s.signal == "retransmits" && s.hook.is_some())
            {
                s.note = Some(format!(
                    "{e}; segments per retransmit unknown, each counts one"
                ));
            }
        }
        lap("attach", &mut t);

        // The inventory iterator is loaded now and attached per read (see `inventory_file`);
        // sock_diag serves when it cannot (its listener samples walk every socket).
        let iter_ok = match (aya_btf.as_ref(), core_ok) {
            _ if cfg.disabled.iter().any(|d| d == "iter_tcp") => Err(anyhow!("disabled")),
            (Some(b), true) => load_iter(&mut ebpf, b),
            _ => Err(anyhow!("no kernel BTF")),
        };
        status.push(match &iter_ok {
            Ok(()) => SignalStatus {
                signal: "inventory",
                hook: Some("iter/tcp".into()),
                note: None,
            },
            Err(e) if cfg.disabled.iter().any(|d| d == "sock_diag") => SignalStatus {
                signal: "inventory",
                hook: None,
                note: Some(format!(
                    "iter/tcp: {e}; sock_diag disabled; sockets that existed before start are not seen"
                )),
            },
            Err(e) => sock_diag_status(cfg, Some(e.to_string())),
        });

        // Owners of sockets that existed before start: one record per socket file, instead of
        // a readlink per descriptor in /proc/*/fd (the fallback).
        let owners_group = group_err.iter().find(|(n, _)| *n == btf::OWNERS.name);
        let owners_ok = match (aya_btf.as_ref(), core_ok, owners_group) {
            _ if cfg.disabled.iter().any(|d| d == "task_file") => Err(anyhow!("disabled")),
            (_, _, Some((_, e))) => Err(anyhow!("{e}")),
            (Some(b), true, None) => load_iter_named(&mut ebpf, b, "dump_task_file", "task_file"),
            _ => Err(anyhow!("no kernel BTF")),
        };
        status.push(iterator_or(
            "socket owners",
            &owners_ok,
            "iter/task_file",
            "/proc/*/fd",
            "",
        ));

        // The queue sampler's iterator over the listeners marked in LISTEN_SK (by the state
        // hook and the inventory walk, so only with both): one read for every namespace.
        if cfg.trace {
            let ok = match (aya_btf.as_ref(), &iter_ok) {
                _ if cfg.disabled.iter().any(|d| d == "listener_map") => Err(anyhow!("disabled")),
                (Some(b), Ok(())) if btf_ok => {
                    load_iter_named(&mut ebpf, b, "dump_listeners", "bpf_sk_storage_map")
                }
                _ => Err(anyhow!("needs tp_btf and iter/tcp")),
            };
            status.push(iterator_or(
                "listener samples",
                &ok,
                "iter/bpf_sk_storage_map",
                "inventory per namespace",
                "; each sample walks that namespace's share of the socket hash",
            ));
        }

        lap("load iterator", &mut t);
        let _ = t0;
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
            rst_reasons,
        })
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

    /// Runs the inventory iterator in the calling thread's network namespace (the kernel binds
    /// the iterator to the namespace of the task that creates it). `listeners_only` skips
    /// everything but LISTEN sockets in the kernel.
    pub fn iterate(&mut self, listeners_only: bool) -> anyhow::Result<Vec<u8>> {
        {
            let mode = self
                .ebpf
                .as_mut()
                .context("no BPF object loaded")?
                .map_mut("ITER_MODE")
                .context("map ITER_MODE missing")?;
            let mut mode: aya::maps::Array<&mut MapData, u32> =
                aya::maps::Array::try_from(mode).map_err(|e| anyhow!("map ITER_MODE: {e}"))?;
            mode.set(0, u32::from(listeners_only), 0)
                .map_err(|e| anyhow!("setting ITER_MODE: {e}"))?;
        }
        // The listeners-only program ends the walk (EAGAIN) at the first socket that is not
        // listening: listeners come first, the rest is not needed.
        self.read_iter("dump_tcp", "tcp", listeners_only)
    }

    /// Runs iterator program `prog` (`iter/{target}`) once and returns all it wrote; EAGAIN
    /// ends the read normally when the program may stop the walk early.
    fn read_iter(
        &mut self,
        prog: &str,
        target: &str,
        eagain_ends: bool,
    ) -> anyhow::Result<Vec<u8>> {
        use std::io::Read as _;
        let p: &mut Iter = self
            .ebpf
            .as_mut()
            .context("no BPF object loaded")?
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()
            .map_err(|e| anyhow!("program {prog}: {e}"))?;
        let id = p
            .attach()
            .map_err(|e| anyhow!("attaching iter/{target}: {}", short(&e)))?;
        let link = p
            .take_link(id)
            .map_err(|e| anyhow!("iter/{target} link: {e}"))?;
        let mut file = link
            .into_file()
            .map_err(|e| anyhow!("creating the {target} iterator: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if eagain_ends && e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!("reading the {target} iterator: {e}")),
            }
        }
        Ok(buf)
    }

    /// Socket inode -> owning process, from `iter/task_file`; `None` when that iterator is
    /// not loaded (the caller falls back to /proc/*/fd).
    pub fn socket_owners(&mut self) -> Option<anyhow::Result<Vec<u8>>> {
        if !self
            .status
            .iter()
            .any(|s| s.signal == "socket owners" && s.hook.as_deref() == Some("iter/task_file"))
        {
            return None;
        }
        Some(self.read_iter("dump_task_file", "task_file", false))
    }

    /// The listeners of every namespace in one read (`iter/bpf_sk_storage_map` over
    /// LISTEN_SK), or `None` when that iterator is not loaded.
    pub fn all_listeners(&mut self) -> Option<anyhow::Result<Vec<u8>>> {
        if !self.status.iter().any(|s| {
            s.signal == "listener samples" && s.hook.as_deref() == Some("iter/bpf_sk_storage_map")
        }) {
            return None;
        }
        Some(self.read_map_iter("dump_listeners", "LISTEN_SK"))
    }

    /// Runs map iterator `prog` over map `map` once. aya 0.14 attaches iterators without
    /// target parameters, so the link is created here (BPF_LINK_CREATE with the map's fd).
    fn read_map_iter(&mut self, prog: &str, map: &str) -> anyhow::Result<Vec<u8>> {
        use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};
        use std::io::Read as _;
        use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
        let ebpf = self.ebpf.as_ref().context("no BPF object loaded")?;
        let prog_fd = ebpf
            .program(prog)
            .with_context(|| format!("program {prog} missing"))?
            .fd()
            .map_err(|e| anyhow!("program {prog}: {e}"))?
            .as_fd()
            .as_raw_fd();
        let map_fd = match ebpf.map(map) {
            Some(aya::maps::Map::SkStorage(m)) => m.fd().as_fd().as_raw_fd(),
            _ => anyhow::bail!("map {map} missing"),
        };
        let sys = |cmd: bpf_cmd, attr: &mut bpf_attr| -> std::io::Result<OwnedFd> {
            // SAFETY: a zero-initialised bpf_attr with the fields this command reads set.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd as libc::c_long,
                    attr as *mut bpf_attr,
                    std::mem::size_of::<bpf_attr>(),
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the kernel returned a new descriptor we now own.
            Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
        };
        // union bpf_iter_link_info: its first member is the map's fd.
        let info: [u32; 4] = [map_fd as u32, 0, 0, 0];
        // SAFETY: bpf_attr is plain old data.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.link_create.__bindgen_anon_1.prog_fd = prog_fd as u32;
        attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
        attr.link_create.__bindgen_anon_3.__bindgen_anon_1.iter_info = info.as_ptr() as u64;
        attr.link_create
            .__bindgen_anon_3
            .__bindgen_anon_1
            .iter_info_len = std::mem::size_of_val(&info) as u32;
        let link = sys(bpf_cmd::BPF_LINK_CREATE, &mut attr)
            .map_err(|e| anyhow!("attaching iter/bpf_sk_storage_map: {e}"))?;
        // SAFETY: as above, for iter_create.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.iter_create.link_fd = link.as_raw_fd() as u32;
        let iter = sys(bpf_cmd::BPF_ITER_CREATE, &mut attr)
            .map_err(|e| anyhow!("creating the {map} iterator: {e}"))?;
        let mut file = std::fs::File::from(iter);
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| anyhow!("reading the {map} iterator: {e}"))?;
        Ok(buf)
    }

    /// Where the inventory comes from, if anywhere.
    pub fn inventory(&self) -> Option<Inventory> {
        let s = self.status.iter().find(|s| s.signal == "inventory")?;
        match s.hook.as_deref()? {
            "iter/tcp" => Some(Inventory::Iter),
            "sock_diag" => Some(Inventory::SockDiag),
            _ => None,
        }
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

    /// Sum over CPUs of one kernel-side counter.
    pub fn counter(&self, idx: u32) -> u64 {
        match self.counters.as_ref().map(|c| c.get(&idx, 0)) {
            Some(Ok(v)) => v.iter().sum(),
            _ => 0,
        }
    }

    pub fn kernel_dropped(&self) -> u64 {
        self.counter(counter::RINGBUF_FULL)
    }

    /// Records lost to a full ring, by wire kind (see `tcpwatch_common::kind`).
    pub fn kernel_dropped_by_kind(&self) -> [u64; 16] {
        let mut out = [0u64; 16];
        let Some(map) = self.ebpf.as_ref().and_then(|e| e.map("DROPS_BY_KIND")) else {
            return out;
        };
        let Ok(arr) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return out;
        };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = arr.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// Statistics of every loaded program.
    pub fn program_stats(&self) -> Vec<ProgStats> {
        use std::os::fd::AsFd as _;
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.iter().flat_map(|e| e.programs()) {
            let Ok(fd) = prog.fd() else { continue };
            if let Some(i) = prog_info(fd.as_fd()) {
                out.push(ProgStats {
                    name: name.to_string(),
                    run_ns: i.run_time_ns,
                    runs: i.run_cnt,
                    recursion_misses: i.recursion_misses,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Events the kernel never handed to our programs (see [`ProgStats::recursion_misses`]).
    /// `state_btf_nested` skips by design and rescues `state_btf_main`'s skips.
    pub fn recursion_misses(&self) -> u64 {
        let rescued = self.counter(counter::STATE_RESCUED);
        self.program_stats()
            .iter()
            .map(|p| match p.name.as_str() {
                "state_btf_nested" => 0,
                "state_btf_main" => p.recursion_misses.saturating_sub(rescued),
                _ => p.recursion_misses,
            })
            .sum()
    }
}

/// `signal` served by iterator `iter` when it loaded, else by `fallback`, saying why
/// (`then` adds what the fallback costs).
fn iterator_or(
    signal: &'static str,
    loaded: &anyhow::Result<()>,
    iter: &str,
    fallback: &str,
    then: &str,
) -> SignalStatus {
    match loaded {
        Ok(()) => SignalStatus {
            signal,
            hook: Some(iter.into()),
            note: None,
        },
        Err(e) => SignalStatus {
            signal,
            hook: Some(fallback.into()),
            note: Some(format!("{iter}: {e}{then}")),
        },
    }
}

/// One way to serve a signal: a set of programs that must all attach.
enum Strategy {
    /// (program, kernel function) pairs, BPF trampolines.
    Fentry(&'static [(&'static str, &'static str)]),
    /// (program, raw tracepoint) pairs.
    Btf(&'static [(&'static str, &'static str)]),
    /// (program, category, tracepoint) triples.
    Tp(&'static [(&'static str, &'static str, &'static str)]),
}

impl Strategy {
    fn label(&self) -> String {
        match self {
            Strategy::Fentry(p) => {
                let names: Vec<&str> = p.iter().map(|(_, f)| *f).collect();
                format!("fentry/{}", names.join("+"))
            }
            Strategy::Btf(p) => {
                let mut names: Vec<&str> = p.iter().map(|(_, t)| *t).collect();
                names.dedup();
                format!("tp_btf/{}", names.join("+"))
            }
            Strategy::Tp(p) => {
                let mut names: Vec<String> = p.iter().map(|(_, c, n)| format!("{c}/{n}")).collect();
                names.dedup();
                format!("tracepoint/{}", names.join("+"))
            }
        }
    }

    fn programs(&self) -> Vec<&'static str> {
        match self {
            Strategy::Fentry(p) | Strategy::Btf(p) => p.iter().map(|(n, _)| *n).collect(),
            Strategy::Tp(p) => p.iter().map(|(n, _, _)| *n).collect(),
        }
    }
}

struct Attach<'a> {
    /// Kernel BTF when tp_btf programs may be used.
    btf: Option<&'a Btf>,
    /// Kernel BTF when fentry programs may be used (not disabled).
    fentry: Option<&'a Btf>,
    /// The timer hooks recognise timewait timers by `tw_timer_handler`'s address.
    tw_handler_known: bool,
}

impl Attach<'_> {
    /// Attaches the first strategy that works; the status names it and why earlier ones failed.
    fn first(
        &self,
        ebpf: &mut Ebpf,
        signal: &'static str,
        strategies: &[Strategy],
        degrade: &str,
    ) -> SignalStatus {
        let mut why = Vec::new();
        for s in strategies {
            let res = match s {
                Strategy::Fentry(progs) => match self.fentry {
                    None => Err(anyhow!("no kernel BTF or fentry disabled")),
                    Some(b) => progs
                        .iter()
                        .try_for_each(|(p, f)| attach_fentry(ebpf, p, f, b)),
                },
                Strategy::Btf(progs) => match self.btf {
                    None => Err(anyhow!("no kernel BTF or tp_btf disabled")),
                    Some(_)
                        if !self.tw_handler_known
                            && progs.iter().any(|(p, _)| p.starts_with("tw_")) =>
                    {
                        Err(anyhow!("tw_timer_handler not in /proc/kallsyms"))
                    }
                    Some(b) => progs
                        .iter()
                        .try_for_each(|(p, tp)| attach_btf(ebpf, p, tp, b)),
                },
                Strategy::Tp(progs) => progs
                    .iter()
                    .try_for_each(|(p, c, n)| attach_tracepoint(ebpf, p, c, n)),
            };
            match res {
                Ok(()) => {
                    let note = (!why.is_empty()).then(|| why.join("; "));
                    return SignalStatus {
                        signal,
                        hook: Some(s.label()),
                        note,
                    };
                }
                Err(e) => {
                    detach(ebpf, s);
                    why.push(format!("{}: {e}", s.label()));
                }
            }
        }
        why.push(degrade.to_string());
        SignalStatus {
            signal,
            hook: None,
            note: Some(why.join("; ")),
        }
    }
}

/// Unloads whatever part of a strategy did attach, so a fallback does not double-count.
fn detach(ebpf: &mut Ebpf, s: &Strategy) {
    for n in s.programs() {
        if let Some(prog) = ebpf.program_mut(n) {
            let _ = match prog {
                aya::programs::Program::BtfTracePoint(p) => p.unload(),
                aya::programs::Program::FEntry(p) => p.unload(),
                aya::programs::Program::TracePoint(p) => p.unload(),
                _ => Ok(()),
            };
        }
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog: &str,
    category: &str,
    name: &str,
) -> anyhow::Result<()> {
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {prog}: {e}"))?;
    p.load()
        .map_err(|e| anyhow!("loading {prog}: {}", short(&e)))?;
    p.attach(category, name)
        .map_err(|e| anyhow!("attaching tracepoint {category}/{name}: {}", short(&e)))?;
    Ok(())
}

fn attach_fentry(ebpf: &mut Ebpf, prog: &str, func: &str, btf: &Btf) -> anyhow::Result<()> {
    let p: &mut FEntry = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {prog}: {e}"))?;
    p.load(func, btf)
        .map_err(|e| anyhow!("loading {prog}: {}", short(&e)))?;
    p.attach()
        .map_err(|e| anyhow!("attaching fentry/{func}: {}", short(&e)))?;
    Ok(())
}

fn load_iter(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<()> {
    load_iter_named(ebpf, btf, "dump_tcp", "tcp")
}

fn load_iter_named(ebpf: &mut Ebpf, btf: &Btf, prog: &str, target: &str) -> anyhow::Result<()> {
    let p: &mut Iter = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {prog}: {e}"))?;
    p.load(target, btf)
        .map_err(|e| anyhow!("loading iter/{target}: {}", short(&e)))
}

fn attach_btf(ebpf: &mut Ebpf, prog: &str, tp: &str, btf: &Btf) -> anyhow::Result<()> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {prog}: {e}"))?;
    p.load(tp, btf)
        .map_err(|e| anyhow!("loading {prog}: {}", short(&e)))?;
    p.attach()
        .map_err(|e| anyhow!("attaching tp_btf/{tp}: {}", short(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn ring_sizes_are_powers_of_two() {
        use super::ring_size;
        assert_eq!(ring_size(16 << 20, 2), 8 << 20);
        assert_eq!(ring_size(16 << 20, 3), 4 << 20);
        assert_eq!(ring_size(1 << 20, 4), 256 << 10);
        assert_eq!(ring_size(64 << 10, 4), 64 << 10);
    }

    #[test]
    fn verifier_logs_shrink_to_the_verdict() {
        let log = "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx()\n1: (79) r8 = *(u64 *)(r1 +16)\ninvalid size of register fill\nverification time 3098 usec\nstack depth 288+0+0\nprocessed 1995 insns\n: Permission denied (os error 13)";
        assert_eq!(
            one_line(log),
            "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: invalid size of register fill"
        );
        assert_eq!(one_line("plain error"), "plain error");
    }
}
