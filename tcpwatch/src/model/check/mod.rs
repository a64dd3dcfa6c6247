//! `tcpwatch check`'s judgement: assertions over the in-scope events of one run, and the
//! verdict that maps to the exit code. Pure: events in, time passed in, report out.
#[cfg(test)]
mod tests;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use serde::Serialize;

use super::Loss;
use super::event::{Event, EventKind, Owner, RetransmitKind, TcpState};
use super::findings::{FindingId, Governor};
use super::snapshot::OwnerView;

/// The assertions a run is held to; `None` / empty means not asserted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// At most N retransmits, of one kind or (`None`) of every kind together.
    pub retransmits: Vec<(Option<RetransmitKind>, u64)>,
    pub no_listen_overflow: bool,
    /// At most N resets, sent and received together.
    pub max_resets: Option<u64>,
    /// At most N sockets in TIME_WAIT (or its FIN_WAIT2 substate) at the same time.
    pub max_time_wait: Option<u64>,
    /// No socket stays in CLOSE_WAIT this long.
    pub close_wait_leak_ns: Option<u64>,
    /// No connect stays in SYN_SENT this long.
    pub max_syn_sent_ns: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// How many example sockets a failed assertion lists.
const EXAMPLES: usize = 5;

type SockKey = (u32, u64);

#[derive(Clone, Debug)]
struct Open {
    since_ns: u64,
    local: SocketAddr,
    remote: SocketAddr,
    owner: Option<Owner>,
    syn_retransmits: u32,
}

/// One socket that spent long in a state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dwell {
    pub local: String,
    pub remote: String,
    pub owner: Option<OwnerView>,
    pub ms: f64,
    /// Still in that state when the run ended.
    pub ongoing: bool,
    /// SYN_SENT: the SYN retransmits it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syn_retransmits: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ListenerOverflow {
    pub netns: u32,
    pub listener: String,
    pub owner: Option<OwnerView>,
    pub queue: &'static str,
    pub action: &'static str,
    pub count: u64,
    /// Queue length and limit at the last overflow, where known.
    pub len: Option<u32>,
    pub max: Option<u32>,
}

/// What was seen in scope, whether asserted or not.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Observed {
    pub events: u64,
    pub sockets: u64,
    pub retransmits: BTreeMap<&'static str, u64>,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub errors: BTreeMap<String, u64>,
    pub overflows: Vec<ListenerOverflow>,
    pub time_wait_entered: u64,
    pub time_wait_peak: u64,
    pub close_wait_longest: Vec<Dwell>,
    pub syn_sent_longest: Vec<Dwell>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assertion {
    /// The flag as typed, e.g. `--max-retransmits syn=0`.
    pub name: String,
    pub limit: String,
    pub observed: String,
    pub passed: bool,
    /// Why it failed: the sockets or listeners responsible.
    pub details: Vec<String>,
    /// The findings of the catalogue this assertion is about.
    pub findings: Vec<FindingId>,
    /// What governs them (sysctls with their values, application code); filled in with the
    /// values of the namespace the command ran in.
    pub governed_by: Vec<Governor>,
}

/// The outcome, in the order that decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every assertion held, nothing was lost, the command succeeded.
    Pass,
    /// At least one assertion failed. Lost events only hide events, so a failure stands.
    Fail,
    /// The assertions held but the command itself failed.
    CommandFailed,
    /// Events were lost (and `--allow-loss` not given): a pass cannot be vouched for.
    Inconclusive,
}

impl Verdict {
    /// Exit codes, documented in the README: 0 pass, 1 fail, 3 command failed, 4 inconclusive
    /// (2 stays usage / runtime error).
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::CommandFailed => 3,
            Verdict::Inconclusive => 4,
        }
    }

    pub fn decide(
        assertions: &[Assertion],
        loss: &Loss,
        allow_loss: bool,
        cmd_ok: bool,
    ) -> Verdict {
        if assertions.iter().any(|a| !a.passed) {
            Verdict::Fail
        } else if !cmd_ok {
            Verdict::CommandFailed
        } else if loss.total() > 0 && !allow_loss {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        }
    }
}

/// How the command ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommandExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub success: bool,
}

/// Everything `check` reports, in every format.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub version: u32,
    pub verdict: Verdict,
    pub exit_code: i32,
    pub command: Vec<String>,
    pub command_exit: CommandExit,
    /// Wall-clock start, Unix seconds.
    pub started_unix_s: f64,
    /// From the command's start to the end of the grace period.
    pub duration_s: f64,
    pub grace_s: f64,
    pub scope: String,
    pub host: String,
    pub kernel: String,
    pub hooks: Vec<super::snapshot::HookView>,
    pub assertions: Vec<Assertion>,
    pub observed: Observed,
    /// The snapshot's findings over the run's events (counters and sysctls are namespace-wide).
    pub findings: Vec<super::findings::Finding>,
    pub loss: super::snapshot::LossView,
    pub allow_loss: bool,
    /// Processes of the command still running at the end (left running).
    pub left_running: Vec<u32>,
    pub warnings: Vec<String>,
}

