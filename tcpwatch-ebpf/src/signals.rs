//! Retransmits (data, SYN, FIN, SYN-ACK), resets sent and received, socket errors and
//! accept-queue overflows: all from raw BTF tracepoints with typed socket pointers.
use core::ffi::c_void;

use aya_ebpf::{
    Global,
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use tcpwatch_common::{
    ErrorArgs, OverflowArgs, Payload, ResetArgs, RetransmitArgs, SockInfo, SynAckArgs, flags, kind,
    tcp_state,
};

use crate::common::{
    AddrSrc, IPPROTO_TCP, Meta, OFF_NET_NS_INUM, OFF_SK_PROTOCOL, OFF_SKC_DPORT, OFF_SKC_FAMILY,
    OFF_SKC_NET, OFF_TP_TOTAL_RETRANS, Side, cookie_of, current, emit, in_softirq, ld, now_ns, rd,
    sk_info, sk_info_get, sock_meta_btf,
};

#[unsafe(no_mangle)]
pub static OFF_SKC_STATE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_NUM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_ERR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_ACK_BACKLOG: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_MAX_ACK_BACKLOG: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_ICSK_QLEN: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_HEAD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_NETWORK_HEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_TRANSPORT_HEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_DEV: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_NETDEV_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_CB: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TCB_TCP_FLAGS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TCB_GSO_SEGS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_REQ_NUM_RETRANS: Global<u32> = Global::new(0);
/// Drop-reason numbers, resolved from the kernel's `enum skb_drop_reason` (never hard-coded;
/// `u32::MAX` when this kernel does not have the reason).
#[unsafe(no_mangle)]
static REASON_LISTEN_OVERFLOW: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static REASON_NO_SOCKET: Global<u32> = Global::new(u32::MAX);

/// Last SYN-ACK retransmit per request socket, for the interval between them.
#[map]
static REQ_LAST: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65_536, 0);

/// Common part of events about a full socket in task or softirq context.
#[inline(always)]
fn sock_event(kind: u8, sk: *const c_void) -> Meta {
    let mut m = Meta::new(kind);
    m.ts_ns = now_ns();
    m.skaddr = sk as u64;
    m.cookie = cookie_of(sk);
    m.flags = flags::HAS_COOKIE;
    m.ctx_pid = current().pid;
    if in_softirq() {
        m.flags |= flags::SOFTIRQ;
    }
    sock_meta_btf(sk, &mut m);
    m.new_state = ld::<u8>(sk, OFF_SKC_STATE.load());
    m
}

#[inline(always)]
fn is_tcp(sk: *const c_void) -> bool {
    ld::<u16>(sk, OFF_SK_PROTOCOL.load()) == IPPROTO_TCP
}

// tcp_retransmit_skb gained its `err` argument in 6.10; a program reading it does not load on
// older kernels, where the two-argument variant is used.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retrans_btf(ctx: BtfTracePointContext) -> i32 {
    try_retrans_btf(&ctx).unwrap_or(0)
}

fn try_retrans_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let err: i32 = ctx.arg(2);
    Ok(retransmit(ctx, err))
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retrans_btf_noerr(ctx: BtfTracePointContext) -> i32 {
    try_retrans_btf_noerr(&ctx).unwrap_or(0)
}

fn try_retrans_btf_noerr(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    Ok(retransmit(ctx, 0))
}

