//! `tcpwatch serve`'s exposition: the snapshot in the Prometheus text format (0.0.4), with
//! label cardinality bounded: states and kinds are fixed sets, listeners are the top N by
//! trouble with the gauges of the rest summed into `addr="other"`, TIME_WAIT the top 10 plus "other".
use std::fmt::Write as _;

use crate::model::snapshot::{ListenerView, Snapshot};

/// What the exposition adds to the snapshot.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Events read since start.
    pub events: u64,
    /// Time the last snapshot took to build, seconds.
    pub build_seconds: f64,
    /// Listeners exposed one by one; the rest go into `addr="other"`.
    pub max_listeners: usize,
}

pub const STATES: [&str; 11] = [
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
];

/// Label values: backslash, quote and newline escaped, as the format requires.
fn esc(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct W {
    out: String,
}

impl W {
    /// A gauge family of the first 10 rows (largest first, as given) and one `other` series
    /// for what is left of `total`.
    fn top_with_other<'a>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl Iterator<Item = (Vec<(&'a str, String)>, u64)>,
        total: u64,
        other: &[(&str, String)],
    ) {
        self.head(name, "gauge", help);
        let mut left = total;
        for (labels, n) in rows.take(10) {
            left = left.saturating_sub(n);
            self.sample(name, &labels, n as f64);
        }
        self.sample(name, other, left as f64);
    }

    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", esc(val));
            }
            self.out.push('}');
        }
        if v.fract() == 0.0 && v.abs() < 1e15 {
            let _ = writeln!(self.out, " {}", v as i64);
        } else {
            let _ = writeln!(self.out, " {v}");
        }
    }
}

/// How much trouble a listener is in: what decides which ones get their own series.
fn trouble(l: &ListenerView) -> (u64, u64, u32) {
    (
        l.overflows.accept + l.overflows.syn + l.overflows.syncookies,
        l.drops,
        l.accept_queue.peak.max(l.syn_queue.peak),
    )
}

fn listener_labels(l: &ListenerView) -> Vec<(&'static str, String)> {
    vec![
        ("netns", l.netns.to_string()),
        ("addr", l.addr.clone()),
        ("port", l.port.to_string()),
        (
            "owner",
            l.owner.as_ref().map_or(String::new(), |o| o.comm.clone()),
        ),
    ]
}

/// The daemon's record and API, appended to the exposition.
pub fn render_record(
    r: &crate::model::api::RecordSpan,
    subscribers: usize,
    now_wall_ns: i64,
) -> String {
    let mut w = W {
        out: String::with_capacity(2048),
    };
    w.head(
        "tcpwatch_record_bytes",
        "gauge",
        "Bytes the flight recorder uses on disk.",
    );
    w.sample("tcpwatch_record_bytes", &[], r.bytes as f64);
    w.head(
        "tcpwatch_record_bound_bytes",
        "gauge",
        "The flight recorder's bound (--history-mib).",
    );
    w.sample("tcpwatch_record_bound_bytes", &[], r.bound_bytes as f64);
    w.head(
        "tcpwatch_record_pruned_total",
        "counter",
        "Rows the flight recorder deleted to stay inside its bound, by table.",
    );
    for (t, n) in [
        ("events", r.pruned.events),
        ("signals", r.pruned.signals),
        ("timelines", r.pruned.timelines),
        ("frames", r.pruned.frames),
    ] {
        w.sample(
            "tcpwatch_record_pruned_total",
            &[("table", t.to_string())],
            n as f64,
        );
    }
    w.head(
        "tcpwatch_record_dropped_total",
        "counter",
        "Records that never reached the disk (past the plain-event rate, the recorder behind, or a write failed).",
    );
    w.sample("tcpwatch_record_dropped_total", &[], r.dropped as f64);
    w.head(
        "tcpwatch_record_span_seconds",
        "gauge",
        "How far back the record reaches, by kind.",
    );
    for (k, from) in [
        ("events", r.events_from_wall_ns),
        ("signals", r.signals_from_wall_ns),
        ("timelines", r.timelines_from_wall_ns),
        ("frames", r.frames_from_wall_ns),
    ] {
        let age = from.map_or(0.0, |f| (now_wall_ns.saturating_sub(f)).max(0) as f64 / 1e9);
        w.sample(
            "tcpwatch_record_span_seconds",
            &[("kind", k.to_string())],
            age,
        );
    }
    w.head(
        "tcpwatch_api_subscribers",
        "gauge",
        "Clients following the event stream.",
    );
    w.sample("tcpwatch_api_subscribers", &[], subscribers as f64);
    w.out
}

