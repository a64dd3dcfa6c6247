//! The catalogue proper: every finding's id and severity as enums (their names are part of
//! the JSON contract), its family, what it says in a line, and what governs it.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::event::OwnerView;

macro_rules! ids {
    ($($v:ident = $name:literal),* $(,)?) => {
        /// Every finding, by the id outputs print.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum FindingId { $($v),* }

        impl FindingId {
            pub const ALL: &'static [FindingId] = &[$(FindingId::$v),*];

            pub fn name(self) -> &'static str {
                match self { $(FindingId::$v => $name),* }
            }
        }
    };
}

ids! {
    CloseWaitLeak = "close_wait_leak",
    OrphanedFinWait2 = "orphaned_fin_wait2",
    SynSentStuck = "syn_sent_stuck",
    AcceptQueueOverflow = "accept_queue_overflow",
    AcceptQueueFull = "accept_queue_full",
    SynQueueOverflow = "syn_queue_overflow",
    EphemeralPortPressure = "ephemeral_port_pressure",
    TimeWaitBucketOverflow = "time_wait_bucket_overflow",
    RetransmitStorm = "retransmit_storm",
    DataRetransmits = "data_retransmits",
    KeepaliveAbort = "keepalive_abort",
    ResetOnClose = "reset_on_close",
    AbortiveClose = "abortive_close",
    ResetOnMemory = "reset_on_memory",
    ConnectRefused = "connect_refused",
    PeerResets = "peer_resets",
    ResetNoSocket = "reset_no_socket",
    EventsLost = "events_lost",
}

impl std::fmt::Display for FindingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for FindingId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for FindingId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        FindingId::ALL
            .iter()
            .copied()
            .find(|id| id.name() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown finding `{s}`")))
    }
}

impl PartialEq<&str> for FindingId {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Severity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Severity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown severity `{s}`")))
    }
}

/// The families of the catalogue, one module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Listener SYN and accept queues.
    Queues,
    /// How connections end: CLOSE_WAIT, FIN_WAIT2.
    Lifecycle,
    /// SYN, data and keepalive retransmissions and the aborts they end in.
    Retransmits,
    /// Resets sent and received, by cause.
    Resets,
    /// Ports, timewait buckets, and tcpwatch's own event loss.
    Resources,
}

