//! Composing a snapshot: states and owners from the listing (or the events), listeners with
//! their queues and the window's overflows, TIME_WAIT by port, remote, owner and headroom,
//! counters per namespace, event totals and histograms, notable timelines, then findings.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashSet;

use super::views::*;
use crate::model::aggregate::{Aggregator, ListenerStats, Timeline};
use crate::model::event::{Owner, TcpState, TwExitReason};
use crate::model::findings::{self, facts::Facts};
use crate::model::system::{SockRec, errno_name, ss_state};

const TOP: usize = 10;

/// Timelines of sockets that still exist: what a capture says is open now.
fn live_timelines(agg: &Aggregator) -> impl Iterator<Item = &Timeline> {
    agg.sockets()
        .filter(|t| t.ended_ns().is_none() && t.state != Some(TcpState::Close))
}

/// Sockets by owner and state: the listing's owners, or in a replay the live timelines'.
fn owner_states(agg: &Aggregator, inventory: Option<&[SockRec]>) -> Vec<OwnerStates> {
    let mut by: BTreeMap<(u32, String), BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut add = |o: &Owner, st: TcpState| {
        *by.entry((o.pid, o.comm.to_string_lossy()))
            .or_default()
            .entry(st.name())
            .or_insert(0) += 1;
    };
    match inventory {
        Some(inv) => {
            for r in inv.iter().filter(|r| r.state != TcpState::TimeWait) {
                if let Some(o) = &r.owner {
                    add(o, ss_state(r));
                }
            }
        }
        None => {
            for t in live_timelines(agg) {
                if let (Some(o), Some(st)) = (&t.owner, t.state) {
                    add(o, st);
                }
            }
        }
    }
    let mut v: Vec<OwnerStates> = by
        .into_iter()
        .map(|((pid, comm), states)| OwnerStates {
            pid,
            comm,
            sockets: states.values().sum(),
            states: states.into_iter().map(|(k, n)| (k.into(), n)).collect(),
        })
        .collect();
    v.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
    v.truncate(TOP);
    v
}

