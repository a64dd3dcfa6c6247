//! `tcpwatch snapshot`: the snapshot as readable tables, or as one JSON document.
use std::io::{self, Write};

use super::human_ns;
use crate::model::snapshot::{QueueView, Snapshot, endpoint};

/// A queue as a 10-cell bar of `now` against `max` (the kernel holds `max + 1`).
pub fn bar(q: &QueueView) -> String {
    bar_n(q, 10)
}

/// The same bar in `cells` cells.
pub fn bar_n(q: &QueueView, cells: usize) -> String {
    let filled = if q.max == 0 {
        0
    } else {
        ((q.now as usize * cells).div_ceil(q.max as usize)).min(cells)
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(cells - filled))
}

pub fn write_json<W: Write>(mut w: W, s: &Snapshot) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut w, s).map_err(io::Error::other)?;
    writeln!(w)
}

/// The snapshot of a past window, with what it was made of (`history`).
pub fn write_json_with_history<W: Write>(
    mut w: W,
    s: &Snapshot,
    h: &crate::model::api::History,
) -> io::Result<()> {
    let mut v = serde_json::to_value(s).map_err(io::Error::other)?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "history".into(),
            serde_json::to_value(h).map_err(io::Error::other)?,
        );
    }
    serde_json::to_writer_pretty(&mut w, &v).map_err(io::Error::other)?;
    writeln!(w)
}

fn owner(o: &Option<crate::model::snapshot::OwnerView>) -> String {
    o.as_ref()
        .map_or("?".into(), |o| format!("{}/{}", o.pid, o.comm))
}

/// `name = value; code; ...`: what governs a finding, sysctls with their values.
pub fn governors(g: &[crate::model::findings::Governor]) -> String {
    let v: Vec<String> = g
        .iter()
        .map(|g| match &g.value {
            Some(v) => format!("{} = {v}", g.name),
            None => g.name.clone(),
        })
        .collect();
    v.join("; ")
}

/// One finding: what, cause, governing sysctls with their values, examples.
pub fn write_finding<W: Write>(w: &mut W, f: &crate::model::findings::Finding) -> io::Result<()> {
    writeln!(w, "  [{}] {}: {}", f.severity, f.id, f.what)?;
    writeln!(w, "      cause: {}", f.cause)?;
    writeln!(w, "      governed by: {}", governors(&f.governed_by))?;
    if !f.examples.is_empty() {
        writeln!(w, "      e.g. {}", f.examples.join(", "))?;
    }
    Ok(())
}

pub fn write_text<W: Write>(w: W, s: &Snapshot) -> io::Result<()> {
    // Process names, sysctl values and capture contents reach the terminal escaped.
    let mut w = super::printable::Escaped::new(w);
    write_text_raw(&mut w, s)?;
    w.flush()
}