#[inline(always)]
fn retransmit(ctx: &BtfTracePointContext, err: i32) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let skb: *const c_void = ctx.arg(1);
    let mut m = sock_event(kind::RETRANSMIT, sk);
    let cb = skb as u64 + OFF_SKB_CB.load() as u64;
    let tcp_flags: u16 = rd(cb, OFF_TCB_TCP_FLAGS.load());
    let (off_segs, off_total) = (OFF_TCB_GSO_SEGS.load(), OFF_TP_TOTAL_RETRANS.load());
    let pcount: u16 = if off_segs != 0 { rd(cb, off_segs) } else { 1 };
    let info = sk_info(sk);
    // Segments the kernel added to RetransSegs for this attempt: the socket's total_retrans
    // grew by exactly that. Without a baseline (a socket not seen since start) the skb's own
    // count, unless the error is one of those __tcp_retransmit_skb gives up with before
    // counting (since 6.10 the hook fires for them too: -EBUSY still in the host queue,
    // -EAGAIN beyond the window, -ENOMEM, -EINVAL, -EHOSTUNREACH no route); a send that
    // failed below TCP (-EPERM from a firewall, -ENOBUFS) was counted.
    let early = matches!(err, -16 | -11 | -12 | -22 | -113);
    let mut segs = if early { 0 } else { pcount.max(1) as u32 };
    if let Some(i) = info.filter(|_| off_total != 0) {
        let total: u32 = rd(sk as u64, off_total);
        // SAFETY: `i` is this socket's storage value, alive with the socket.
        unsafe {
            let base = (*i).segs_base;
            if base != 0 && total >= base - 1 && total - (base - 1) <= 0xffff {
                segs = total - (base - 1);
            }
            (*i).segs_base = total.wrapping_add(1);
        }
    }
    let mut args = RetransmitArgs {
        tcp_flags: (tcp_flags & 0xff) | RetransmitArgs::FLAGS_VALID,
        segs: segs.min(0xffff) as u16,
        nth: 0,
        err,
    };
    if let Some(i) = info {
        // SAFETY: `i` is this socket's storage value, valid while the program runs; the
        // socket is locked or in softirq, so no other program writes it concurrently on
        // another CPU for the same socket.
        unsafe {
            // The count and the interval are of retransmits the kernel made, not attempts.
            if segs > 0 {
                (*i).retrans += 1;
                let last = (*i).last_retrans_ts_ns;
                if last != 0 {
                    m.dur_ns = m.ts_ns - last;
                }
                (*i).last_retrans_ts_ns = m.ts_ns;
            }
            args.nth = (*i).retrans;
        }
    }
    m.payload = Payload { retransmit: args };
    emit(
        &m,
        &AddrSrc::sock(sk as u64),
        info.map_or(core::ptr::null(), |p| p as *const SockInfo),
    );
    0
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn synack_btf(ctx: BtfTracePointContext) -> i32 {
    try_synack_btf(&ctx).unwrap_or(0)
}

fn try_synack_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let listener: *const c_void = ctx.arg(0);
    let req: *const c_void = ctx.arg(1);
    let mut m = Meta::new(kind::SYNACK_RETRANSMIT);
    m.ts_ns = now_ns();
    m.skaddr = listener as u64;
    m.aux_addr = req as u64;
    m.cookie = cookie_of(listener);
    m.flags = flags::HAS_COOKIE;
    m.ctx_pid = current().pid;
    if in_softirq() {
        m.flags |= flags::SOFTIRQ;
    }
    // The request's own 4-tuple; skc_num is its local port in host order.
    let r = req as u64;
    let family: u16 = rd(r, OFF_SKC_FAMILY.load());
    m.family = family as u8;
    m.sport = rd(r, OFF_SKC_NUM.load());
    m.dport = u16::from_be(rd(r, OFF_SKC_DPORT.load()));
    let net: u64 = rd(r, OFF_SKC_NET.load());
    m.netns = if net != 0 {
        rd(net, OFF_NET_NS_INUM.load())
    } else {
        0
    };
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
    m.new_state = tcp_state::SYN_RECV;
    let nr: u8 = rd(r, OFF_REQ_NUM_RETRANS.load());
    m.payload = Payload {
        synack: SynAckArgs {
            num_retrans: nr as u32,
            accept_queue: ld(listener, OFF_SK_ACK_BACKLOG.load()),
            syn_queue: rd(listener as u64, OFF_ICSK_QLEN.load()),
        },
    };
    // SAFETY: the value is read at once, before anything could delete it; a concurrent update
    // of the same request (another CPU) would only move the interval by that much.
    if let Some(last) = unsafe { REQ_LAST.get(r) } {
        m.dur_ns = m.ts_ns - *last;
    }
    if REQ_LAST.insert(r, m.ts_ns, 0).is_err() {
        warn!(&(), "no room to time a request's SYN-ACK retransmits");
    }
    let info = sk_info_get(listener);
    // A passive Fast Open child answers for its own request, and tcp_rtx_synack adds this
    // SYN-ACK to the child's total_retrans: move the child's baseline with it, or its next
    // data retransmit would count this segment again.
    if !info.is_null() && ld::<u8>(listener, OFF_SKC_STATE.load()) != tcp_state::LISTEN {
        let i = info as *mut SockInfo;
        // SAFETY: checked non-null: the child's live socket-storage value.
        unsafe {
            if (*i).segs_base != 0 {
                (*i).segs_base = (*i).segs_base.wrapping_add(1);
            }
        }
    }
    emit(&m, &AddrSrc::sock(r), info);
    Ok(0)
}

