//! The socket inventory: every TCP socket of a namespace from `iter/tcp` records (decoded here,
//! without allocation per field), with owners joined from /proc/*/fd.
use std::net::SocketAddr;

use tcpwatch_common::{AF_INET, AF_INET6, ITER_REC_SIZE, IterRec};

use crate::model::event::{Family, Owner, TcpState, socket_addr};

/// One socket as the kernel listed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SockRec {
    pub skaddr: u64,
    pub cookie: u64,
    pub netns: u32,
    pub family: Family,
    pub state: TcpState,
    /// Timewait sockets: FIN_WAIT2 or TIME_WAIT.
    pub substate: Option<TcpState>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub ino: u64,
    pub uid: u32,
    /// Request sockets: the listener whose SYN queue holds them.
    pub listener: u64,
    pub accept_queue: u32,
    pub accept_max: u32,
    pub syn_queue: u32,
    pub syn_young: u32,
    pub drops: u32,
    pub retransmits: u16,
    pub probes: u16,
    /// Full sockets: CLOCK_MONOTONIC time of the last packet, ns (0 unknown).
    pub last_pkt_ns: u64,
    pub owner: Option<Owner>,
}

/// A test record: a socket of `state` in `netns` between `local` and `remote`, the rest zero.
#[cfg(test)]
pub fn test_rec(state: TcpState, netns: u32, local: SocketAddr, remote: SocketAddr) -> SockRec {
    SockRec {
        skaddr: 0,
        cookie: 0,
        netns,
        family: if local.is_ipv4() {
            Family::Inet
        } else {
            Family::Inet6
        },
        state,
        substate: None,
        local,
        remote,
        ino: 0,
        uid: 0,
        listener: 0,
        accept_queue: 0,
        accept_max: 0,
        syn_queue: 0,
        syn_young: 0,
        drops: 0,
        retransmits: 0,
        probes: 0,
        last_pkt_ns: 0,
        owner: None,
    }
}

/// Decodes the iterator's output (a concatenation of fixed-size records); a short tail or an
/// unknown state is skipped and counted.
pub fn parse(bytes: &[u8]) -> (Vec<SockRec>, usize) {
    let mut out = Vec::with_capacity(bytes.len() / ITER_REC_SIZE);
    let mut bad = 0;
    for chunk in bytes.chunks(ITER_REC_SIZE) {
        if chunk.len() != ITER_REC_SIZE {
            bad += 1;
            continue;
        }
        // SAFETY: the length is checked; IterRec is plain old data.
        let r: IterRec = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
        match decode(&r) {
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (out, bad)
}

fn decode(r: &IterRec) -> Option<SockRec> {
    let family = match r.family {
        AF_INET => Family::Inet,
        AF_INET6 => Family::Inet6,
        _ => return None,
    };
    let state = TcpState::from_kernel(r.state)?;
    Some(SockRec {
        skaddr: r.skaddr,
        cookie: r.cookie,
        netns: r.netns,
        family,
        state,
        substate: (state == TcpState::TimeWait)
            .then(|| TcpState::from_kernel(r.substate))
            .flatten(),
        local: socket_addr(family, &r.saddr, r.sport),
        remote: socket_addr(family, &r.daddr, r.dport),
        ino: r.ino,
        uid: r.uid,
        listener: r.listener,
        accept_queue: r.ack_backlog,
        accept_max: r.max_ack_backlog,
        syn_queue: r.syn_qlen,
        syn_young: r.syn_young,
        drops: r.drops,
        retransmits: r.retransmits,
        probes: r.probes,
        last_pkt_ns: r.last_pkt_us.saturating_mul(1000),
        owner: None,
    })
}

/// The state `ss` would print: a timewait socket in its FIN_WAIT2 substate shows as FIN-WAIT-2,
/// a request socket as SYN-RECV.
pub fn ss_state(s: &SockRec) -> TcpState {
    match (s.state, s.substate) {
        (TcpState::TimeWait, Some(sub)) => sub,
        (TcpState::NewSynRecv, _) => TcpState::SynRecv,
        (st, _) => st,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: u8) -> IterRec {
        let mut r = IterRec {
            skaddr: 0xffff1,
            cookie: 5,
            netns: 7,
            family: AF_INET,
            state,
            ..IterRec::default()
        };
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        r.sport = 8080;
        r.dport = 40000;
        r
    }

    fn bytes(rs: &[IterRec]) -> Vec<u8> {
        let mut v = Vec::new();
        for r in rs {
            // SAFETY: IterRec is plain old data.
            let b = unsafe {
                std::slice::from_raw_parts((r as *const IterRec).cast::<u8>(), ITER_REC_SIZE)
            };
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn decodes_records_and_skips_garbage() {
        let mut tw = rec(6);
        tw.substate = 5;
        let mut l = rec(10);
        l.ack_backlog = 3;
        l.max_ack_backlog = 2;
        l.syn_qlen = 1;
        l.drops = 9;
        let mut buf = bytes(&[rec(1), tw, l, rec(0)]);
        buf.extend_from_slice(&[1, 2, 3]);
        let (socks, bad) = parse(&buf);
        assert_eq!(bad, 2, "state 0 and a short tail");
        assert_eq!(socks.len(), 3);
        assert_eq!(socks[0].state, TcpState::Established);
        assert_eq!(socks[0].local.to_string(), "127.0.0.1:8080");
        assert_eq!(socks[0].remote.to_string(), "10.0.0.2:40000");
        assert_eq!(ss_state(&socks[1]), TcpState::FinWait2);
        assert_eq!(
            (
                socks[2].accept_queue,
                socks[2].accept_max,
                socks[2].syn_queue,
                socks[2].drops
            ),
            (3, 2, 1, 9)
        );
    }
}
