//! Retransmissions and the aborts they end in: connects stuck retransmitting their SYN, RTO
//! storms without progress, loss connections recovered from, and idle connections killed by
//! unanswered keepalives.
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::catalogue::{Finding, FindingId, Severity};
use super::facts::{Facts, tuple};
use crate::model::aggregate::Timeline;
use crate::model::event::OwnerView;
use crate::model::event::{Owner, RetransmitKind, TcpState};
use crate::model::snapshot::views::endpoint;
use crate::model::system::SockRec;

/// SYN_SENT with SYN retransmits: the peer does not answer.
pub(super) fn syn_sent_stuck(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let inv: &[SockRec] = f.input.inventory.unwrap_or(&[]);
    let stuck: Vec<&Timeline> = f
        .agg
        .sockets()
        .filter(|t| t.retransmits(RetransmitKind::Syn) > 0 && t.state == Some(TcpState::SynSent))
        .collect();
    let stuck_inv: Vec<&SockRec> = inv
        .iter()
        .filter(|r| r.state == TcpState::SynSent && r.retransmits > 0)
        .collect();
    let n = stuck.len().max(stuck_inv.len());
    if n == 0 {
        return;
    }
    let netns = stuck
        .first()
        .map(|t| t.netns)
        .or(stuck_inv.first().map(|r| r.netns))
        .unwrap_or(0);
    let mut ex: Vec<String> = stuck
        .iter()
        .take(5)
        .map(|t| tuple(&t.local, &t.remote))
        .collect();
    if ex.is_empty() {
        ex = stuck_inv
            .iter()
            .take(5)
            .map(|r| tuple(&r.local, &r.remote))
            .collect();
    }
    // The peer may be a listener of this very namespace that is refusing SYNs: say so
    // rather than leave the operator to suspect the network.
    let remotes: Vec<(u32, SocketAddr)> = stuck
        .iter()
        .map(|t| (t.netns, t.remote))
        .chain(stuck_inv.iter().map(|r| (r.netns, r.remote)))
        .collect();
    // This host's addresses in each namespace, as far as its sockets show them: a wildcard
    // listener receives SYNs to those only.
    let local_ips: HashSet<(u32, IpAddr)> = inv
        .iter()
        .map(|r| (r.netns, canonical(r.local.ip())))
        .collect();
    let refusing = f.snap.listeners.iter().find(|l| {
        let busy = l.accept_queue.is_full() || l.overflows.accept + l.overflows.syn > 0;
        let Ok(lip) = l.addr.parse::<IpAddr>() else {
            return false;
        };
        busy && remotes.iter().any(|(ns, r)| {
            *ns == l.netns
                && r.port() == l.port
                && listener_receives(canonical(lip), canonical(r.ip()), |ip| {
                    local_ips.contains(&(*ns, ip))
                })
        })
    });
    let cause = match refusing {
        Some(l) => format!(
            "the peer is listener {} in this namespace and its queues are full ({} of {} queued for accept()): the kernel drops the SYNs it cannot queue and the clients retry",
            endpoint(&l.addr, l.port),
            l.accept_queue.now,
            l.accept_queue.max
        ),
        None => "no SYN-ACK comes back: the peer or a firewall drops the SYN, the port is filtered, or the listener's queues are full".into(),
    };
    out.push(
        f.finding(
            FindingId::SynSentStuck,
            Severity::Warning,
            netns,
            format!("{n} connection attempt(s) retransmitting their SYN"),
            cause,
            stuck
                .first()
                .and_then(|t| t.owner.as_ref())
                .map(OwnerView::from),
            n as u64,
            ex,
        ),
    );
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a listener bound to `listener` gets SYNs sent to `dst` (both canonical): the same
/// address, or a wildcard and `dst` is one of this host's (`is_local`) — `0.0.0.0` for IPv4
/// destinations only, `::` for both (a dual-stack socket).
fn listener_receives(listener: IpAddr, dst: IpAddr, is_local: impl Fn(IpAddr) -> bool) -> bool {
    if listener == dst {
        return true;
    }
    if !listener.is_unspecified() || !(dst.is_loopback() || is_local(dst)) {
        return false;
    }
    listener.is_ipv6() || dst.is_ipv4()
}

/// RTO timeouts in a row at the end of a socket's retransmits, from their intervals: each
/// about twice the one before (the exponential backoff), the first at least the 200 ms
/// minimum RTO. Fast retransmits come closer together and break the run.
fn rto_backoff_run(t: &Timeline) -> u32 {
    let iv: Vec<u64> = t
        .last_retrans
        .iter()
        .filter(|r| matches!(r.kind, Some(RetransmitKind::Data | RetransmitKind::Fin)))
        .map(|r| r.interval_ns.unwrap_or(0))
        .collect();
    let mut run = 0;
    for w in iv.windows(2).rev() {
        let (a, b) = (w[0], w[1]);
        if a < 150_000_000 || b * 10 < a * 15 || b * 10 > a * 26 {
            break;
        }
        run += 1;
    }
    // Each doubling pair is one more timeout; the first interval also ended one.
    if run == 0 { 0 } else { run + 2 }
}

/// Retransmit storms: RTO timeouts in a row with no ACK making progress, what tcp_retries2
/// caps before the kernel aborts. Live sockets show the kernel's own count of them
/// (icsk_retransmits, zeroed by progress); ended ones abort with ETIMEDOUT; without an
/// inventory (a replay) a run of doubling intervals between retransmits shows it. Then the
/// loss connections recovered from, and keepalive aborts.
pub(super) fn storms(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let th = f.input.thresholds;
    let inv: &[SockRec] = f.input.inventory.unwrap_or(&[]);
    let data_rt =
        |t: &Timeline| t.retransmits(RetransmitKind::Data) + t.retransmits(RetransmitKind::Fin);
    let mut storm: BTreeMap<u64, (u32, SocketAddr, SocketAddr, Option<Owner>)> = BTreeMap::new();
    for r in inv.iter().filter(|r| {
        !matches!(
            r.state,
            TcpState::SynSent | TcpState::SynRecv | TcpState::Listen | TcpState::TimeWait
        ) && u32::from(r.retransmits) >= th.retransmit_storm
    }) {
        storm.insert(r.cookie, (r.netns, r.local, r.remote, r.owner));
    }
    let mut aborted = 0;
    for t in f.agg.sockets().filter(|t| data_rt(t) > 0) {
        let gone = t.errors.iter().any(|e| *e == libc::ETIMEDOUT);
        let backoff = f.input.inventory.is_none()
            && t.ended_ns().is_none()
            && rto_backoff_run(t) >= th.retransmit_storm;
        if gone {
            aborted += 1;
        }
        if gone || backoff {
            storm.insert(t.cookie, (t.netns, t.local, t.remote, t.owner));
        }
    }
    if let Some((netns, _, _, owner)) = storm.values().next().copied() {
        out.push(f.finding(
            FindingId::RetransmitStorm,
            if aborted > 0 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            netns,
            format!(
                "{} connection(s) in retransmission timeouts without progress ({aborted} aborted with ETIMEDOUT)",
                storm.len()
            ),
            "nothing this side sends is acknowledged: the peer is gone or unreachable, or the path drops everything; the RTO doubles at each retry".into(),
            owner.as_ref().map(OwnerView::from),
            storm.len() as u64,
            storm
                .values()
                .take(5)
                .map(|(_, l, r, _)| tuple(l, r))
                .collect(),
        ));
    }
    // Loss the connections recovered from: worth knowing, not an outage.
    let lossy: Vec<&Timeline> = f
        .agg
        .sockets()
        .filter(|t| {
            t.retransmits(RetransmitKind::Data) >= th.retransmit_storm
                && !storm.contains_key(&t.cookie)
        })
        .collect();
    if let Some(first) = lossy.first() {
        out.push(f.finding(
            FindingId::DataRetransmits,
            Severity::Info,
            first.netns,
            format!(
                "{} connection(s) retransmitted data and went on ({} retransmits)",
                lossy.len(),
                lossy.iter().map(|t| u64::from(data_rt(t))).sum::<u64>()
            ),
            "segments were lost on the path or in a queue (congestion, a lossy link, a policer) and resent".into(),
            first.owner.as_ref().map(OwnerView::from),
            lossy.len() as u64,
            lossy
                .iter()
                .take(5)
                .map(|t| tuple(&t.local, &t.remote))
                .collect(),
        ));
    }
    let ka: Vec<&Timeline> = f
        .agg
        .sockets()
        .filter(|t| {
            t.errors.iter().any(|e| *e == libc::ETIMEDOUT)
                && t.retransmits(RetransmitKind::Data) == 0
                && t.retransmits(RetransmitKind::Syn) == 0
        })
        .collect();
    if let Some(first) = ka.first() {
        out.push(f.finding(
            FindingId::KeepaliveAbort,
            Severity::Warning,
            first.netns,
            format!(
                "{} idle connection(s) aborted with ETIMEDOUT and no retransmits: keepalive probes went unanswered",
                ka.len()
            ),
            "the peer vanished (host down, NAT or firewall state expired) while the connection was idle".into(),
            first.owner.as_ref().map(OwnerView::from),
            ka.len() as u64,
            ka.iter()
                .take(5)
                .map(|t| tuple(&t.local, &t.remote))
                .collect(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        canonical(s.parse().unwrap())
    }

    #[test]
    fn which_listener_a_syn_reaches() {
        let local = |a: IpAddr| a == ip("10.0.0.5");
        // The same address, also when one side writes it v4-mapped.
        assert!(listener_receives(
            ip("127.0.0.1"),
            ip("::ffff:127.0.0.1"),
            local
        ));
        assert!(listener_receives(
            ip("::ffff:10.1.1.1"),
            ip("10.1.1.1"),
            local
        ));
        // Wildcards receive what is sent to this host only.
        assert!(listener_receives(ip("0.0.0.0"), ip("10.0.0.5"), local));
        assert!(listener_receives(ip("0.0.0.0"), ip("127.0.0.1"), local));
        assert!(!listener_receives(ip("0.0.0.0"), ip("10.9.9.9"), local));
        assert!(!listener_receives(ip("0.0.0.0"), ip("::1"), local));
        assert!(listener_receives(ip("::"), ip("::1"), local));
        assert!(listener_receives(ip("::"), ip("10.0.0.5"), local));
        assert!(!listener_receives(ip("::"), ip("2001:db8::1"), local));
        assert!(!listener_receives(ip("10.0.0.5"), ip("10.0.0.6"), local));
    }
}