/// Accumulates the in-scope events of a run.
#[derive(Debug, Default)]
pub struct Checker {
    obs: Observed,
    seen: HashSet<SockKey>,
    retrans: [u64; 4],
    retrans_by_sock: HashMap<SockKey, (SocketAddr, SocketAddr, Option<Owner>, [u32; 4])>,
    resets: Vec<String>,
    overflows: BTreeMap<(u32, SocketAddr), ListenerOverflow>,
    tw_live: HashSet<SockKey>,
    close_wait: HashMap<SockKey, Open>,
    syn_sent: HashMap<SockKey, Open>,
    cw_done: Vec<Dwell>,
    ss_done: Vec<Dwell>,
}

fn kind_index(k: RetransmitKind) -> usize {
    match k {
        RetransmitKind::Syn => 0,
        RetransmitKind::SynAck => 1,
        RetransmitKind::Data => 2,
        RetransmitKind::Fin => 3,
    }
}

const KINDS: [RetransmitKind; 4] = [
    RetransmitKind::Syn,
    RetransmitKind::SynAck,
    RetransmitKind::Data,
    RetransmitKind::Fin,
];

fn owner_view(o: &Option<Owner>) -> Option<OwnerView> {
    o.as_ref().map(OwnerView::from)
}

fn who(o: &Option<Owner>) -> String {
    who_view(&owner_view(o))
}

fn who_view(o: &Option<OwnerView>) -> String {
    match o {
        Some(o) => format!("{}/{}", o.pid, o.comm),
        None => "owner unknown".into(),
    }
}

fn dwell(o: &Open, end_ns: u64, ongoing: bool, syn: bool) -> Dwell {
    Dwell {
        local: o.local.to_string(),
        remote: o.remote.to_string(),
        owner: owner_view(&o.owner),
        ms: end_ns.saturating_sub(o.since_ns) as f64 / 1e6,
        ongoing,
        syn_retransmits: syn.then_some(o.syn_retransmits),
    }
}