/// TIME_WAIT by who closed it: the timewait registry knows the owner of sockets seen closing;
/// a timewait socket on a listening port is the server side of a connection its listener
/// accepted, closed first by the server.
fn time_wait_owners(agg: &Aggregator, inv: &[SockRec], tws: &[&SockRec]) -> (Vec<OwnerCount>, u64) {
    use rustc_hash::FxHashMap;
    let closed: FxHashMap<(u32, SocketAddr, SocketAddr), Owner> = agg
        .timewait
        .values()
        .filter_map(|e| Some(((e.netns, e.local, e.remote), e.owner?)))
        .collect();
    let listeners: FxHashMap<(u32, u16), Owner> = inv
        .iter()
        .filter(|r| r.state == TcpState::Listen)
        .filter_map(|r| Some(((r.netns, r.local.port()), r.owner?)))
        .collect();
    let mut counts: BTreeMap<(u32, String, &'static str), u64> = BTreeMap::new();
    let mut unknown = 0;
    for r in tws {
        let known = closed
            .get(&(r.netns, r.local, r.remote))
            .map(|o| (o, "closed"))
            .or_else(|| {
                listeners
                    .get(&(r.netns, r.local.port()))
                    .map(|o| (o, "listener"))
            });
        match known {
            Some((o, source)) => {
                *counts
                    .entry((o.pid, o.comm.to_string_lossy(), source))
                    .or_insert(0) += 1
            }
            None => unknown += 1,
        }
    }
    let mut v: Vec<OwnerCount> = counts
        .into_iter()
        .map(|((pid, comm, source), count)| OwnerCount {
            pid,
            comm,
            count,
            source: source.into(),
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
    v.truncate(TOP);
    (v, unknown)
}

pub fn socket_view(t: &Timeline, now: u64) -> SocketView {
    let names = ["syn", "synack", "data", "fin"];
    SocketView {
        cookie: t.cookie,
        netns: t.netns,
        family: t.family.name().into(),
        local: t.local.to_string(),
        remote: t.remote.to_string(),
        owner: t.owner.as_ref().map(OwnerView::from),
        state: t.state.map(|s| s.name().into()),
        state_for_ns: now.saturating_sub(t.state_since_ns),
        closed_first: t.closed_first,
        transitions: t
            .transitions
            .iter()
            .map(|x| TransitionView {
                ts_ns: x.ts_ns,
                wall_ns: None,
                old: x.old.name().into(),
                new: x.new.name().into(),
                prev_state_ns: x.prev_state_ns,
            })
            .collect(),
        retransmits: names
            .iter()
            .zip(t.retrans)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| ((*k).into(), n))
            .collect(),
        retransmit_intervals_ns: t
            .last_retrans
            .iter()
            .filter_map(|r| r.interval_ns)
            .collect(),
        resets_sent: t.resets_sent,
        resets_received: t.resets_received,
        errors: t.errors.iter().map(|e| errno_name(*e).into()).collect(),
        time_wait: t.timewait.map(|p| TwView {
            substate: p.substate.map(|s| s.name().into()),
            entered_ns: p.enter_ns,
            entered_wall_ns: None,
            exit: p.exit.map(|(_, r)| r.name().into()),
        }),
    }
}

fn notable(t: &Timeline) -> bool {
    t.retrans.iter().any(|n| *n > 0)
        || t.resets_sent + t.resets_received > 0
        || t.errors.total > 0
        || matches!(
            t.state,
            Some(TcpState::CloseWait | TcpState::SynSent | TcpState::FinWait2 | TcpState::LastAck)
        )
}

/// Builds the snapshot.
pub fn build(agg: &Aggregator, input: &Input<'_>) -> Snapshot {
    let now = input.now_ns;
    let mut s = Snapshot {
        version: 1,
        ts_ns: now,
        window_s: input.window_ns as f64 / 1e9,
        host: input.host.clone(),
        kernel: input.kernel.clone(),
        hooks: input.hooks.clone(),
        ..Snapshot::default()
    };
    for st in TcpState::ALL {
        if !matches!(st, TcpState::Close | TcpState::NewSynRecv) {
            s.states.insert(st.name().into(), 0);
        }
    }
    let inv: &[SockRec] = input.inventory.unwrap_or(&[]);
    if input.inventory.is_some() {
        for r in inv {
            *s.states.entry(ss_state(r).name().into()).or_insert(0) += 1;
        }
    } else {
        // From the events: every timeline that has not ended, by its current state, and the
        // timewait registry by substate.
        for t in live_timelines(agg) {
            if let Some(st) = t.state {
                *s.states.entry(st.name().into()).or_insert(0) += 1;
            }
        }
        for e in agg.timewait.values() {
            *s.states
                .entry(e.substate.unwrap_or(TcpState::TimeWait).name().into())
                .or_insert(0) += 1;
        }
        *s.states.entry(TcpState::Listen.name().into()).or_insert(0) += agg.listener_count() as u64;
    }
    s.owners = owner_states(agg, input.inventory);

    // Namespaces: the top-level counters and sysctls are the watched one's when only one is
    // watched, else tcpwatch's own.
    let main_ns = if input.namespaces.len() == 1 {
        input.namespaces[0].inode
    } else {
        input.home_netns
    };
    for n in &input.namespaces {
        let d = n.counters_now.delta(&n.counters_start);
        let counters: BTreeMap<String, u64> =
            d.0.into_iter()
                .filter(|(k, v)| *v > 0 && (k.starts_with("TcpExt:") || k.starts_with("Tcp:")))
                .collect();
        if n.inode == main_ns {
            s.counters = counters.clone();
            s.sysctls = n.sysctls.clone();
        }
        s.namespaces.push(NamespaceView {
            netns: n.inode,
            sockstat_tw: n.sockstat.tw,
            sockstat_inuse: n.sockstat.inuse,
            sockstat_orphan: n.sockstat.orphan,
            counters,
            sysctls: n.sysctls.clone(),
        });
    }
    // An unknown namespace has no sysctls (an empty map borrowed for the whole build).
    let none = BTreeMap::new();
    let sysctls_of = |netns: u32| -> &BTreeMap<String, String> {
        input
            .namespaces
            .iter()
            .find(|n| n.inode == netns)
            .map_or(&none, |n| &n.sysctls)
    };

    // Listeners: the inventory's now, the aggregator's window.
    let mut shown: FxHashSet<(u32, SocketAddr, u64)> = FxHashSet::default();
    for r in inv.iter().filter(|r| r.state == TcpState::Listen) {
        let a = agg.listener_stats(r.netns, r.local, r.cookie);
        shown.extend(a.map(|a| (a.netns, a.local, a.cookie)));
        s.listeners.push(ListenerView {
            netns: r.netns,
            addr: r.local.ip().to_string(),
            port: r.local.port(),
            cookie: r.cookie,
            owner: r
                .owner
                .as_ref()
                .or(a.and_then(|a| a.owner.as_ref()))
                .map(OwnerView::from),
            accept_queue: QueueView {
                now: r.accept_queue,
                max: r.accept_max,
                peak: a.map_or(0, |a| a.accept_peak).max(r.accept_queue),
            },
            syn_queue: QueueView {
                now: r.syn_queue,
                max: r.accept_max,
                peak: a.map_or(0, |a| a.syn_peak).max(r.syn_queue),
            },
            drops: r.drops as u64,
            overflows: a.map_or_else(OverflowsView::default, |a| OverflowsView {
                accept: a.overflow_accept,
                syn: a.overflow_syn,
                syncookies: a.syncookies,
                final_ack_packets: a.overflow_packets,
            }),
            synack_retransmits: a.map_or(0, |a| a.synack_retransmits),
        });
    }
    // Without an inventory (a replay or a check run), the listeners the window's events and
    // samples saw, with their last sampled queues; with one, also those that overflowed or
    // retransmitted in the window and are gone now (a restarted server's old socket).
    let busy = |a: &ListenerStats| {
        a.overflow_accept
            + a.overflow_syn
            + a.syncookies
            + a.overflow_packets
            + a.synack_retransmits
            > 0
    };
    for a in agg.listeners() {
        if input.inventory.is_none() || (busy(a) && !shown.contains(&(a.netns, a.local, a.cookie)))
        {
            s.listeners.push(ListenerView {
                netns: a.netns,
                addr: a.local.ip().to_string(),
                port: a.local.port(),
                cookie: a.cookie,
                owner: a.owner.as_ref().map(OwnerView::from),
                accept_queue: QueueView {
                    now: a.accept_now,
                    max: a.accept_max,
                    peak: a.accept_peak,
                },
                syn_queue: QueueView {
                    now: a.syn_now,
                    max: a.accept_max,
                    peak: a.syn_peak,
                },
                drops: a.drops,
                overflows: OverflowsView {
                    accept: a.overflow_accept,
                    syn: a.overflow_syn,
                    syncookies: a.syncookies,
                    final_ack_packets: a.overflow_packets,
                },
                synack_retransmits: a.synack_retransmits,
            });
        }
    }
    s.listeners
        .sort_by(|a, b| (a.netns, a.port, &a.addr).cmp(&(b.netns, b.port, &b.addr)));

    // TIME_WAIT from the inventory (exact), by local port and remote endpoint.
    let tws: Vec<&SockRec> = inv
        .iter()
        .filter(|r| r.state == TcpState::TimeWait)
        .collect();
    s.time_wait.total = tws.len() as u64;
    s.time_wait.fin_wait2 = tws
        .iter()
        .filter(|r| r.substate == Some(TcpState::FinWait2))
        .count() as u64;
    let mut by_port: BTreeMap<(u32, u16), u64> = BTreeMap::new();
    let mut by_remote: BTreeMap<(u32, IpAddr, u16), u64> = BTreeMap::new();
    for r in &tws {
        *by_port.entry((r.netns, r.local.port())).or_insert(0) += 1;
        *by_remote
            .entry((r.netns, r.remote.ip(), r.remote.port()))
            .or_insert(0) += 1;
    }
    let mut ports: Vec<PortCount> = by_port
        .into_iter()
        .map(|((netns, port), count)| PortCount { netns, port, count })
        .collect();
    ports.sort_by(|a, b| b.count.cmp(&a.count).then(a.port.cmp(&b.port)));
    ports.truncate(TOP);
    s.time_wait.by_local_port = ports;
    let mut remotes: Vec<RemoteCount> = by_remote
        .into_iter()
        .map(|((netns, ip, port), count)| RemoteCount {
            netns,
            addr: ip.to_string(),
            port,
            count,
        })
        .collect();
    remotes.sort_by_key(|r| std::cmp::Reverse(r.count));
    remotes.truncate(TOP);
    s.time_wait.by_remote = remotes;
    let (by_owner, unknown) = time_wait_owners(agg, inv, &tws);
    s.time_wait.by_owner = by_owner;
    s.time_wait.owner_unknown = unknown;
    for n in &input.namespaces {
        // An instant snapshot follows no events: what it tracks is what it just listed.
        let tracked = if input.window_ns == 0 {
            tws.iter().filter(|r| r.netns == n.inode).count() as u64
        } else {
            agg.timewait.values().filter(|e| e.netns == n.inode).count() as u64
        };
        s.time_wait.drift.push(Drift {
            netns: n.inode,
            sockstat: n.sockstat.tw,
            tracked,
        });
    }
    s.time_wait.entered = agg.totals.tw_enter;
    for (i, r) in [
        TwExitReason::Expired,
        TwExitReason::Reused,
        TwExitReason::Killed,
    ]
    .into_iter()
    .enumerate()
    {
        s.time_wait
            .exited
            .insert(r.name().to_string(), agg.totals.tw_exit[i]);
    }

    // Port headroom: connections from one local address to one remote endpoint each hold a
    // local port, TIME_WAIT ones included.
    // Only client-side sockets draw from the ephemeral range: a socket whose local port is a
    // listener's is the server side.
    let listening: std::collections::HashSet<(u32, u16)> = inv
        .iter()
        .filter(|r| r.state == TcpState::Listen)
        .map(|r| (r.netns, r.local.port()))
        .collect();
    let mut use_by: BTreeMap<(u32, IpAddr, IpAddr, u16), (u64, u64)> = BTreeMap::new();
    for r in inv
        .iter()
        .filter(|r| !matches!(r.state, TcpState::Listen | TcpState::NewSynRecv))
    {
        if r.remote.port() == 0 || listening.contains(&(r.netns, r.local.port())) {
            continue;
        }
        let e = use_by
            .entry((r.netns, r.local.ip(), r.remote.ip(), r.remote.port()))
            .or_insert((0, 0));
        e.0 += 1;
        if r.state == TcpState::TimeWait {
            e.1 += 1;
        }
    }
    for ((netns, laddr, raddr, rport), (in_use, tw)) in use_by {
        let Some((lo, hi)) = crate::model::system::port_range(sysctls_of(netns)) else {
            continue;
        };
        let range = (hi.saturating_sub(lo) as u64) + 1;
        if in_use < 16 {
            continue;
        }
        s.time_wait.port_headroom.push(Headroom {
            netns,
            local_addr: laddr.to_string(),
            remote_addr: raddr.to_string(),
            remote_port: rport,
            in_use,
            time_wait: tw,
            range,
            free: range.saturating_sub(in_use),
        });
    }
    s.time_wait
        .port_headroom
        .sort_by_key(|h| std::cmp::Reverse(h.in_use));
    s.time_wait.port_headroom.truncate(TOP);

    // Totals from events.
    for (i, k) in ["syn", "synack", "data", "fin"].iter().enumerate() {
        s.retransmits.insert((*k).into(), agg.totals.retrans[i]);
    }
    s.retransmitted_segments = agg.totals.retrans_segs;
    s.retransmits_not_sent = agg.totals.retrans_not_sent;
    s.resets.insert("sent".into(), agg.totals.resets_sent);
    s.resets
        .insert("received".into(), agg.totals.resets_received);
    for (e, n) in &agg.totals.errors {
        *s.errors.entry(errno_name(*e).into()).or_insert(0) += n;
    }
    s.histograms = Histograms {
        handshake_us: (&agg.handshake_us).into(),
        lifetime_ms: (&agg.lifetime_ms).into(),
    };
    let mut notable_socks: Vec<&Timeline> = agg.sockets().filter(|t| notable(t)).collect();
    notable_socks.sort_by_key(|t| std::cmp::Reverse(t.last_ns));
    s.sockets = notable_socks
        .iter()
        .take(200)
        .map(|t| socket_view(t, now))
        .collect();
    s.loss = LossView {
        kernel_dropped: input.loss.kernel_dropped,
        kernel_dropped_by_type: input
            .loss
            .kernel_dropped_by_type
            .nonzero()
            .map(|(k, n)| (k.into(), n))
            .collect(),
        kernel_skipped: input.loss.kernel_skipped,
        channel_dropped: input.loss.channel_dropped,
        decode_errors: input.loss.decode_errors
            + input
                .namespaces
                .iter()
                .map(|n| n.decode_errors)
                .sum::<u64>(),
        timelines_evicted: agg.totals.evicted,
        recorder_dropped: 0,
    };
    s.findings = findings::find(&Facts {
        agg,
        input,
        snap: &s,
        sysctls_of: &sysctls_of,
    });
    s
}
