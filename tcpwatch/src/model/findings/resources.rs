//! Resources running out: ephemeral ports toward one destination, the timewait table, and
//! tcpwatch's own event budget.
use super::catalogue::{Finding, FindingId, Severity};
use super::facts::Facts;
use crate::model::snapshot::views::endpoint;

/// A destination using most of the local port range (TIME_WAIT sockets hold ports too).
pub(super) fn ephemeral_ports(f: &Facts<'_>, out: &mut Vec<Finding>) {
    for h in &f.snap.time_wait.port_headroom {
        if (h.in_use as f64) < f.input.thresholds.port_pressure * h.range as f64 {
            continue;
        }
        out.push(f.finding(
            FindingId::EphemeralPortPressure,
            if h.free < h.range / 10 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            h.netns,
            format!(
                "{} of {} ephemeral ports from {} to {} in use ({} in TIME_WAIT)",
                h.in_use,
                h.range,
                h.local_addr,
                endpoint(&h.remote_addr, h.remote_port),
                h.time_wait
            ),
            "many short connections to one destination, each leaving a TIME_WAIT socket on the side that closed first".into(),
            None,
            h.in_use,
            vec![],
        ));
    }
}

/// Sockets that closed without TIME_WAIT because the table was full.
pub(super) fn time_wait_buckets(f: &Facts<'_>, out: &mut Vec<Finding>) {
    for n in &f.snap.namespaces {
        let over = n
            .counters
            .get("TcpExt:TCPTimeWaitOverflow")
            .copied()
            .unwrap_or(0);
        if over > 0 {
            out.push(f.finding(
                FindingId::TimeWaitBucketOverflow,
                Severity::Warning,
                n.netns,
                format!("{over} socket(s) closed without TIME_WAIT: the timewait table was full"),
                "more TIME_WAIT sockets than net.ipv4.tcp_max_tw_buckets allows; late segments of those connections can now reach new ones".into(),
                None,
                over,
                vec![],
            ));
        }
    }
}

/// Events tcpwatch lost: every count made from events is then a lower bound.
pub(super) fn events_lost(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let lost = f.input.loss.total();
    if lost > 0 {
        out.push(f.finding(
            FindingId::EventsLost,
            Severity::Warning,
            0,
            format!("{lost} event(s) were lost: counts from events are lower bounds"),
            "the ring buffers filled faster than tcpwatch drained them".into(),
            None,
            lost,
            vec![],
        ));
    }
}
