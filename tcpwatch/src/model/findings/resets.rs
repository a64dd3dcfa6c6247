//! Resets explained, per namespace. What made this host send them comes from the kernel's
//! counters (exact on every kernel) or, in a capture, from the reason on each reset (6.10+),
//! which also names the sockets; resets received are told apart by the state they hit.
use std::collections::BTreeSet;

use super::catalogue::{Finding, FindingId, Severity};
use super::facts::{Facts, tuple};
use crate::model::aggregate::{ResetKey, ResetStats};
use crate::model::event::OwnerView;
use crate::model::event::{Owner, TcpState};

pub(super) fn by_cause(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let input = f.input;
    let named = |k: &ResetKey, names: &[&str]| {
        k.reason
            .and_then(|r| input.reasons.name(r))
            .is_some_and(|n| names.contains(&n))
    };
    let mut nets: BTreeSet<u32> = f.agg.resets.keys().map(|k| k.netns).collect();
    nets.extend(f.snap.namespaces.iter().map(|n| n.netns));
    for netns in nets {
        let ns = f.snap.namespaces.iter().find(|n| n.netns == netns);
        // Where the kernel gives no reason (older kernels) its counters stand in for the
        // events, but they count the whole namespace: not under a socket filter.
        let counter = |name: &str| {
            if input.sockets_filtered {
                return 0;
            }
            ns.and_then(|n| n.counters.get(name)).copied().unwrap_or(0)
        };
        let groups: Vec<(&ResetKey, &ResetStats)> = {
            let mut g: Vec<_> = f
                .agg
                .resets
                .iter()
                .filter(|(k, _)| k.netns == netns)
                .collect();
            g.sort_by_key(|(k, _)| **k);
            g
        };
        // Count, first owner and examples of the groups `pick` selects.
        let gather = |pick: &dyn Fn(&ResetKey) -> bool| -> (u64, Option<Owner>, Vec<String>) {
            let mut n = 0;
            let mut owner = None;
            let mut ex: Vec<String> = Vec::new();
            for (_, r) in groups.iter().filter(|(k, _)| pick(k)) {
                n += r.count;
                owner = owner.or(r.owner);
                for (l, rm) in &r.examples {
                    if ex.len() < 5 {
                        ex.push(tuple(l, rm));
                    }
                }
            }
            (n, owner, ex)
        };
        let view = |o: Option<Owner>| o.as_ref().map(OwnerView::from);

        let (ev, owner, examples) = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_CLOSE"]));
        let n = counter("TcpExt:TCPAbortOnClose").max(ev);
        if n > 0 {
            out.push(f.finding(
                FindingId::ResetOnClose,
                Severity::Warning,
                netns,
                format!("{n} connection(s) reset by close() with received data still unread"),
                "the application closed a socket before reading what the peer had sent: the kernel answers with RST instead of FIN (RFC 2525), and the peer gets ECONNRESET, often losing its last response".into(),
                view(owner),
                n,
                examples,
            ));
        }
        // A zero-linger close resets with the generic TCP_STATE reason: examples, not a count.
        let (_, owner, examples) =
            gather(&|k| k.sent && (named(k, &["TCP_ABORT_ON_DATA"]) || (named(k, &["TCP_STATE"]))));
        let specific = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_DATA"])).0;
        let n = counter("TcpExt:TCPAbortOnData").max(specific);
        if n > 0 {
            out.push(f.finding(
                FindingId::AbortiveClose,
                Severity::Info,
                netns,
                format!("{n} connection(s) aborted with RST: closed with a zero SO_LINGER, or data arrived after close()"),
                "an abortive close by design (SO_LINGER on with a 0 s timeout skips FIN and TIME_WAIT), or a peer that kept sending after this side had closed".into(),
                view(owner),
                n,
                examples,
            ));
        }
        let (ev, owner, examples) = gather(&|k| k.sent && named(k, &["TCP_ABORT_ON_MEMORY"]));
        let n = counter("TcpExt:TCPAbortOnMemory").max(ev);
        if n > 0 {
            let orphans = ns.map_or(0, |n| n.sockstat_orphan);
            out.push(f.finding(
                FindingId::ResetOnMemory,
                Severity::Critical,
                netns,
                format!("{n} connection(s) reset by the kernel for lack of memory ({orphans} orphaned sockets now)"),
                "orphaned sockets (closed, still sending) beyond net.ipv4.tcp_max_orphans, or TCP memory past its limit in net.ipv4.tcp_mem: the kernel logs \"too many orphaned sockets\" or \"out of memory -- consider tuning tcp_mem\" and resets".into(),
                view(owner),
                n,
                examples,
            ));
        }
        let (n, owner, examples) = gather(&|k| !k.sent && k.state == Some(TcpState::SynSent));
        if n > 0 {
            out.push(f.finding(
                FindingId::ConnectRefused,
                Severity::Warning,
                netns,
                format!("{n} connection attempt(s) refused: the SYN was answered with RST"),
                "nothing listens on the destination port (the service is down, not started yet, or the port is wrong), or a firewall rejects with tcp-reset".into(),
                view(owner),
                n,
                examples,
            ));
        }
        let (n, owner, examples) = gather(&|k| {
            !k.sent
                && !matches!(
                    k.state,
                    Some(TcpState::SynSent | TcpState::TimeWait | TcpState::Close) | None
                )
        });
        if n > 0 {
            out.push(f.finding(
                FindingId::PeerResets,
                Severity::Info,
                netns,
                format!("{n} connection(s) reset by the peer (ECONNRESET)"),
                "the peer aborted: its application closed with unread data or a zero SO_LINGER, or it restarted; or a firewall, NAT or load balancer on the path dropped the connection's state after an idle timeout".into(),
                view(owner),
                n,
                examples,
            ));
        }
        let (n, _, examples) = gather(&|k| {
            k.sent
                && (named(k, &["NO_SOCKET"])
                    || (k.no_socket && k.reason.and_then(|r| input.reasons.name(r)).is_none()))
        });
        if n > 0 {
            out.push(f.finding(
                FindingId::ResetNoSocket,
                Severity::Info,
                netns,
                format!("{n} segment(s) answered with RST: no socket here for them"),
                "nothing listens on the port (connection refused), or the connection is already gone on this side and its peer still sends".into(),
                None,
                n,
                examples,
            ));
        }
    }
}