pub fn render(s: &Snapshot, x: &Extras) -> String {
    let mut w = W {
        out: String::with_capacity(16 * 1024),
    };
    w.head(
        "tcpwatch_build_info",
        "gauge",
        "tcpwatch's version and the kernel it observes.",
    );
    w.sample(
        "tcpwatch_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("kernel", s.kernel.clone()),
        ],
        1.0,
    );
    w.head(
        "tcpwatch_hook_active",
        "gauge",
        "1 when a kernel hook serves the signal, 0 when the signal is unavailable on this kernel.",
    );
    for h in &s.hooks {
        w.sample(
            "tcpwatch_hook_active",
            &[("signal", h.signal.clone())],
            if h.hook.is_some() { 1.0 } else { 0.0 },
        );
    }

    w.head(
        "tcpwatch_sockets",
        "gauge",
        "TCP sockets per state, as ss -tan counts them (TIME_WAIT included).",
    );
    for st in STATES {
        let n = s.states.get(st).copied().unwrap_or(0);
        w.sample("tcpwatch_sockets", &[("state", st.to_string())], n as f64);
    }

    // Listeners: one series per address (SO_REUSEPORT groups merged), the most troubled
    // first; the gauges of the rest summed.
    let merged = merge_reuseport(&s.listeners);
    let mut ls: Vec<&ListenerView> = merged.iter().collect();
    ls.sort_by(|a, b| {
        trouble(b)
            .cmp(&trouble(a))
            .then((a.netns, a.port, &a.addr).cmp(&(b.netns, b.port, &b.addr)))
    });
    let shown = ls.len().min(x.max_listeners);
    let (top, rest) = ls.split_at(shown);
    type Field = fn(&ListenerView) -> u64;
    let gauges: [(&str, &str, Field); 5] = [
        (
            "tcpwatch_listener_accept_queue",
            "Accept queue length now (the kernel holds max + 1).",
            |l| l.accept_queue.now as u64,
        ),
        (
            "tcpwatch_listener_accept_queue_max",
            "Accept queue limit: min(listen() backlog, net.core.somaxconn).",
            |l| l.accept_queue.max as u64,
        ),
        (
            "tcpwatch_listener_accept_queue_peak",
            "Highest accept queue length since the previous scrape.",
            |l| l.accept_queue.peak as u64,
        ),
        (
            "tcpwatch_listener_syn_queue",
            "SYN queue length now (request sockets).",
            |l| l.syn_queue.now as u64,
        ),
        (
            "tcpwatch_listener_syn_queue_peak",
            "Highest SYN queue length since the previous scrape.",
            |l| l.syn_queue.peak as u64,
        ),
    ];
    for (name, help, f) in gauges {
        w.head(name, "gauge", help);
        for l in top {
            w.sample(name, &listener_labels(l), f(l) as f64);
        }
        if !rest.is_empty() {
            let v = if name.ends_with("_max") {
                rest.iter().map(|l| f(l)).max().unwrap_or(0)
            } else {
                rest.iter().map(|l| f(l)).sum()
            };
            w.sample(name, &other_labels(), v as f64);
        }
    }
    let counters: [(&str, &str, Field); 3] = [
        (
            "tcpwatch_listener_drops_total",
            "The listener's own drop counter since it was created, as ss -tlm shows it (a final-ACK overflow counts twice; the overflow series count it once).",
            |l| l.drops,
        ),
        (
            "tcpwatch_listener_synack_retransmits_total",
            "SYN-ACK retransmits of the listener's requests.",
            |l| l.synack_retransmits,
        ),
        (
            "tcpwatch_listener_syncookies_total",
            "SYNs answered with syncookies because the SYN queue was full.",
            |l| l.overflows.syncookies,
        ),
    ];
    // Counters get no "other" series: its members change from scrape to scrape, so a sum
    // would go down, which Prometheus reads as a reset.
    for (name, help, f) in counters {
        w.head(name, "counter", help);
        for l in top {
            w.sample(name, &listener_labels(l), f(l) as f64);
        }
    }
    let name = "tcpwatch_listener_overflows_total";
    w.head(
        name,
        "counter",
        "Handshake packets (SYNs, final ACKs) the listener dropped because its accept or SYN queue was full, as TcpExt:ListenDrops counts them.",
    );
    for (q, f) in [
        ("accept", (|l: &ListenerView| l.overflows.accept) as Field),
        ("syn", |l| l.overflows.syn),
    ] {
        for l in top {
            let mut lb = listener_labels(l);
            lb.push(("queue", q.to_string()));
            w.sample(name, &lb, f(l) as f64);
        }
    }
    w.head(
        "tcpwatch_listeners",
        "gauge",
        "Listening addresses watched (SO_REUSEPORT groups count once), also those beyond --max-listeners.",
    );
    w.sample("tcpwatch_listeners", &[], merged.len() as f64);

    w.head(
        "tcpwatch_retransmits_total",
        "counter",
        "Retransmissions the kernel made, by kind.",
    );
    for k in ["syn", "synack", "data", "fin"] {
        w.sample(
            "tcpwatch_retransmits_total",
            &[("kind", k.to_string())],
            s.retransmits.get(k).copied().unwrap_or(0) as f64,
        );
    }
    w.head(
        "tcpwatch_retransmitted_segments_total",
        "counter",
        "Segments those retransmissions carried (the kernel's Tcp RetransSegs counts these).",
    );
    w.sample(
        "tcpwatch_retransmitted_segments_total",
        &[],
        s.retransmitted_segments as f64,
    );
    w.head(
        "tcpwatch_retransmit_attempts_not_sent_total",
        "counter",
        "Retransmit attempts the kernel gave up before sending (e.g. the packet still queued in the host).",
    );
    w.sample(
        "tcpwatch_retransmit_attempts_not_sent_total",
        &[],
        s.retransmits_not_sent as f64,
    );
    w.head(
        "tcpwatch_resets_total",
        "counter",
        "RST segments by direction.",
    );
    for d in ["sent", "received"] {
        w.sample(
            "tcpwatch_resets_total",
            &[("direction", d.to_string())],
            s.resets.get(d).copied().unwrap_or(0) as f64,
        );
    }
    w.head(
        "tcpwatch_socket_errors_total",
        "counter",
        "Errors reported on sockets, by errno name.",
    );
    for (e, n) in &s.errors {
        w.sample(
            "tcpwatch_socket_errors_total",
            &[("errno", e.to_string())],
            *n as f64,
        );
    }

    let tw = &s.time_wait;
    let by_port = tw.by_local_port.iter().map(|p| {
        let labels = vec![("netns", p.netns.to_string()), ("port", p.port.to_string())];
        (labels, p.count)
    });
    w.top_with_other(
        "tcpwatch_time_wait_by_local_port",
        "TIME_WAIT sockets by local port: the top 10, the rest as port=\"other\".",
        by_port,
        tw.total,
        &[("netns", String::new()), ("port", "other".into())],
    );
    let by_remote = tw.by_remote.iter().map(|r| {
        let labels = vec![
            ("netns", r.netns.to_string()),
            ("addr", r.addr.clone()),
            ("port", r.port.to_string()),
        ];
        (labels, r.count)
    });
    w.top_with_other(
        "tcpwatch_time_wait_by_remote",
        "TIME_WAIT sockets by remote endpoint: the top 10, the rest as addr=\"other\".",
        by_remote,
        tw.total,
        &[
            ("netns", String::new()),
            ("addr", "other".into()),
            ("port", String::new()),
        ],
    );
    w.head(
        "tcpwatch_time_wait_entered_total",
        "counter",
        "Sockets that entered TIME_WAIT (or its FIN_WAIT2 substate).",
    );
    w.sample("tcpwatch_time_wait_entered_total", &[], tw.entered as f64);
    w.head(
        "tcpwatch_time_wait_exited_total",
        "counter",
        "TIME_WAIT sockets that ended, by reason.",
    );
    for r in ["expired", "reused", "killed"] {
        w.sample(
            "tcpwatch_time_wait_exited_total",
            &[("reason", r.to_string())],
            tw.exited.get(r).copied().unwrap_or(0) as f64,
        );
    }
    w.head("tcpwatch_time_wait_drift", "gauge", "/proc/net/sockstat tw minus the TIME_WAIT sockets tcpwatch tracks, per namespace (health: 0).");
    for d in &tw.drift {
        w.sample(
            "tcpwatch_time_wait_drift",
            &[("netns", d.netns.to_string())],
            d.sockstat as f64 - d.tracked as f64,
        );
    }

    // Host-wide: every namespace's sockstat shows the same figure.
    if let Some(n) = s.namespaces.first() {
        w.head(
            "tcpwatch_orphan_sockets",
            "gauge",
            "Orphaned TCP sockets (closed by their application, still in the kernel), host-wide; the kernel resets beyond net.ipv4.tcp_max_orphans.",
        );
        w.sample("tcpwatch_orphan_sockets", &[], n.sockstat_orphan as f64);
    }

    w.head("tcpwatch_findings", "gauge", "Findings firing now, by id and severity (see tcpwatch snapshot for the cause and the sysctl).");
    let mut f: std::collections::BTreeMap<(&str, &str), u64> = std::collections::BTreeMap::new();
    for x in &s.findings {
        *f.entry((x.id.name(), x.severity.name())).or_default() += 1;
    }
    for ((id, sev), n) in f {
        w.sample(
            "tcpwatch_findings",
            &[("id", id.to_string()), ("severity", sev.to_string())],
            n as f64,
        );
    }

    w.head("tcpwatch_events_total", "counter", "Kernel events read.");
    w.sample("tcpwatch_events_total", &[], x.events as f64);
    w.head(
        "tcpwatch_events_lost_total",
        "counter",
        "Events lost, by where: every one is counted.",
    );
    let l = &s.loss;
    for (wh, n) in [
        ("kernel_ring_full", l.kernel_dropped),
        ("kernel_skipped", l.kernel_skipped),
        ("userspace", l.channel_dropped),
        ("undecodable", l.decode_errors),
        ("recorder", l.recorder_dropped),
    ] {
        w.sample(
            "tcpwatch_events_lost_total",
            &[("where", wh.to_string())],
            n as f64,
        );
    }
    w.head(
        "tcpwatch_timelines_evicted_total",
        "counter",
        "Socket timelines evicted at the memory cap.",
    );
    w.sample(
        "tcpwatch_timelines_evicted_total",
        &[],
        l.timelines_evicted as f64,
    );
    w.head(
        "tcpwatch_snapshot_build_seconds",
        "gauge",
        "Time the last snapshot took to build.",
    );
    w.sample("tcpwatch_snapshot_build_seconds", &[], x.build_seconds);
    w.out
}

