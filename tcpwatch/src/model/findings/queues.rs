//! Listener queues: accept queues that overflowed or are full right now, and SYN queues that
//! dropped SYNs or answered them with cookies — each named by its listener (and, within an
//! SO_REUSEPORT group, by the member's owner), with what the kernel did about it.
use super::catalogue::{Finding, FindingId, Severity};
use super::facts::Facts;
use crate::model::snapshot::views::{ListenerView, endpoint};

pub(super) fn listeners(f: &Facts<'_>, out: &mut Vec<Finding>) {
    let final_ack_hook = f
        .input
        .hooks
        .iter()
        .any(|h| h.signal == "accept overflow at final ACK" && h.hook.is_some());
    for l in &f.snap.listeners {
        // The kernel refuses new handshakes while the accept queue is full.
        let full_now = l.accept_queue.is_full();
        if l.overflows.accept + l.overflows.syn + l.overflows.syncookies == 0 && !full_now {
            continue;
        }
        let name = member_name(l, &f.snap.listeners);
        if l.overflows.accept > 0 || full_now {
            accept_queue(f, l, &name, final_ack_hook, out);
        }
        if l.overflows.syn > 0 || l.overflows.syncookies > 0 {
            syn_queue(f, l, &name, out);
        }
    }
}

/// One member of an SO_REUSEPORT group can overflow while the others keep up (a stuck
/// worker): say which socket of how many, the owner names it.
fn member_name(l: &ListenerView, all: &[ListenerView]) -> String {
    let group = all
        .iter()
        .filter(|o| (o.netns, o.port, &o.addr) == (l.netns, l.port, &l.addr))
        .count();
    if group > 1 {
        format!(
            "{} (one of {group} SO_REUSEPORT sockets)",
            endpoint(&l.addr, l.port)
        )
    } else {
        endpoint(&l.addr, l.port)
    }
}

fn accept_queue(
    f: &Facts<'_>,
    l: &ListenerView,
    name: &str,
    final_ack_hook: bool,
    out: &mut Vec<Finding>,
) {
    let sc = (f.sysctls_of)(l.netns);
    let somaxconn: Option<u32> = sc.get("net.core.somaxconn").and_then(|v| v.parse().ok());
    let limit = match somaxconn {
        Some(m) if l.accept_queue.max >= m => format!(
            "the accept queue limit {} is net.core.somaxconn ({m}), which capped the application's listen() backlog",
            l.accept_queue.max
        ),
        Some(m) => format!(
            "the accept queue limit {} is the application's listen() backlog (net.core.somaxconn is {m}); the kernel holds limit + 1",
            l.accept_queue.max
        ),
        None => format!("the accept queue limit is {}", l.accept_queue.max),
    };
    // What the kernel does depends on which packet met the full queue: a SYN is always
    // dropped (the client retries it); a final ACK is dropped or reset.
    let reaction = match sc.get("net.ipv4.tcp_abort_on_overflow").map(String::as_str) {
        Some("1") => {
            "a final ACK that finds it full is answered with a RST (tcp_abort_on_overflow = 1): the client's connect() has succeeded and its first read or write fails with ECONNRESET"
        }
        Some(_) => {
            "a final ACK that finds it full is dropped (tcp_abort_on_overflow = 0): the client believes it is connected while the server retransmits its SYN-ACK until the queue has room"
        }
        None => {
            "a final ACK that finds it full is dropped, or reset where tcp_abort_on_overflow = 1"
        }
    };
    let cause = format!(
        "the application does not call accept() fast enough; {limit}. A SYN that finds the queue full is dropped and the client retransmits it; {reaction}"
    );
    if l.overflows.accept > 0 {
        // Final ACKs are seen one by one where the kernel has the hook; the rest of the
        // listener's drops are then SYNs.
        let split = if final_ack_hook {
            let acks = l.overflows.final_ack_packets.min(l.overflows.accept);
            format!(
                ": {} SYN(s), {acks} final ACK(s)",
                l.overflows.accept - acks
            )
        } else {
            String::new()
        };
        out.push(f.finding(
            FindingId::AcceptQueueOverflow,
            Severity::Critical,
            l.netns,
            format!(
                "listener {name} dropped {} handshake packet(s) with its accept queue full (peak {}/{}){split}",
                l.overflows.accept, l.accept_queue.peak, l.accept_queue.max
            ),
            cause,
            l.owner.clone(),
            l.overflows.accept,
            vec![endpoint(&l.addr, l.port)],
        ));
    } else {
        // Nothing dropped while watching (or nothing watched: a plain snapshot), but the
        // queue is full this instant and the socket's own drop counter says whether it has
        // been refusing connections before.
        let before = if l.drops > 0 {
            format!(
                "; it has dropped {} packet(s) since it started listening",
                l.drops
            )
        } else {
            String::new()
        };
        out.push(f.finding(
            FindingId::AcceptQueueFull,
            if l.drops > 0 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            l.netns,
            format!(
                "listener {name} has a full accept queue now ({}/{}): new SYNs are dropped until it accepts{before}",
                l.accept_queue.now, l.accept_queue.max
            ),
            cause,
            l.owner.clone(),
            u64::from(l.accept_queue.now),
            vec![endpoint(&l.addr, l.port)],
        ));
    }
}

fn syn_queue(f: &Facts<'_>, l: &ListenerView, name: &str, out: &mut Vec<Finding>) {
    let (what, sev) = if l.overflows.syn > 0 {
        (
            format!(
                "listener {name} dropped {} SYN(s): its SYN queue was full (peak {}/{})",
                l.overflows.syn, l.syn_queue.peak, l.syn_queue.max
            ),
            Severity::Critical,
        )
    } else {
        (
            format!(
                "listener {name} answered {} SYN(s) with syncookies: its SYN queue was full",
                l.overflows.syncookies
            ),
            Severity::Warning,
        )
    };
    out.push(f.finding(
        FindingId::SynQueueOverflow,
        sev,
        l.netns,
        what,
        "handshakes do not complete (final ACKs lost, a SYN flood, or slow clients) and requests pile up in the SYN queue".into(),
        l.owner.clone(),
        l.overflows.syn + l.overflows.syncookies,
        vec![endpoint(&l.addr, l.port)],
    ));
}
