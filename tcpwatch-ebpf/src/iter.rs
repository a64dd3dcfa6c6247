//! Iterators. `iter/tcp`: the inventory of every TCP socket of the reader's network namespace
//! (full, timewait and request sockets), one fixed-size record each. `iter/bpf_sk_storage_map`
//! over LISTEN_SK: the listeners of every namespace, for the queue sampler. `iter/task_file`: every
//! socket file of every process, so owners need no readlink per descriptor in /proc. aya-ebpf
//! has no `#[iter]` macro; the section name is all aya's loader needs.
use core::ffi::c_void;

use aya_ebpf::{
    Global,
    helpers::generated::{bpf_seq_write, bpf_skc_to_tcp_sock},
    macros::map,
    maps::Array,
};
use tcpwatch_common::{AF_INET6, IterRec, OwnerRec, tcp_state};

use crate::common::{
    OFF_INET_SPORT, OFF_NET_NS_INUM, OFF_SKC_DADDR, OFF_SKC_DPORT, OFF_SKC_FAMILY, OFF_SKC_NET,
    OFF_SKC_RCV_SADDR, OFF_SKC_V6_DADDR, OFF_SKC_V6_RCV_SADDR, cookie_of, mark_listener, rd,
};
use crate::signals::{
    OFF_ICSK_QLEN, OFF_SK_ACK_BACKLOG, OFF_SK_MAX_ACK_BACKLOG, OFF_SKC_NUM, OFF_SKC_STATE,
};
use crate::timewait::OFF_TW_SUBSTATE;

#[unsafe(no_mangle)]
static OFF_SK_DROPS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_SOCKET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SOCKET_INODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_INODE_INO: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_ICSK_YOUNG: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TCP_MSTAMP: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_ICSK_RETRANSMITS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_ICSK_PROBES_OUT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_REQ_LISTENER: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
static OFF_FILE_INODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_INODE_MODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TASK_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TASK_COMM: Global<u32> = Global::new(0);

/// Bit 0 set: only listeners (the fast path of the 4 Hz queue sampler).
#[map]
static ITER_MODE: Array<u32> = Array::with_max_entries(1, 0);

#[repr(C)]
pub struct BpfIterMeta {
    seq: *mut c_void,
}

#[repr(C)]
pub struct BpfIterTcp {
    meta: *const BpfIterMeta,
    sk_common: *const c_void,
    uid: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn dump_tcp(ctx: *const BpfIterTcp) -> i32 {
    // SAFETY: the kernel passes a valid iterator context whose `meta` points to live iterator
    // metadata; the verifier checks these loads against `struct bpf_iter__tcp`.
    let (seq, skc, uid) = unsafe { ((*(*ctx).meta).seq, (*ctx).sk_common, (*ctx).uid) };
    if skc.is_null() {
        return 0;
    }
    let s = skc as u64;
    let state: u8 = rd(s, OFF_SKC_STATE.load());
    let listeners_only = ITER_MODE.get(0).is_some_and(|m| *m & 1 != 0);
    if listeners_only && state != tcp_state::LISTEN {
        // The iterator walks the listening hash first: the first other socket means all
        // listeners were seen. 1 ends the walk (read returns EAGAIN) instead of visiting every
        // established and timewait socket four times a second.
        return 1;
    }
    if state == tcp_state::LISTEN {
        // A listener from before start: from now on the sampler finds it in LISTEN_SK.
        // SAFETY: the helper checks that `skc` is a full TCP socket and returns null if not.
        let sk = unsafe { bpf_skc_to_tcp_sock(skc as *mut c_void) };
        if !sk.is_null() {
            mark_listener(sk as *const c_void);
        }
    }
    let mut r = record(skc, state);
    r.uid = uid;
    write(seq, &r);
    0
}

#[repr(C)]
pub struct BpfIterSkStorage {
    meta: *const BpfIterMeta,
    map: *const c_void,
    sk: *const c_void,
    value: *mut c_void,
}

/// The listeners marked in LISTEN_SK, of every namespace: the same records as `dump_tcp`
/// gives for them. A socket marked once that no longer listens is skipped.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub extern "C" fn dump_listeners(ctx: *const BpfIterSkStorage) -> i32 {
    // SAFETY: as in `dump_tcp`, for `struct bpf_iter__bpf_sk_storage_map`.
    let (seq, sk) = unsafe { ((*(*ctx).meta).seq, (*ctx).sk) };
    if sk.is_null() {
        return 0;
    }
    let state: u8 = rd(sk as u64, OFF_SKC_STATE.load());
    if state == tcp_state::LISTEN {
        write(seq, &record(sk, state));
    }
    0
}