fn write_text_raw<W: Write>(mut w: W, s: &Snapshot) -> io::Result<()> {
    writeln!(
        w,
        "tcpwatch snapshot: {} (kernel {}), {}",
        s.host,
        s.kernel,
        if s.window_s > 0.0 {
            format!("{:.1} s of events", s.window_s)
        } else {
            "inventory only".into()
        }
    )?;
    writeln!(w)?;
    writeln!(w, "STATES")?;
    let states: Vec<String> = s
        .states
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    writeln!(
        w,
        "  {}",
        if states.is_empty() {
            "no TCP sockets".into()
        } else {
            states.join("  ")
        }
    )?;
    for o in &s.owners {
        let st: Vec<String> = o.states.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(
            w,
            "  {} (pid {}): {} socket(s): {}",
            o.comm,
            o.pid,
            o.sockets,
            st.join(", ")
        )?;
    }
    if let Some(n) = s.namespaces.first().filter(|n| n.sockstat_orphan > 0) {
        writeln!(
            w,
            "  orphaned (closed, still in the kernel; host-wide): {}",
            n.sockstat_orphan
        )?;
    }
    writeln!(w)?;
    writeln!(w, "LISTENERS ({})", s.listeners.len())?;
    if !s.listeners.is_empty() {
        writeln!(
            w,
            "  {:<11} {:<24} {:<18} {:<28} {:<14} {:>6} {:>16} {:>7}",
            "NETNS",
            "ADDRESS",
            "OWNER",
            "ACCEPT QUEUE now/max (peak)",
            "SYN QUEUE",
            "DROPS",
            "OVFL acc/syn/ck",
            "SYNACK"
        )?;
        for l in &s.listeners {
            let addr = endpoint(&l.addr, l.port);
            writeln!(
                w,
                "  {:<11} {:<24} {:<18} {} {:>3}/{:<3} ({:>3})   {:>3} ({:>3})      {:>6} {:>16} {:>7}",
                l.netns,
                addr,
                owner(&l.owner),
                bar(&l.accept_queue),
                l.accept_queue.now,
                l.accept_queue.max,
                l.accept_queue.peak,
                l.syn_queue.now,
                l.syn_queue.peak,
                l.drops,
                format!(
                    "{}/{}/{}",
                    l.overflows.accept, l.overflows.syn, l.overflows.syncookies
                ),
                l.synack_retransmits
            )?;
        }
    }
    writeln!(w)?;
    let tw = &s.time_wait;
    writeln!(
        w,
        "TIME_WAIT {} ({} in the FIN_WAIT2 substate); seen entering {}, leaving {}",
        tw.total,
        tw.fin_wait2,
        tw.entered,
        tw.exited
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    if !tw.by_remote.is_empty() {
        let r: Vec<String> = tw
            .by_remote
            .iter()
            .map(|r| format!("{} {}", endpoint(&r.addr, r.port), r.count))
            .collect();
        writeln!(w, "  by remote endpoint: {}", r.join(", "))?;
        let p: Vec<String> = tw
            .by_local_port
            .iter()
            .map(|p| format!("{} {}", p.port, p.count))
            .collect();
        writeln!(w, "  by local port:      {}", p.join(", "))?;
        let mut o: Vec<String> = tw
            .by_owner
            .iter()
            .map(|o| {
                let how = if o.source == "listener" {
                    " (on its listening port)"
                } else {
                    ""
                };
                format!("{} (pid {}) {}{how}", o.comm, o.pid, o.count)
            })
            .collect();
        if tw.owner_unknown > 0 {
            o.push(format!("unknown {}", tw.owner_unknown));
        }
        writeln!(w, "  by owner:           {}", o.join(", "))?;
    }
    for h in &tw.port_headroom {
        writeln!(
            w,
            "  ports {} -> {}: {} of {} in use ({} TIME_WAIT), {} free",
            h.local_addr,
            endpoint(&h.remote_addr, h.remote_port),
            h.in_use,
            h.range,
            h.time_wait,
            h.free
        )?;
    }
    for d in tw.drift.iter().filter(|d| d.sockstat != d.tracked) {
        writeln!(
            w,
            "  netns {}: sockstat tw {} vs tracked {} (sockets the events did not show)",
            d.netns, d.sockstat, d.tracked
        )?;
    }
    writeln!(w)?;
    let kv = |m: &std::collections::BTreeMap<crate::model::snapshot::Name, u64>| -> String {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        w,
        "EVENTS  retransmits: {} ({} segments{})  resets: {}",
        kv(&s.retransmits),
        s.retransmitted_segments,
        if s.retransmits_not_sent > 0 {
            format!(", {} attempts not sent", s.retransmits_not_sent)
        } else {
            String::new()
        },
        kv(&s.resets)
    )?;
    if !s.errors.is_empty() {
        writeln!(w, "        socket errors: {}", kv(&s.errors))?;
    }
    let h = &s.histograms;
    if h.handshake_us.count > 0 {
        writeln!(
            w,
            "        handshake (client): p50 < {} p90 < {} p99 < {} ({} connections)",
            human_ns(h.handshake_us.p50 * 1000),
            human_ns(h.handshake_us.p90 * 1000),
            human_ns(h.handshake_us.p99 * 1000),
            h.handshake_us.count
        )?;
    }
    if h.lifetime_ms.count > 0 {
        writeln!(
            w,
            "        lifetime: p50 < {} p90 < {} p99 < {}",
            human_ns(h.lifetime_ms.p50 * 1_000_000),
            human_ns(h.lifetime_ms.p90 * 1_000_000),
            human_ns(h.lifetime_ms.p99 * 1_000_000)
        )?;
    }
    writeln!(w)?;
    writeln!(w, "FINDINGS ({})", s.findings.len())?;
    for f in &s.findings {
        write_finding(&mut w, f)?;
    }
    if !s.counters.is_empty() {
        writeln!(w)?;
        let c: Vec<String> = s
            .counters
            .iter()
            .map(|(k, v)| format!("{k} +{v}"))
            .collect();
        writeln!(w, "COUNTERS {}", c.join(", "))?;
    }
    writeln!(w)?;
    let l = &s.loss;
    if l.kernel_dropped
        + l.kernel_skipped
        + l.channel_dropped
        + l.decode_errors
        + l.recorder_dropped
        == 0
    {
        writeln!(w, "LOSS none")?;
    } else {
        let by: Vec<String> = l
            .kernel_dropped_by_type
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            w,
            "LOSS kernel ring full {} ({}), skipped by the kernel {}, undecodable {}",
            l.kernel_dropped,
            by.join(", "),
            l.kernel_skipped,
            l.decode_errors
        )?;
        if l.recorder_dropped > 0 {
            writeln!(
                w,
                "LOSS not kept by the daemon's recorder: {}",
                l.recorder_dropped
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::*;
    use crate::testkit::{overflow_finding, overflowing_listener};

    fn sample() -> Snapshot {
        let mut s = Snapshot {
            version: 1,
            host: "h".into(),
            kernel: "6.18".into(),
            window_s: 2.0,
            ..Default::default()
        };
        s.states.insert("ESTABLISHED".into(), 2);
        s.states.insert("LISTEN".into(), 1);
        s.states.insert("SYN_SENT".into(), 0);
        s.listeners.push(overflowing_listener(7, 8080));
        s.findings.push(overflow_finding(vec![]));
        s
    }

    #[test]
    fn bars() {
        assert_eq!(
            bar(&QueueView {
                now: 3,
                max: 2,
                peak: 3
            }),
            "[##########]"
        );
        assert_eq!(
            bar(&QueueView {
                now: 1,
                max: 4,
                peak: 1
            }),
            "[###.......]"
        );
        assert_eq!(
            bar(&QueueView {
                now: 0,
                max: 0,
                peak: 0
            }),
            "[..........]"
        );
    }

    #[test]
    fn text_tables() {
        let mut out = Vec::new();
        write_text(&mut out, &sample()).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("ESTABLISHED 2  LISTEN 1"), "{t}");
        assert!(!t.contains("SYN_SENT"), "zero states are not listed: {t}");
        assert!(
            t.contains("127.0.0.1:8080")
                && t.contains("42/srv")
                && t.contains("[##########]")
                && t.contains("24/0/0"),
            "{t}"
        );
        assert!(
            t.contains("[critical] accept_queue_overflow")
                && t.contains("net.core.somaxconn = 4096"),
            "{t}"
        );
        assert!(t.contains("LOSS none"));
    }

    #[test]
    fn json_document() {
        let mut out = Vec::new();
        write_json(&mut out, &sample()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["states"]["ESTABLISHED"], 2);
        assert_eq!(v["listeners"][0]["accept_queue"]["now"], 3);
        assert_eq!(v["listeners"][0]["owner"]["pid"], 42);
        assert_eq!(v["findings"][0]["governed_by"][0]["value"], "4096");
        for k in [
            "states",
            "listeners",
            "time_wait",
            "counters",
            "sysctls",
            "findings",
            "loss",
        ] {
            assert!(!v[k].is_null(), "{k} is part of the contract");
        }
    }
}
