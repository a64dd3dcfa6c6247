//! How connections end badly: CLOSE_WAIT sockets the application never closes, and closed
//! sockets left waiting in FIN_WAIT2 for the peer.
use std::collections::BTreeMap;

use super::catalogue::{Finding, FindingId, Severity};
use super::facts::{Facts, tuple};
use crate::model::event::OwnerView;
use crate::model::event::{Owner, TcpState};
use crate::model::system::SockRec;

/// CLOSE_WAIT sockets of one owner: the sockets, the oldest idle time, the owner.
type Leak<'a> = (Vec<&'a SockRec>, u64, Option<Owner>);

/// CLOSE_WAIT leaks, by owner: idle since the peer's FIN (the inventory's last-packet time,
/// or the transition if it was seen).
pub(super) fn close_wait_leak(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let now = f.input.now_ns;
    let th = f.input.thresholds;
    let inv: &[SockRec] = f.input.inventory.unwrap_or(&[]);
    let mut cw: BTreeMap<(u32, Option<u32>), Leak<'_>> = BTreeMap::new();
    for r in inv.iter().filter(|r| r.state == TcpState::CloseWait) {
        let seen = f
            .agg
            .sockets()
            .find(|t| t.cookie == r.cookie && t.cookie != 0)
            .map(|t| t.state_since_ns);
        let since = seen.or((r.last_pkt_ns != 0).then_some(r.last_pkt_ns));
        let Some(since) = since else { continue };
        let age = now.saturating_sub(since);
        if age < th.close_wait_secs * 1_000_000_000 {
            continue;
        }
        let e = cw
            .entry((r.netns, r.owner.map(|o| o.pid)))
            .or_insert((Vec::new(), 0, r.owner));
        e.0.push(r);
        e.1 = e.1.max(age);
    }
    for ((netns, _), (socks, oldest, owner)) in cw {
        let who = owner.map_or("an unknown process".to_string(), |o| {
            format!("{} (pid {})", o.comm.to_string_lossy(), o.pid)
        });
        out.push(f.finding(
            FindingId::CloseWaitLeak,
            Severity::Warning,
            netns,
            format!(
                "{} socket(s) in CLOSE_WAIT owned by {who}, the oldest idle for {} s",
                socks.len(),
                oldest / 1_000_000_000
            ),
            "the peer closed its side and the application never called close() on these sockets: a descriptor leak in the owner's code".into(),
            owner.as_ref().map(OwnerView::from),
            socks.len() as u64,
            socks
                .iter()
                .take(5)
                .map(|r| tuple(&r.local, &r.remote))
                .collect(),
        ));
    }
}

/// Orphaned FIN_WAIT2: timewait sockets waiting for the peer's FIN.
pub(super) fn orphaned_fin_wait2(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let inv: &[SockRec] = f.input.inventory.unwrap_or(&[]);
    let mut fw2: BTreeMap<u32, u64> = BTreeMap::new();
    for r in inv
        .iter()
        .filter(|r| r.state == TcpState::TimeWait && r.substate == Some(TcpState::FinWait2))
    {
        *fw2.entry(r.netns).or_insert(0) += 1;
    }
    for (netns, n) in fw2 {
        if n < 16 {
            continue;
        }
        out.push(f.finding(
            FindingId::OrphanedFinWait2,
            Severity::Info,
            netns,
            format!("{n} closed socket(s) waiting in FIN_WAIT2 for the peer's FIN"),
            "this side closed, the peer acknowledged but has not closed its end yet".into(),
            None,
            n,
            vec![],
        ));
    }
}