/// Keeps the `EXAMPLES` longest.
fn keep_longest(v: &mut Vec<Dwell>) {
    v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    v.truncate(EXAMPLES);
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    pub fn apply(&mut self, e: &Event) {
        if matches!(e.kind, EventKind::TwTimer { .. }) {
            return;
        }
        self.obs.events += 1;
        let key = (e.netns, e.skaddr);
        if !matches!(e.kind, EventKind::Overflow { .. }) {
            self.seen.insert(key);
        }
        match e.kind {
            EventKind::State { old, new, .. } => self.state(e, key, old, new),
            // Attempts the kernel gave up before sending are no retransmits.
            EventKind::Retransmit { segs: 0, .. } => {}
            EventKind::Retransmit { kind, .. } => {
                self.retrans[kind_index(kind)] += 1;
                let s = self
                    .retrans_by_sock
                    .entry(key)
                    .or_insert((e.local, e.remote, e.owner, [0; 4]));
                s.3[kind_index(kind)] += 1;
                if kind == RetransmitKind::Syn
                    && let Some(o) = self.syn_sent.get_mut(&key)
                {
                    o.syn_retransmits += 1;
                }
            }
            EventKind::Reset { sent, state, .. } => {
                if sent {
                    self.obs.resets_sent += 1;
                } else {
                    self.obs.resets_received += 1;
                }
                if self.resets.len() < EXAMPLES {
                    self.resets.push(format!(
                        "{} {} -> {} ({}) in {}",
                        if sent { "sent" } else { "received" },
                        e.local,
                        e.remote,
                        who(&e.owner),
                        state.map_or("?", TcpState::name)
                    ));
                }
            }
            EventKind::SockError { errno } => {
                *self
                    .obs
                    .errors
                    .entry(super::system::errno_name(errno).to_string())
                    .or_default() += 1;
            }
            EventKind::TimeWait { enter, .. } => {
                if enter {
                    self.obs.time_wait_entered += 1;
                    self.tw_live.insert(key);
                    self.obs.time_wait_peak =
                        self.obs.time_wait_peak.max(self.tw_live.len() as u64);
                } else {
                    self.tw_live.remove(&key);
                }
            }
            EventKind::TimeWaitRearm { .. } | EventKind::TwTimer { .. } => {}
            EventKind::Overflow {
                queue,
                len,
                max,
                count,
                action,
                ..
            } => {
                let o =
                    self.overflows
                        .entry((e.netns, e.local))
                        .or_insert_with(|| ListenerOverflow {
                            netns: e.netns,
                            listener: e.local.to_string(),
                            owner: owner_view(&e.owner),
                            queue: queue.name(),
                            action: action.name(),
                            count: 0,
                            len: None,
                            max: None,
                        });
                o.count += count;
                // The latest cause wins: a listener that first overflowed its SYN queue and
                // then its accept queue shows the accept queue.
                o.queue = queue.name();
                o.action = action.name();
                o.len = len.or(o.len);
                o.max = max.or(o.max);
            }
        }
    }

    fn state(&mut self, e: &Event, key: SockKey, old: TcpState, new: TcpState) {
        let open = || Open {
            since_ns: e.ts_ns,
            local: e.local,
            remote: e.remote,
            owner: e.owner,
            syn_retransmits: 0,
        };
        if old == TcpState::SynSent
            && let Some(mut o) = self.syn_sent.remove(&key)
        {
            // The port is known only once connect() picked it.
            o.local = e.local;
            o.owner = e.owner.or(o.owner);
            self.ss_done.push(dwell(&o, e.ts_ns, false, true));
            if self.ss_done.len() > 4 * EXAMPLES {
                keep_longest(&mut self.ss_done);
            }
        }
        if old == TcpState::CloseWait
            && let Some(o) = self.close_wait.remove(&key)
        {
            self.cw_done.push(dwell(&o, e.ts_ns, false, false));
            if self.cw_done.len() > 4 * EXAMPLES {
                keep_longest(&mut self.cw_done);
            }
        }
        match new {
            TcpState::SynSent => {
                self.syn_sent.insert(key, open());
            }
            TcpState::CloseWait => {
                self.close_wait.insert(key, open());
            }
            _ => {}
        }
    }

    /// Ends the run at `now_ns` and judges it.
    pub fn finish(mut self, limits: &Limits, now_ns: u64) -> (Observed, Vec<Assertion>) {
        let mut cw = std::mem::take(&mut self.cw_done);
        cw.extend(
            self.close_wait
                .values()
                .map(|o| dwell(o, now_ns, true, false)),
        );
        keep_longest(&mut cw);
        let mut ss = std::mem::take(&mut self.ss_done);
        ss.extend(self.syn_sent.values().map(|o| dwell(o, now_ns, true, true)));
        keep_longest(&mut ss);
        let mut obs = std::mem::take(&mut self.obs);
        obs.sockets = self.seen.len() as u64;
        for k in KINDS {
            obs.retransmits
                .insert(k.name(), self.retrans[kind_index(k)]);
        }
        obs.overflows = self.overflows.values().cloned().collect();
        obs.overflows.sort_by_key(|o| std::cmp::Reverse(o.count));
        obs.close_wait_longest = cw;
        obs.syn_sent_longest = ss;

        let mut out = Vec::new();
        for &(kind, max) in &limits.retransmits {
            let (n, name) = match kind {
                Some(k) => (
                    self.retrans[kind_index(k)],
                    format!("--max-retransmits {}={max}", k.name()),
                ),
                None => (
                    self.retrans.iter().sum(),
                    format!("--max-retransmits {max}"),
                ),
            };
            let mut worst: Vec<_> = self
                .retrans_by_sock
                .values()
                .map(|(l, r, o, by)| {
                    let c = match kind {
                        Some(k) => by[kind_index(k)],
                        None => by.iter().sum(),
                    };
                    (c, l, r, o)
                })
                .filter(|w| w.0 > 0)
                .collect();
            worst.sort_by_key(|w| std::cmp::Reverse(w.0));
            out.push(Assertion {
                findings: match kind {
                    Some(RetransmitKind::Syn) => vec![FindingId::SynSentStuck],
                    Some(RetransmitKind::SynAck) => vec![FindingId::SynQueueOverflow],
                    Some(RetransmitKind::Data | RetransmitKind::Fin) => {
                        vec![FindingId::RetransmitStorm, FindingId::DataRetransmits]
                    }
                    None => vec![
                        FindingId::SynSentStuck,
                        FindingId::RetransmitStorm,
                        FindingId::DataRetransmits,
                    ],
                },
                governed_by: Vec::new(),
                name,
                limit: format!("at most {max}"),
                observed: match kind {
                    Some(_) => n.to_string(),
                    None => KINDS
                        .iter()
                        .map(|k| format!("{} {}", k.name(), self.retrans[kind_index(*k)]))
                        .collect::<Vec<_>>()
                        .join(", "),
                },
                passed: n <= max,
                details: if n <= max {
                    vec![]
                } else {
                    worst
                        .iter()
                        .take(EXAMPLES)
                        .map(|(c, l, r, o)| format!("{c} retransmit(s) on {l} -> {r} ({})", who(o)))
                        .collect()
                },
            });
        }
        if limits.no_listen_overflow {
            let n: u64 = obs.overflows.iter().map(|o| o.count).sum();
            out.push(Assertion {
                findings: vec![FindingId::AcceptQueueOverflow, FindingId::SynQueueOverflow],
                governed_by: Vec::new(),
                name: "--no-listen-overflow".into(),
                limit: "none".into(),
                observed: n.to_string(),
                passed: n == 0,
                details: obs
                    .overflows
                    .iter()
                    .take(EXAMPLES)
                    .map(|o| {
                        let q = match (o.len, o.max) {
                            (Some(l), Some(m)) => format!(" (queue {l}/{m})"),
                            _ => String::new(),
                        };
                        format!(
                            "listener {} ({}): {} {} queue overflow(s){q}, {}",
                            o.listener,
                            who_view(&o.owner),
                            o.count,
                            o.queue,
                            o.action
                        )
                    })
                    .collect(),
            });
        }
        if let Some(max) = limits.max_resets {
            let n = obs.resets_sent + obs.resets_received;
            out.push(Assertion {
                findings: vec![
                    FindingId::ResetOnClose,
                    FindingId::AbortiveClose,
                    FindingId::ConnectRefused,
                    FindingId::PeerResets,
                ],
                governed_by: Vec::new(),
                name: format!("--max-resets {max}"),
                limit: format!("at most {max}"),
                observed: format!(
                    "{n} ({} sent, {} received)",
                    obs.resets_sent, obs.resets_received
                ),
                passed: n <= max,
                details: if n <= max {
                    vec![]
                } else {
                    self.resets.clone()
                },
            });
        }
        if let Some(max) = limits.max_time_wait {
            let n = obs.time_wait_peak;
            out.push(Assertion {
                findings: vec![
                    FindingId::EphemeralPortPressure,
                    FindingId::TimeWaitBucketOverflow,
                ],
                governed_by: Vec::new(),
                name: format!("--max-time-wait {max}"),
                limit: format!("at most {max} at once"),
                observed: format!("peak {n} ({} entered)", obs.time_wait_entered),
                passed: n <= max,
                details: vec![],
            });
        }
        if let Some(limit) = limits.close_wait_leak_ns {
            let bad: Vec<&Dwell> = obs
                .close_wait_longest
                .iter()
                .filter(|d| d.ms * 1e6 >= limit as f64)
                .collect();
            out.push(Assertion {
                findings: vec![FindingId::CloseWaitLeak],
                governed_by: Vec::new(),
                name: format!("--close-wait-leak {}", fmt_secs(limit)),
                limit: format!("no socket in CLOSE_WAIT for {} s or more", fmt_secs(limit)),
                observed: match obs.close_wait_longest.first() {
                    Some(d) => format!("longest {:.1} s", d.ms / 1e3),
                    None => "none".into(),
                },
                passed: bad.is_empty(),
                details: bad
                    .iter()
                    .map(|d| {
                        format!(
                            "{} -> {} ({}) {:.1} s in CLOSE_WAIT: the peer closed, {}",
                            d.local,
                            d.remote,
                            who_view(&d.owner),
                            d.ms / 1e3,
                            if d.ongoing {
                                "the application has not called close()"
                            } else {
                                "the application was that slow to call close()"
                            }
                        )
                    })
                    .collect(),
            });
        }
        if let Some(limit) = limits.max_syn_sent_ns {
            let bad: Vec<&Dwell> = obs
                .syn_sent_longest
                .iter()
                .filter(|d| d.ms * 1e6 > limit as f64)
                .collect();
            out.push(Assertion {
                findings: vec![FindingId::SynSentStuck],
                governed_by: Vec::new(),
                name: format!("--max-syn-sent-ms {}", limit / 1_000_000),
                limit: format!("every connect out of SYN_SENT within {} ms", limit / 1_000_000),
                observed: match obs.syn_sent_longest.first() {
                    Some(d) => format!("longest {:.2} ms", d.ms),
                    None => "no connects".into(),
                },
                passed: bad.is_empty(),
                details: bad
                    .iter()
                    .map(|d| {
                        format!(
                            "connect {} -> {} ({}) {:.1} ms in SYN_SENT with {} SYN retransmit(s){}",
                            d.local,
                            d.remote,
                            who_view(&d.owner),
                            d.ms,
                            d.syn_retransmits.unwrap_or(0),
                            if d.ongoing { ", still connecting" } else { "" }
                        )
                    })
                    .collect(),
            });
        }
        (obs, out)
    }
}

fn fmt_secs(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}