/// What governs a finding.
#[derive(Clone, Copy, Debug)]
pub enum Gov {
    /// A per-namespace sysctl, quoted with its value in the finding's namespace.
    Sysctl(&'static str),
    /// A host-wide sysctl (only the initial namespace has it).
    HostSysctl(&'static str),
    /// A sysctl shown under a label of its own.
    Labeled(&'static str, &'static str),
    /// Application (or tcpwatch) code and settings.
    Code(&'static str),
}

/// One entry of the catalogue.
pub struct Entry {
    pub id: FindingId,
    pub family: Family,
    /// The severities it can have.
    pub severities: &'static [Severity],
    /// What it says, in a line (the README's table).
    pub summary: &'static str,
    pub governed_by: &'static [Gov],
}

use Gov::{Code, HostSysctl, Labeled, Sysctl};

/// Every finding, in the order outputs list them.
pub const CATALOGUE: &[Entry] = &[
    Entry {
        id: FindingId::CloseWaitLeak,
        family: Family::Lifecycle,
        severities: &[Severity::Warning],
        summary: "CLOSE_WAIT idle past the threshold, by owner: the application never called close()",
        governed_by: &[
            Code("application code: close() after read() returns 0"),
            Sysctl("net.ipv4.tcp_keepalive_time"),
        ],
    },
    Entry {
        id: FindingId::OrphanedFinWait2,
        family: Family::Lifecycle,
        severities: &[Severity::Info],
        summary: "closed sockets waiting for the peer's FIN",
        governed_by: &[Sysctl("net.ipv4.tcp_fin_timeout")],
    },
    Entry {
        id: FindingId::SynSentStuck,
        family: Family::Retransmits,
        severities: &[Severity::Warning],
        summary: "connects retransmitting SYNs; names the local listener when it is the one refusing them",
        governed_by: &[
            Sysctl("net.ipv4.tcp_syn_retries"),
            Sysctl("net.ipv4.tcp_syn_linear_timeouts"),
        ],
    },
    Entry {
        id: FindingId::AcceptQueueOverflow,
        family: Family::Queues,
        severities: &[Severity::Critical],
        summary: "a listener's accept queue full (limit = min(backlog, somaxconn)) and what the kernel then did",
        governed_by: &[
            Code("listen() backlog in the application"),
            Sysctl("net.core.somaxconn"),
            Sysctl("net.ipv4.tcp_abort_on_overflow"),
        ],
    },
    Entry {
        id: FindingId::AcceptQueueFull,
        family: Family::Queues,
        severities: &[Severity::Warning, Severity::Critical],
        summary: "a listener's accept queue is over its limit right now, no overflow seen in the window",
        governed_by: &[
            Code("listen() backlog in the application"),
            Sysctl("net.core.somaxconn"),
            Sysctl("net.ipv4.tcp_abort_on_overflow"),
        ],
    },
    Entry {
        id: FindingId::SynQueueOverflow,
        family: Family::Queues,
        severities: &[Severity::Warning, Severity::Critical],
        summary: "SYNs answered with cookies, or dropped",
        governed_by: &[
            Sysctl("net.ipv4.tcp_syncookies"),
            Sysctl("net.ipv4.tcp_max_syn_backlog"),
            Sysctl("net.core.somaxconn"),
        ],
    },
    Entry {
        id: FindingId::EphemeralPortPressure,
        family: Family::Resources,
        severities: &[Severity::Warning, Severity::Critical],
        summary: "a destination using most of the local port range",
        governed_by: &[
            Sysctl("net.ipv4.ip_local_port_range"),
            Labeled(
                "net.ipv4.tcp_tw_reuse (helps connecting clients only)",
                "net.ipv4.tcp_tw_reuse",
            ),
            Sysctl("net.ipv4.tcp_max_tw_buckets"),
        ],
    },
    Entry {
        id: FindingId::TimeWaitBucketOverflow,
        family: Family::Resources,
        severities: &[Severity::Warning],
        summary: "sockets closed without TIME_WAIT (table full)",
        governed_by: &[Sysctl("net.ipv4.tcp_max_tw_buckets")],
    },
    Entry {
        id: FindingId::RetransmitStorm,
        family: Family::Retransmits,
        severities: &[Severity::Warning, Severity::Critical],
        summary: "RTO timeouts in a row without progress, aborts with ETIMEDOUT",
        governed_by: &[Sysctl("net.ipv4.tcp_retries2")],
    },
    Entry {
        id: FindingId::DataRetransmits,
        family: Family::Retransmits,
        severities: &[Severity::Info],
        summary: "loss the connections recovered from",
        governed_by: &[Sysctl("net.ipv4.tcp_congestion_control")],
    },
    Entry {
        id: FindingId::KeepaliveAbort,
        family: Family::Retransmits,
        severities: &[Severity::Warning],
        summary: "idle connections aborted by unanswered keepalive probes",
        governed_by: &[
            Sysctl("net.ipv4.tcp_keepalive_time"),
            Sysctl("net.ipv4.tcp_keepalive_intvl"),
            Sysctl("net.ipv4.tcp_keepalive_probes"),
            Code("SO_KEEPALIVE / TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT in the application"),
        ],
    },
    Entry {
        id: FindingId::ResetOnClose,
        family: Family::Resets,
        severities: &[Severity::Warning],
        summary: "RST because the application closed with received data unread (TCPAbortOnClose)",
        governed_by: &[Code(
            "the application: read to EOF (or shutdown(SHUT_WR) and drain) before close()",
        )],
    },
    Entry {
        id: FindingId::AbortiveClose,
        family: Family::Resets,
        severities: &[Severity::Info],
        summary: "RST from a zero-SO_LINGER close or data after close (TCPAbortOnData)",
        governed_by: &[Code(
            "the application: SO_LINGER {on, 0}, or its shutdown order",
        )],
    },
    Entry {
        id: FindingId::ResetOnMemory,
        family: Family::Resets,
        severities: &[Severity::Critical],
        summary: "RST for lack of memory: too many orphans or tcp_mem (TCPAbortOnMemory)",
        governed_by: &[
            HostSysctl("net.ipv4.tcp_max_orphans"),
            HostSysctl("net.ipv4.tcp_mem"),
            Sysctl("net.ipv4.tcp_orphan_retries"),
        ],
    },
    Entry {
        id: FindingId::ConnectRefused,
        family: Family::Resets,
        severities: &[Severity::Warning],
        summary: "connects answered with RST",
        governed_by: &[Code("a listener at the destination")],
    },
    Entry {
        id: FindingId::PeerResets,
        family: Family::Resets,
        severities: &[Severity::Info],
        summary: "connections reset by the peer or a middlebox",
        governed_by: &[
            Code("the peer's application"),
            Sysctl("net.ipv4.tcp_keepalive_time"),
        ],
    },
    Entry {
        id: FindingId::ResetNoSocket,
        family: Family::Resets,
        severities: &[Severity::Info],
        summary: "segments this host reset because no socket matched them",
        governed_by: &[Code("a listener on that port")],
    },
    Entry {
        id: FindingId::EventsLost,
        family: Family::Resources,
        severities: &[Severity::Warning],
        summary: "events lost (counts in `loss`)",
        governed_by: &[Code("tcpwatch --ring-mib")],
    },
];

impl FindingId {
    pub fn entry(self) -> &'static Entry {
        CATALOGUE
            .iter()
            .find(|e| e.id == self)
            .expect("every id has a catalogue entry (tested)")
    }
}

/// A sysctl or piece of code that governs a finding, with the sysctl's value where known.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Governor {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Finding {
    pub id: FindingId,
    pub severity: Severity,
    pub netns: u32,
    pub what: String,
    pub cause: String,
    pub governed_by: Vec<Governor>,
    pub owner: Option<OwnerView>,
    pub count: u64,
    /// A few sockets or listeners it is about (`local -> remote`).
    pub examples: Vec<String>,
}

/// The README's table of findings, made from the catalogue.
pub fn markdown_table() -> String {
    let mut t =
        String::from("| finding | severity | what it says | governed by |\n|---|---|---|---|\n");
    for e in CATALOGUE {
        let sev: Vec<&str> = e.severities.iter().map(|s| s.name()).collect();
        let gov: Vec<String> = e
            .governed_by
            .iter()
            .map(|g| match *g {
                Sysctl(n) | HostSysctl(n) | Labeled(_, n) => format!(
                    "`{}`",
                    n.trim_start_matches("net.ipv4.")
                        .trim_start_matches("net.core.")
                ),
                Code(what) => what.to_string(),
            })
            .collect();
        t.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            e.id,
            sev.join(" / "),
            e.summary,
            gov.join(", ")
        ));
    }
    t
}

/// The governors of several findings (an assertion of `check` relates to a few), each once,
/// quoted with their values in `sysctls`.
pub fn governors_of(ids: &[FindingId], sysctls: &BTreeMap<String, String>) -> Vec<Governor> {
    let mut out: Vec<Governor> = Vec::new();
    for g in ids.iter().flat_map(|id| id.entry().governed_by) {
        let (name, value) = match *g {
            Sysctl(n) | HostSysctl(n) => (n, sysctls.get(n).cloned()),
            Labeled(label, n) => (label, sysctls.get(n).cloned()),
            Code(what) => (what, None),
        };
        if !out.iter().any(|o| o.name == name) {
            out.push(Governor {
                name: name.to_string(),
                value,
            });
        }
    }
    out
}