/// SO_REUSEPORT listeners share an address: one view each would give identical label sets
/// (Prometheus keeps one), and a socket cookie as a label would be unbounded churn. Queues,
/// drops, overflows and SYN-ACK retransmits are per socket and add up; the limit is the
/// largest.
fn merge_reuseport(ls: &[ListenerView]) -> Vec<ListenerView> {
    let mut out: Vec<ListenerView> = Vec::with_capacity(ls.len());
    let mut at: std::collections::HashMap<(u32, &str, u16), usize> =
        std::collections::HashMap::new();
    for l in ls {
        match at.get(&(l.netns, l.addr.as_str(), l.port)) {
            Some(&i) => {
                let m = &mut out[i];
                m.accept_queue.now += l.accept_queue.now;
                m.accept_queue.peak += l.accept_queue.peak;
                m.accept_queue.max = m.accept_queue.max.max(l.accept_queue.max);
                m.syn_queue.now += l.syn_queue.now;
                m.syn_queue.peak += l.syn_queue.peak;
                m.drops += l.drops;
                m.overflows.accept += l.overflows.accept;
                m.overflows.syn += l.overflows.syn;
                m.overflows.syncookies += l.overflows.syncookies;
                m.overflows.final_ack_packets += l.overflows.final_ack_packets;
                m.synack_retransmits += l.synack_retransmits;
                if m.owner.is_none() {
                    m.owner = l.owner.clone();
                }
            }
            None => {
                at.insert((l.netns, l.addr.as_str(), l.port), out.len());
                out.push(l.clone());
            }
        }
    }
    out
}

