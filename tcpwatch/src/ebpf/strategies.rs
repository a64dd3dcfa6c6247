//! The signal table: for each signal, the field groups its programs read, its strategies in
//! order of preference (fentry, raw BTF tracepoint, classic tracepoint) and what degrades
//! without it; attaching the first strategy the kernel accepts, and saying why others failed.
use anyhow::{Context as _, anyhow};
use aya::programs::{BtfTracePoint, FEntry, Iter, TracePoint};
use aya::{Btf, Ebpf};

use super::btf;
use super::config::{ProbeConfig, SignalStatus, sock_diag_status};
use super::globals::KernelFacts;
use super::verifier::short;

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

/// `signal` served by iterator `iter` when it loaded, else by `fallback`, saying why
/// (`then` adds what the fallback costs).
pub(super) fn iterator_or(
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
    /// Why classic tracepoints cannot be attached (no usable tracefs), if so.
    no_tracefs: Option<&'a String>,
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
                        Err(anyhow!(
                            "tw_timer_handler's address is not in /proc/kallsyms (hidden without CAP_SYSLOG)"
                        ))
                    }
                    Some(b) => progs
                        .iter()
                        .try_for_each(|(p, tp)| attach_btf(ebpf, p, tp, b)),
                },
                Strategy::Tp(progs) => match self.no_tracefs {
                    Some(why) => Err(anyhow!("{why}")),
                    None => progs
                        .iter()
                        .try_for_each(|(p, c, n)| attach_tracepoint(ebpf, p, c, n)),
                },
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

pub(super) fn load_iter(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<()> {
    load_iter_named(ebpf, btf, "dump_tcp", "tcp")
}

pub(super) fn load_iter_named(
    ebpf: &mut Ebpf,
    btf: &Btf,
    prog: &str,
    target: &str,
) -> anyhow::Result<()> {
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

/// Attaches every signal's first working strategy; the owner context and state transitions
/// first (every other program reads the softirq flag; without transitions there is nothing
/// to follow).
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    cfg: &ProbeConfig,
    k: &KernelFacts,
    no_tracefs: Option<&String>,
    status: &mut Vec<SignalStatus>,
) -> anyhow::Result<()> {
    let btf_ok = k.aya_btf.is_some() && k.core_ok && !cfg.disabled.iter().any(|d| d == "tp_btf");
    let fentry_ok = k.aya_btf.is_some() && k.core_ok && !cfg.disabled.iter().any(|d| d == "fentry");
    let ctx = Attach {
        btf: k.aya_btf.as_ref().filter(|_| btf_ok),
        fentry: k.aya_btf.as_ref().filter(|_| fentry_ok),
        tw_handler_known: k.tw_handler != 0,
        no_tracefs,
    };

    // Execution context first: every other program reads the per-CPU softirq flag.
    let ctx_status = ctx.first(
        ebpf,
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
        ebpf,
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
    if !k.tps_ok
        && state
            .hook
            .as_deref()
            .is_some_and(|h| h.starts_with("tracepoint"))
    {
        anyhow::bail!(
            "sock/inet_sock_set_state has no readable format in tracefs{}",
            no_tracefs.map_or(String::new(), |w| format!(": {w}"))
        );
    }
    status.push(state);

    for spec in SIGNALS {
        let missing: Vec<String> = spec
            .groups
            .iter()
            .filter_map(|g| k.group_error(g).map(str::to_string))
            .collect();
        let extra = match spec.name {
            "accept overflow at final ACK" if k.reasons[0].1 == u32::MAX => {
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
            ctx.first(ebpf, spec.name, spec.strategies, spec.degrade)
        };
        status.push(st);
    }
    // Retransmits still load without the segment offsets, one segment each: say so.
    if let Some(e) = k.group_error(&btf::RETRANS_SEGS)
        && let Some(s) = status
            .iter_mut()
            .find(|s| s.signal == "retransmits" && s.hook.is_some())
    {
        s.note = Some(format!(
            "{e}; segments per retransmit unknown, each counts one"
        ));
    }
    Ok(())
}

/// Loads the iterators (attached per read) and says which source serves the inventory, the
/// socket owners and the listener samples.
pub(super) fn load_iterators(
    ebpf: &mut Ebpf,
    cfg: &ProbeConfig,
    k: &KernelFacts,
    status: &mut Vec<SignalStatus>,
) {
    let btf_ok = k.aya_btf.is_some() && k.core_ok && !cfg.disabled.iter().any(|d| d == "tp_btf");

    // The inventory iterator is loaded now and attached per read (see `inventory_file`);
    // sock_diag serves when it cannot (its listener samples walk every socket).
    let iter_ok = match (k.aya_btf.as_ref(), k.core_ok) {
        _ if cfg.disabled.iter().any(|d| d == "iter_tcp") => Err(anyhow!("disabled")),
        (Some(b), true) => load_iter(ebpf, b),
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
    let owners_group = k.group_error(&btf::OWNERS);
    let owners_ok = match (k.aya_btf.as_ref(), k.core_ok, owners_group) {
        _ if cfg.disabled.iter().any(|d| d == "task_file") => Err(anyhow!("disabled")),
        (_, _, Some(e)) => Err(anyhow!("{e}")),
        (Some(b), true, None) => load_iter_named(ebpf, b, "dump_task_file", "task_file"),
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
        let ok = match (k.aya_btf.as_ref(), &iter_ok) {
            _ if cfg.disabled.iter().any(|d| d == "listener_map") => Err(anyhow!("disabled")),
            _ if !k.sk_storage => Err(anyhow!(
                "no socket storage for tracing programs on this kernel (5.11+)"
            )),
            (Some(b), Ok(())) if btf_ok => {
                load_iter_named(ebpf, b, "dump_listeners", "bpf_sk_storage_map")
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
}
