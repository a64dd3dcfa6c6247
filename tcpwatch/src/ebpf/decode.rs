//! Wire records (`tcpwatch_common::RawEvent`: a shared header, then the kind's typed payload)
//! to model events: bounds-checked, allocation-free, never panics on garbage.
use tcpwatch_common::{
    AF_INET, AF_INET6, RAW_EVENT_SIZE, RawEvent, ResetArgs, RetransmitArgs, flags, kind, tcp_state,
};

use crate::model::event::{
    Comm, Event, EventKind, Family, OverflowAction, OverflowSource, Owner, OwnerSource, Queue,
    RetransmitKind, TcpState, TwOp, socket_addr,
};

/// TCP header flag bits as the kernel keeps them in `tcp_skb_cb.tcp_flags`.
pub const TCPHDR_FIN: u16 = 0x01;
pub const TCPHDR_SYN: u16 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {RAW_EVENT_SIZE}")]
    Size(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("unknown TCP state {0}")]
    State(u8),
}

/// Reads a raw record from ring-buffer bytes.
pub fn raw_from_bytes(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() != RAW_EVENT_SIZE {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length is checked; RawEvent is plain old data with no invalid bit patterns.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) })
}

/// Decodes ring-buffer bytes into an event.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    decode_raw(&raw_from_bytes(bytes)?)
}