fn other_labels() -> Vec<(&'static str, String)> {
    vec![
        ("netns", String::new()),
        ("addr", "other".into()),
        ("port", String::new()),
        ("owner", String::new()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::{OverflowsView, OwnerView};
    use crate::testkit::overflowing_listener;

    fn listener(port: u16, drops: u64, accept_ovf: u64) -> ListenerView {
        ListenerView {
            // A comm the exposition must escape.
            owner: Some(OwnerView {
                pid: 42,
                comm: "we\"ird\\srv".into(),
            }),
            drops,
            overflows: OverflowsView {
                accept: accept_ovf,
                ..OverflowsView::default()
            },
            ..overflowing_listener(4026531840, port)
        }
    }

    fn snap() -> Snapshot {
        let mut s = Snapshot {
            version: 1,
            kernel: "6.18.0".into(),
            ..Default::default()
        };
        s.states.insert("TIME_WAIT".into(), 3000);
        s.states.insert("ESTABLISHED".into(), 12);
        s.namespaces.push(crate::model::snapshot::NamespaceView {
            netns: 4026531840,
            sockstat_tw: 3000,
            sockstat_inuse: 15,
            sockstat_orphan: 4,
            counters: Default::default(),
            sysctls: Default::default(),
        });
        s.listeners = vec![
            listener(8080, 24, 24),
            listener(9000, 0, 0),
            listener(9001, 5, 0),
        ];
        s
    }

    /// Every non-comment line: name{labels} value, with one HELP and TYPE before each family.
    fn check_format(text: &str) {
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let name = it.next().unwrap();
                assert!(typed.insert(name.to_string()), "TYPE twice for {name}");
                assert!(["gauge", "counter"].contains(&it.next().unwrap()));
                if name.ends_with("_total") {
                    assert!(rest.ends_with("counter"), "{name} must be a counter");
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap();
            assert!(typed.contains(name), "{name} has no TYPE line");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn exposition_lines() {
        let t = render(
            &snap(),
            &Extras {
                events: 77,
                build_seconds: 0.012,
                max_listeners: 100,
            },
        );
        check_format(&t);
        for want in [
            "tcpwatch_sockets{state=\"TIME_WAIT\"} 3000",
            "tcpwatch_sockets{state=\"SYN_SENT\"} 0",
            "tcpwatch_listener_overflows_total{netns=\"4026531840\",addr=\"127.0.0.1\",port=\"8080\",owner=\"we\\\"ird\\\\srv\",queue=\"accept\"} 24",
            "tcpwatch_listener_accept_queue_max{netns=\"4026531840\",addr=\"127.0.0.1\",port=\"8080\",owner=\"we\\\"ird\\\\srv\"} 2",
            "tcpwatch_retransmits_total{kind=\"syn\"} 0",
            "tcpwatch_events_total 77",
            "tcpwatch_snapshot_build_seconds 0.012",
            "tcpwatch_events_lost_total{where=\"kernel_ring_full\"} 0",
            "tcpwatch_listeners 3",
            "tcpwatch_orphan_sockets 4",
        ] {
            assert!(t.lines().any(|l| l == want), "missing {want}\n{t}");
        }
        assert!(
            !t.lines()
                .any(|l| l.starts_with("tcpwatch_listener_") && l.contains("addr=\"other\"")),
            "no other bucket when all fit"
        );
    }

    #[test]
    fn reuseport_groups_are_one_series() {
        let mut s = snap();
        s.listeners = vec![listener(8080, 24, 24), listener(8080, 6, 6)];
        let t = render(
            &s,
            &Extras {
                events: 0,
                build_seconds: 0.0,
                max_listeners: 100,
            },
        );
        check_format(&t);
        let lb =
            "{netns=\"4026531840\",addr=\"127.0.0.1\",port=\"8080\",owner=\"we\\\"ird\\\\srv\"}";
        let series = |name: &str| {
            t.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .count()
        };
        assert_eq!(series("tcpwatch_listener_drops_total"), 1, "{t}");
        assert!(
            t.lines()
                .any(|l| l == format!("tcpwatch_listener_drops_total{lb} 30")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l == format!("tcpwatch_listener_accept_queue{lb} 6")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l == format!("tcpwatch_listener_accept_queue_max{lb} 2")),
            "{t}"
        );
        assert!(t.lines().any(|l| l.starts_with("tcpwatch_listener_overflows_total{netns=\"4026531840\",addr=\"127.0.0.1\",port=\"8080\"") && l.ends_with("queue=\"accept\"} 30")), "{t}");
        assert!(t.lines().any(|l| l == "tcpwatch_listeners 1"), "{t}");
    }

    #[test]
    fn listeners_beyond_the_cap_are_summed() {
        let t = render(
            &snap(),
            &Extras {
                events: 0,
                build_seconds: 0.0,
                max_listeners: 1,
            },
        );
        check_format(&t);
        // The overflowing one keeps its series; the two others are summed.
        assert!(
            t.contains("port=\"8080\",owner=\"we\\\"ird\\\\srv\",queue=\"accept\"} 24"),
            "{t}"
        );
        assert!(!t.contains("port=\"9000\""));
        // Counters have no "other" series (its members change, a sum would go down).
        assert!(
            !t.lines()
                .any(|l| l.starts_with("tcpwatch_listener_drops_total{netns=\"\",addr=\"other\"")),
            "{t}"
        );
        assert!(
            !t.lines()
                .any(|l| l
                    .starts_with("tcpwatch_listener_overflows_total{netns=\"\",addr=\"other\"")),
            "{t}"
        );
        assert!(t.lines().any(|l| l == "tcpwatch_listener_accept_queue{netns=\"\",addr=\"other\",port=\"\",owner=\"\"} 6"), "{t}");
        assert!(t.lines().any(|l| l == "tcpwatch_listener_accept_queue_max{netns=\"\",addr=\"other\",port=\"\",owner=\"\"} 2"), "{t}");
    }
}