#[inline(always)]
fn reset_args(reason: u32) -> Payload {
    Payload {
        reset: ResetArgs {
            reason,
            _pad: [0; 2],
        },
    }
}

/// Network and transport header addresses of a packet.
#[inline(always)]
fn headers(skb: *const c_void) -> (u64, u64) {
    let s = skb as u64;
    let head: u64 = rd(s, OFF_SKB_HEAD.load());
    let nh: u16 = rd(s, OFF_SKB_NETWORK_HEADER.load());
    let th: u16 = rd(s, OFF_SKB_TRANSPORT_HEADER.load());
    (head + nh as u64, head + th as u64)
}

/// netns of the device a packet arrived on (for packets without a socket).
#[inline(always)]
fn skb_netns(skb: *const c_void) -> u32 {
    let dev: u64 = rd(skb as u64, OFF_SKB_DEV.load());
    if dev == 0 {
        return 0;
    }
    let net: u64 = rd(dev, OFF_NETDEV_NET.load());
    if net == 0 {
        0
    } else {
        rd(net, OFF_NET_NS_INUM.load())
    }
}

// tcp_send_reset: `sk` is the full, timewait or request socket that answers, or NULL for a
// packet to a closed port; the 4-tuple always comes from the packet being answered.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn rst_send_btf(ctx: BtfTracePointContext) -> i32 {
    try_rst_send_btf(&ctx).unwrap_or(0)
}

fn try_rst_send_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let reason: u32 = ctx.arg(2);
    Ok(send_reset(ctx, reason))
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn rst_send_btf_noreason(ctx: BtfTracePointContext) -> i32 {
    try_rst_send_btf_noreason(&ctx).unwrap_or(0)
}

fn try_rst_send_btf_noreason(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    Ok(send_reset(ctx, u32::MAX))
}

