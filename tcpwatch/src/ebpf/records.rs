//! The iterators' records decoded into model types, without allocation per field: every TCP
//! socket of a namespace from `iter/tcp`, and socket owners from `iter/task_file`.
use std::collections::HashMap;

use tcpwatch_common::{AF_INET, AF_INET6, ITER_REC_SIZE, IterRec, OWNER_REC_SIZE, OwnerRec};

use crate::model::event::{Comm, Family, Owner, OwnerSource, TcpState, socket_addr};
use crate::model::system::SockRec;
#[cfg(test)]
use crate::model::system::ss_state;

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

/// `iter/task_file` records → socket inode → owner (the first process listed keeps a socket
/// several share, as `source::procfd` does); a trailing partial record is ignored.
pub fn parse_owner_records(bytes: &[u8]) -> HashMap<u64, Owner> {
    let mut out = HashMap::with_capacity(bytes.len() / OWNER_REC_SIZE);
    for chunk in bytes.chunks_exact(OWNER_REC_SIZE) {
        // SAFETY: the length is exact; OwnerRec is plain old data.
        let r: OwnerRec = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
        if r.ino == 0 || r.tgid == 0 {
            continue;
        }
        out.entry(r.ino).or_insert(Owner {
            pid: r.tgid,
            tid: r.tgid,
            // The kernel's comm: NUL-terminated within its 16 bytes, as Comm keeps it.
            comm: Comm(r.comm),
            cgroup_id: 0,
            source: OwnerSource::Inventory,
        });
    }
    out
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

    fn owner_rec(ino: u64, tgid: u32, comm: &str) -> Vec<u8> {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        let r = OwnerRec {
            ino,
            tgid,
            _pad: 0,
            comm: c,
        };
        // SAFETY: OwnerRec is plain old data of OWNER_REC_SIZE bytes.
        unsafe { std::slice::from_raw_parts((&r as *const OwnerRec).cast::<u8>(), OWNER_REC_SIZE) }
            .to_vec()
    }

    #[test]
    fn owner_records_decode_first_holder_wins_partial_ignored() {
        let mut b = owner_rec(7, 100, "nginx");
        b.extend(owner_rec(7, 200, "worker"));
        b.extend(owner_rec(8, 300, "fifteen-chars-c"));
        b.extend(owner_rec(0, 1, "zero-inode"));
        b.extend_from_slice(&owner_rec(9, 400, "cut")[..20]);
        let m = parse_owner_records(&b);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[&7].pid, m[&7].comm.to_string_lossy()),
            (100, "nginx".into())
        );
        assert_eq!(m[&8].comm.to_string_lossy(), "fifteen-chars-c");
    }
}