#[inline(always)]
fn write(seq: *mut c_void, r: &IterRec) {
    // SAFETY: `seq` is the iterator's seq_file from its context; the helper copies
    // `size_of::<IterRec>()` bytes from `r`, which has them.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            r as *const IterRec as *const c_void,
            core::mem::size_of::<IterRec>() as u32,
        )
    };
}

/// One socket's record; `skc` is its `sock_common` (full, timewait or request socket).
#[inline(always)]
fn record(skc: *const c_void, state: u8) -> IterRec {
    let s = skc as u64;
    let mut r = IterRec {
        skaddr: s,
        state,
        ..IterRec::default()
    };
    r.cookie = cookie_of(skc);
    let family: u16 = rd(s, OFF_SKC_FAMILY.load());
    r.family = family as u8;
    r.dport = u16::from_be(rd(s, OFF_SKC_DPORT.load()));
    let net: u64 = rd(s, OFF_SKC_NET.load());
    if net != 0 {
        r.netns = rd(net, OFF_NET_NS_INUM.load());
    }
    if r.family == AF_INET6 {
        r.saddr = rd(s, OFF_SKC_V6_RCV_SADDR.load());
        r.daddr = rd(s, OFF_SKC_V6_DADDR.load());
    } else {
        let a: [u8; 4] = rd(s, OFF_SKC_RCV_SADDR.load());
        let b: [u8; 4] = rd(s, OFF_SKC_DADDR.load());
        r.saddr[..4].copy_from_slice(&a);
        r.daddr[..4].copy_from_slice(&b);
    }
    match state {
        // Timewait and request sockets share only sock_common with full sockets.
        tcp_state::TIME_WAIT => {
            r.sport = rd(s, OFF_SKC_NUM.load());
            r.substate = rd(s, OFF_TW_SUBSTATE.load());
        }
        tcp_state::NEW_SYN_RECV => {
            r.sport = rd(s, OFF_SKC_NUM.load());
            r.listener = rd(s, OFF_REQ_LISTENER.load());
        }
        _ => {
            r.sport = u16::from_be(rd(s, OFF_INET_SPORT.load()));
            let sock: u64 = rd(s, OFF_SK_SOCKET.load());
            if sock != 0 {
                r.ino = rd(sock + OFF_SOCKET_INODE.load() as u64, OFF_INODE_INO.load());
            }
            r.last_pkt_us = rd(s, OFF_TCP_MSTAMP.load());
            r.retransmits = rd::<u8>(s, OFF_ICSK_RETRANSMITS.load()) as u16;
            r.probes = rd::<u8>(s, OFF_ICSK_PROBES_OUT.load()) as u16;
            if state == tcp_state::LISTEN {
                r.ack_backlog = rd(s, OFF_SK_ACK_BACKLOG.load());
                r.max_ack_backlog = rd(s, OFF_SK_MAX_ACK_BACKLOG.load());
                r.syn_qlen = rd(s, OFF_ICSK_QLEN.load());
                r.syn_young = rd(s, OFF_ICSK_YOUNG.load());
                r.drops = rd(s, OFF_SK_DROPS.load());
            }
        }
    }
    r
}

#[repr(C)]
pub struct BpfIterTaskFile {
    meta: *const BpfIterMeta,
    task: *const c_void,
    fd: u32,
    file: *const c_void,
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// One record per socket file per process (threads sharing the file table are visited once).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn dump_task_file(ctx: *const BpfIterTaskFile) -> i32 {
    // SAFETY: as in `dump_tcp`, for `struct bpf_iter__task_file`.
    let (seq, task, file) = unsafe { ((*(*ctx).meta).seq, (*ctx).task, (*ctx).file) };
    if task.is_null() || file.is_null() {
        return 0;
    }
    let inode: u64 = rd(file as u64, OFF_FILE_INODE.load());
    if inode == 0 {
        return 0;
    }
    let mode: u16 = rd(inode, OFF_INODE_MODE.load());
    if mode & S_IFMT != S_IFSOCK {
        return 0;
    }
    let r = OwnerRec {
        ino: rd(inode, OFF_INODE_INO.load()),
        tgid: rd(task as u64, OFF_TASK_TGID.load()),
        _pad: 0,
        comm: rd(task as u64, OFF_TASK_COMM.load()),
    };
    // SAFETY: as in `write`: the iterator's seq_file, and a whole `OwnerRec` on the stack.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            &r as *const OwnerRec as *const c_void,
            core::mem::size_of::<OwnerRec>() as u32,
        )
    };
    0
}