#[inline(always)]
fn send_reset(ctx: &BtfTracePointContext, reason: u32) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let skb: *const c_void = ctx.arg(1);
    if skb.is_null() {
        // An active reset (abort, SO_LINGER 0, tcp_abort_on_overflow): no packet, a full socket.
        if sk.is_null() {
            return 0;
        }
        let mut m = sock_event(kind::RESET_SENT, sk);
        m.payload = reset_args(reason);
        emit(&m, &AddrSrc::sock(sk as u64), sk_info_get(sk));
        return 0;
    }
    let (nh, th) = headers(skb);
    let ver: u8 = rd(nh, 0);
    let mut m = Meta::new(kind::RESET_SENT);
    m.ts_ns = now_ns();
    m.ctx_pid = current().pid;
    if in_softirq() {
        m.flags |= flags::SOFTIRQ;
    }
    m.family = if ver >> 4 == 6 {
        tcpwatch_common::AF_INET6
    } else {
        tcpwatch_common::AF_INET
    };
    m.sport = u16::from_be(rd(th, 2));
    m.dport = u16::from_be(rd(th, 0));
    m.payload = reset_args(reason);
    let mut owner = core::ptr::null();
    if sk.is_null() {
        m.netns = skb_netns(skb);
    } else {
        m.skaddr = sk as u64;
        m.cookie = cookie_of(sk);
        m.flags |= flags::HAS_COOKIE;
        m.new_state = ld::<u8>(sk, OFF_SKC_STATE.load());
        let net: *const c_void = ld(sk, OFF_SKC_NET.load());
        m.netns = ld(net, OFF_NET_NS_INUM.load());
        owner = sk_info_get(sk);
    }
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
    emit(
        &m,
        &AddrSrc {
            local: Side::pkt_dst(nh),
            remote: Side::pkt_src(nh),
        },
        owner,
    );
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn rst_recv_btf(ctx: BtfTracePointContext) -> i32 {
    try_rst_recv_btf(&ctx).unwrap_or(0)
}

fn try_rst_recv_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let sk: *const c_void = ctx.arg(0);
    let mut m = sock_event(kind::RESET_RECEIVED, sk);
    m.payload = reset_args(ResetArgs::NO_REASON);
    emit(&m, &AddrSrc::sock(sk as u64), sk_info_get(sk));
    Ok(0)
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn sk_error_btf(ctx: BtfTracePointContext) -> i32 {
    try_sk_error_btf(&ctx).unwrap_or(0)
}

fn try_sk_error_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let sk: *const c_void = ctx.arg(0);
    if !is_tcp(sk) {
        return Ok(0);
    }
    let err: i32 = ld(sk, OFF_SK_ERR.load());
    if err == 0 {
        // Reports without a pending error (e.g. when the socket is torn down afterwards).
        return Ok(0);
    }
    let mut m = sock_event(kind::SOCK_ERROR, sk);
    m.payload = Payload {
        error: ErrorArgs {
            errno: err,
            _pad: [0; 2],
        },
    };
    emit(&m, &AddrSrc::sock(sk as u64), sk_info_get(sk));
    Ok(0)
}

// kfree_skb fires for every freed packet: leave after one compare unless it is a listen drop.
// `rx_sk` (the listener) exists since 6.12; older kernels keep only the counter-based signal.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
    try_kfree_skb_btf(&ctx).unwrap_or(0)
}

fn try_kfree_skb_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let reason: u32 = ctx.arg(2);
    let overflow = reason == REASON_LISTEN_OVERFLOW.load();
    if !overflow && reason != REASON_NO_SOCKET.load() {
        return Ok(0);
    }
    let sk: *const c_void = ctx.arg(3);
    if sk.is_null() || ld::<u8>(sk, OFF_SKC_STATE.load()) != tcp_state::LISTEN {
        return Ok(0);
    }
    let ack: u32 = ld(sk, OFF_SK_ACK_BACKLOG.load());
    let max: u32 = ld(sk, OFF_SK_MAX_ACK_BACKLOG.load());
    // NO_SOCKET on a listener is a syncookie ACK refused because the accept queue is full.
    if !overflow && ack <= max {
        return Ok(0);
    }
    let skb: *const c_void = ctx.arg(0);
    let (nh, th) = headers(skb);
    let mut m = sock_event(kind::LISTEN_OVERFLOW, sk);
    m.dport = u16::from_be(rd(th, 0));
    m.payload = Payload {
        overflow: OverflowArgs {
            accept_queue: ack,
            accept_max: max,
            syn_queue: rd(sk as u64, OFF_ICSK_QLEN.load()),
        },
    };
    emit(
        &m,
        &AddrSrc {
            local: Side::sock_local(sk as u64),
            remote: Side::pkt_src(nh),
        },
        sk_info_get(sk),
    );
    Ok(0)
}
