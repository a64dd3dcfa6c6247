//! Loading, configuring and attaching the eBPF programs, with one strategy list per signal chosen
//! by what this kernel accepts, plus access to the ring buffer and the kernel-side counters.
pub mod btf;
pub mod caps;
pub mod reader;
pub mod tracefs;

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use tcpwatch_common::counter;

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
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            filters: KernelFilters::default(),
            ring_bytes: 16 << 20,
            disabled: Vec::new(),
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

/// The loaded and attached programs. Dropping it detaches everything.
pub struct Probe {
    ebpf: Ebpf,
    pub status: Vec<SignalStatus>,
    counters: PerCpuArray<MapData, u64>,
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

impl Probe {
    pub fn start(cfg: &ProbeConfig) -> anyhow::Result<Probe> {
        let tracefs = tracefs::ensure_mounted()?;
        let mut status = Vec::new();
        let kbtf = match btf::KernelBtf::load(Path::new(VMLINUX_BTF)) {
            Ok(b) => Some(b),
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
        let offsets = match &kbtf {
            Some(b) => match btf::resolve(b, btf::SOCK_FIELDS) {
                Ok(o) => o,
                Err(e) => {
                    status.push(SignalStatus {
                        signal: "kernel BTF",
                        hook: None,
                        note: Some(e.to_string()),
                    });
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let have_offsets: u32 = u32::from(!offsets.is_empty());
        let aya_btf = if kbtf.is_some() {
            Btf::from_sys_fs().ok()
        } else {
            None
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
        loader.map_max_entries("EVENTS", cfg.ring_bytes);
        loader.override_global("HAVE_BTF_OFFSETS", &have_offsets, true);
        for (name, v) in &offsets {
            loader.override_global(name, v, true);
        }
        for (name, v) in &tps_globals {
            loader.override_global(name, v, true);
        }
        for (name, v) in &filter_globals {
            loader.override_global(name, v, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("loading the eBPF object: {}", short(&e)))?;

        // Execution context first: every other program reads the per-CPU softirq flag.
        let ctx_ok = ["softirq_entry", "softirq_exit"]
            .into_iter()
            .map(|p| attach_tracepoint(&mut ebpf, p, "irq", p))
            .collect::<Result<Vec<_>, _>>();
        status.push(match ctx_ok {
            Ok(_) => SignalStatus {
                signal: "owner context",
                hook: Some("tracepoint irq/softirq_entry+exit".into()),
                note: None,
            },
            Err(e) => SignalStatus {
                signal: "owner context",
                hook: None,
                note: Some(format!(
                    "{e}; softirq events may name the interrupted task as owner"
                )),
            },
        });

        // State transitions: tp_btf gives the cookie; the classic tracepoint is the fallback.
        let mut why_not_btf = None;
        let btf_allowed = !cfg.disabled.iter().any(|d| d == "tp_btf");
        let state_hook = if let (true, Some(b), 1) = (btf_allowed, aya_btf.as_ref(), have_offsets) {
            match attach_btf(&mut ebpf, "state_btf", "inet_sock_set_state", b) {
                Ok(()) => Some("tp_btf/inet_sock_set_state".to_string()),
                Err(e) => {
                    why_not_btf = Some(format!("tp_btf refused: {e}"));
                    None
                }
            }
        } else {
            why_not_btf = Some(if btf_allowed {
                "no kernel BTF".into()
            } else {
                "tp_btf disabled".into()
            });
            None
        };
        let state_hook = match state_hook {
            Some(h) => SignalStatus {
                signal: "state",
                hook: Some(h),
                note: None,
            },
            None if tps.is_none() => SignalStatus {
                signal: "state",
                hook: None,
                note: Some(format!(
                    "{}; sock/inet_sock_set_state has no readable format",
                    why_not_btf.unwrap_or_default()
                )),
            },
            None => match attach_tracepoint(&mut ebpf, "state_tp", "sock", "inet_sock_set_state") {
                Ok(()) => SignalStatus {
                    signal: "state",
                    hook: Some("tracepoint/sock/inet_sock_set_state".into()),
                    note: Some(format!(
                        "{}; no socket cookies",
                        why_not_btf.unwrap_or_default()
                    )),
                },
                Err(e) => SignalStatus {
                    signal: "state",
                    hook: None,
                    note: Some(e.to_string()),
                },
            },
        };
        if state_hook.hook.is_none() {
            anyhow::bail!("cannot trace TCP state transitions: {}", state_hook.line());
        }
        status.push(state_hook);

        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .context("map COUNTERS missing from the eBPF object")?,
        )
        .map_err(|e| anyhow!("opening map COUNTERS: {e}"))?;
        Ok(Probe {
            ebpf,
            status,
            counters,
        })
    }

    /// The event ring buffer (can be taken once).
    pub fn take_ring(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .context("map EVENTS missing or already taken")?;
        RingBuf::try_from(map).map_err(|e| anyhow!("opening ring buffer EVENTS: {e}"))
    }

    /// Sum over CPUs of one kernel-side counter.
    pub fn counter(&self, idx: u32) -> u64 {
        match self.counters.get(&idx, 0) {
            Ok(v) => v.iter().sum(),
            Err(_) => 0,
        }
    }

    pub fn kernel_dropped(&self) -> u64 {
        self.counter(counter::RINGBUF_FULL)
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
    fn verifier_logs_shrink_to_the_verdict() {
        let log = "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx()\n1: (79) r8 = *(u64 *)(r1 +16)\ninvalid size of register fill\nverification time 3098 usec\nstack depth 288+0+0\nprocessed 1995 insns\n: Permission denied (os error 13)";
        assert_eq!(
            one_line(log),
            "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: invalid size of register fill"
        );
        assert_eq!(one_line("plain error"), "plain error");
    }
}