fn state(v: u8) -> Result<TcpState, DecodeError> {
    TcpState::from_kernel(v).ok_or(DecodeError::State(v))
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// Retransmit kind: the skb's own flags when the kernel could read them, else the state.
fn retransmit_kind(state: u8, tcp_flags: u16) -> RetransmitKind {
    if tcp_flags & RetransmitArgs::FLAGS_VALID != 0 {
        if tcp_flags & TCPHDR_SYN != 0 {
            return RetransmitKind::Syn;
        }
        if tcp_flags & TCPHDR_FIN != 0 {
            return RetransmitKind::Fin;
        }
        return RetransmitKind::Data;
    }
    match state {
        tcp_state::SYN_SENT => RetransmitKind::Syn,
        tcp_state::FIN_WAIT1 | tcp_state::CLOSING | tcp_state::LAST_ACK => RetransmitKind::Fin,
        _ => RetransmitKind::Data,
    }
}

pub fn decode_raw(r: &RawEvent) -> Result<Event, DecodeError> {
    let family = match r.family {
        AF_INET => Family::Inet,
        AF_INET6 => Family::Inet6,
        other => return Err(DecodeError::Family(other)),
    };
    let p = &r.payload;
    let kind = match r.kind {
        kind::STATE => EventKind::State {
            old: state(r.old_state)?,
            new: state(r.new_state)?,
            prev_state_ns: nonzero(r.dur_ns),
        },
        kind::RETRANSMIT => {
            let a = p.retransmit();
            EventKind::Retransmit {
                kind: retransmit_kind(r.new_state, a.tcp_flags),
                state: TcpState::from_kernel(r.new_state),
                nth: a.nth,
                interval_ns: nonzero(r.dur_ns),
                err: a.err,
                segs: u32::from(a.segs),
                accept_queue: None,
                syn_queue: None,
            }
        }
        kind::SYNACK_RETRANSMIT => {
            let a = p.synack();
            EventKind::Retransmit {
                kind: RetransmitKind::SynAck,
                state: Some(TcpState::SynRecv),
                nth: a.num_retrans.saturating_add(1),
                interval_ns: nonzero(r.dur_ns),
                err: 0,
                segs: 1,
                accept_queue: Some(a.accept_queue),
                syn_queue: Some(a.syn_queue),
            }
        }
        kind::RESET_SENT | kind::RESET_RECEIVED => {
            let a = p.reset();
            EventKind::Reset {
                sent: r.kind == kind::RESET_SENT,
                state: TcpState::from_kernel(r.new_state),
                reason: (a.reason != ResetArgs::NO_REASON).then_some(a.reason),
            }
        }
        kind::SOCK_ERROR => EventKind::SockError {
            errno: p.error().errno,
        },
        kind::TW_START
        | kind::TW_CANCEL
        | kind::TW_EXPIRE
        | kind::TW_REARM
        | kind::TW_DESCHEDULE => EventKind::TwTimer {
            op: match r.kind {
                kind::TW_START => TwOp::Start,
                kind::TW_CANCEL => TwOp::Cancel,
                kind::TW_REARM => TwOp::Rearm,
                kind::TW_DESCHEDULE => TwOp::Deschedule,
                _ => TwOp::Expire,
            },
            substate: TcpState::from_kernel(r.new_state),
            kworker: p.timer().kworker != 0,
        },
        kind::LISTEN_OVERFLOW => {
            let a = p.overflow();
            EventKind::Overflow {
                queue: Queue::Accept,
                len: Some(a.accept_queue),
                max: Some(a.accept_max),
                count: 1,
                source: OverflowSource::Packet,
                action: OverflowAction::Dropped,
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let owner = (r.flags & flags::OWNER_KNOWN != 0).then_some(Owner {
        pid: r.pid,
        tid: r.tid,
        comm: Comm(r.comm),
        cgroup_id: r.cgroup_id,
        source: if r.flags & flags::OWNER_FROM_LISTENER != 0 {
            OwnerSource::Listener
        } else {
            OwnerSource::Task
        },
    });
    Ok(Event {
        ts_ns: r.ts_ns,
        cookie: r.cookie,
        skaddr: r.skaddr,
        netns: r.netns,
        family,
        local: socket_addr(family, &r.saddr, r.sport),
        remote: socket_addr(family, &r.daddr, r.dport),
        owner,
        softirq: r.flags & flags::SOFTIRQ != 0,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's SYN_SENT -> ESTABLISHED on 127.0.0.1:40000 -> 127.0.0.1:8080, owned by
    /// pid 4242 "curl", as the kernel writes it (little-endian, field by field).
    fn golden_state() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1_000_000_123u64.to_le_bytes()); // ts_ns
        b.extend_from_slice(&77u64.to_le_bytes()); // cookie
        b.extend_from_slice(&0xffff_8880_1234_5678u64.to_le_bytes()); // skaddr
        b.extend_from_slice(&5_000u64.to_le_bytes()); // dur_ns
        b.extend_from_slice(&9u64.to_le_bytes()); // cgroup_id
        b.extend_from_slice(&0u64.to_le_bytes()); // aux_addr
        b.extend_from_slice(&4026531840u32.to_le_bytes()); // netns
        b.extend_from_slice(&4242u32.to_le_bytes()); // pid
        b.extend_from_slice(&4243u32.to_le_bytes()); // tid
        b.extend_from_slice(&1u32.to_le_bytes()); // ctx_pid
        b.extend_from_slice(&[
            kind::STATE,
            AF_INET,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
        ]);
        b.extend_from_slice(&40000u16.to_le_bytes());
        b.extend_from_slice(&8080u16.to_le_bytes());
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        b.extend_from_slice(&a);
        b.extend_from_slice(&a);
        b.extend_from_slice(b"curl\0\0\0\0\0\0\0\0\0\0\0\0");
        b.extend_from_slice(
            &(flags::OWNER_KNOWN | flags::SOFTIRQ | flags::HAS_COOKIE).to_le_bytes(),
        );
        b.extend_from_slice(&[0u8; 12]); // payload (none for a transition)
        b
    }

    #[test]
    fn golden_state_record() {
        let bytes = golden_state();
        assert_eq!(bytes.len(), RAW_EVENT_SIZE);
        let ev = decode(&bytes).unwrap();
        assert_eq!(ev.ts_ns, 1_000_000_123);
        assert_eq!(ev.cookie, 77);
        assert_eq!(ev.netns, 4026531840);
        assert_eq!(ev.local.to_string(), "127.0.0.1:40000");
        assert_eq!(ev.remote.to_string(), "127.0.0.1:8080");
        assert!(ev.softirq);
        assert_eq!(
            ev.kind,
            EventKind::State {
                old: TcpState::SynSent,
                new: TcpState::Established,
                prev_state_ns: Some(5_000)
            }
        );
        let owner = ev.owner.unwrap();
        assert_eq!(
            (owner.pid, owner.tid, owner.source),
            (4242, 4243, OwnerSource::Task)
        );
        assert_eq!(owner.comm.as_bytes(), b"curl");
        assert_eq!(owner.cgroup_id, 9);
    }

    #[test]
    fn ipv6_record() {
        let mut bytes = golden_state();
        bytes[65] = AF_INET6;
        let mut a = [0u8; 16];
        a[15] = 1;
        bytes[72..88].copy_from_slice(&a);
        bytes[88..104].copy_from_slice(&a);
        let ev = decode(&bytes).unwrap();
        assert_eq!(ev.family, Family::Inet6);
        assert_eq!(ev.local.to_string(), "[::1]:40000");
    }

    #[test]
    fn truncated_and_oversized_records_are_errors() {
        let bytes = golden_state();
        assert_eq!(decode(&bytes[..100]), Err(DecodeError::Size(100)));
        assert_eq!(decode(&[]), Err(DecodeError::Size(0)));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::Size(RAW_EVENT_SIZE + 1)));
    }

    #[test]
    fn unknown_kind_family_and_state_are_errors() {
        let mut b = golden_state();
        b[64] = 200;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(200)));
        let mut b = golden_state();
        b[65] = 1;
        assert_eq!(decode(&b), Err(DecodeError::Family(1)));
        let mut b = golden_state();
        b[67] = 0;
        assert_eq!(decode(&b), Err(DecodeError::State(0)));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..10_000 {
            let mut b = [0u8; RAW_EVENT_SIZE];
            for x in b.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *x = seed as u8;
            }
            let _ = decode(&b);
        }
    }

    #[test]
    fn owner_absent_without_flag_and_listener_source() {
        let mut b = golden_state();
        b[120..124].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&b).unwrap().owner, None);
        b[120..124]
            .copy_from_slice(&(flags::OWNER_KNOWN | flags::OWNER_FROM_LISTENER).to_le_bytes());
        assert_eq!(
            decode(&b).unwrap().owner.unwrap().source,
            OwnerSource::Listener
        );
    }

    #[test]
    fn retransmit_kind_prefers_skb_flags() {
        assert_eq!(retransmit_kind(tcp_state::SYN_SENT, 0), RetransmitKind::Syn);
        assert_eq!(
            retransmit_kind(tcp_state::ESTABLISHED, 0),
            RetransmitKind::Data
        );
        assert_eq!(retransmit_kind(tcp_state::LAST_ACK, 0), RetransmitKind::Fin);
        // Data still unacknowledged when FIN_WAIT1 began is data, not FIN.
        assert_eq!(
            retransmit_kind(tcp_state::FIN_WAIT1, RetransmitArgs::FLAGS_VALID | 0x10),
            RetransmitKind::Data
        );
        assert_eq!(
            retransmit_kind(
                tcp_state::FIN_WAIT1,
                RetransmitArgs::FLAGS_VALID | TCPHDR_FIN | 0x10
            ),
            RetransmitKind::Fin
        );
    }
}
