//! TCP state transitions: `tp_btf/inet_sock_set_state` (socket cookie, typed `struct sock *`)
//! and the classic `sock/inet_sock_set_state` tracepoint as the fallback without BTF.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, Global,
    macros::{btf_tracepoint, map, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use tcpwatch_common::{SockInfo, counter, flags, kind, tcp_state};

use crate::common::{
    AddrSrc, IPPROTO_TCP, Meta, NO_SK_STORAGE, OFF_SK_PROTOCOL, OFF_TP_TOTAL_RETRANS, SOCKS, Side,
    addr_info, bump, cookie_of, copy16, current, emit, forget_listener, in_softirq, ld,
    listener_owner, mark_listener, netns_of, now_ns, rd, set_listener_owner, sk_info,
    sock_meta_btf, take_current_owner,
};

// Record layout of the classic tracepoint, read from its tracefs `format` by userspace.
#[unsafe(no_mangle)]
static TPS_SKADDR: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static TPS_OLDSTATE: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static TPS_NEWSTATE: Global<u32> = Global::new(20);
#[unsafe(no_mangle)]
static TPS_SPORT: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static TPS_DPORT: Global<u32> = Global::new(26);
#[unsafe(no_mangle)]
static TPS_FAMILY: Global<u32> = Global::new(28);
#[unsafe(no_mangle)]
static TPS_PROTOCOL: Global<u32> = Global::new(30);
#[unsafe(no_mangle)]
static TPS_SADDR: Global<u32> = Global::new(32);
#[unsafe(no_mangle)]
static TPS_DADDR: Global<u32> = Global::new(36);
#[unsafe(no_mangle)]
static TPS_SADDR_V6: Global<u32> = Global::new(40);
#[unsafe(no_mangle)]
static TPS_DADDR_V6: Global<u32> = Global::new(56);

// A raw tracepoint program that is running on a CPU is skipped (only counted) when a softirq
// interrupts it and fires the same hook again: on loopback ~0.2% of transitions. So two
// programs are attached, `main` first. `main` handles every event it gets and then records it
// (socket, old, new) in a per-CPU list of its last two. `nested` runs right after `main` for
// the same event: if the event is in that list, `main` had it; if not, `main` was skipped
// (this event interrupted it) and `nested` handles it. Two entries, because `nested` itself can
// be interrupted before it reads the list, by an event that `main` then records. Both are
// skipped only if a softirq is interrupted by another TCP event, which cannot happen.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_btf_main(ctx: BtfTracePointContext) -> i32 {
    try_state_btf_main(&ctx).unwrap_or(0)
}

fn try_state_btf_main(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    state_btf(ctx);
    let (sk, st) = ident(ctx);
    if let Some(p) = STATE_DONE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for its four u64s.
        unsafe {
            (*p)[2] = (*p)[0];
            (*p)[3] = (*p)[1];
            (*p)[0] = sk;
            (*p)[1] = st;
        }
    }
    Ok(0)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_btf_nested(ctx: BtfTracePointContext) -> i32 {
    try_state_btf_nested(&ctx).unwrap_or(0)
}

fn try_state_btf_nested(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let (sk, st) = ident(ctx);
    let done = match STATE_DONE.get_ptr(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for its four u64s.
        Some(p) => unsafe { ((*p)[0] == sk && (*p)[1] == st) || ((*p)[2] == sk && (*p)[3] == st) },
        None => true,
    };
    if !done {
        bump(counter::STATE_RESCUED);
        debug!(&(), "a transition was handled by the nested program");
        state_btf(ctx);
    }
    Ok(0)
}

/// What identifies one transition on one CPU: the socket and its (old, new) states.
#[inline(always)]
fn ident(ctx: &BtfTracePointContext) -> (u64, u64) {
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    (sk as u64, ((old as u64) << 8) | new as u64)
}

#[map]
static STATE_DONE: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn state_btf(ctx: &BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let skaddr = sk as u64;
    let proto: u16 = ld(sk, OFF_SK_PROTOCOL.load());
    if proto != IPPROTO_TCP {
        return 0;
    }
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let mut m = Meta::new(kind::STATE);
    m.cookie = cookie_of(sk);
    m.flags = flags::HAS_COOKIE;
    m.skaddr = skaddr;
    m.old_state = old as u8;
    m.new_state = new as u8;
    sock_meta_btf(sk, &mut m);
    if new as u8 == tcp_state::LISTEN {
        mark_listener(sk);
    }
    let info = sk_info(sk);
    let off_total = OFF_TP_TOTAL_RETRANS.load();
    if let Some(i) = info.filter(|_| off_total != 0) {
        // The retransmit program's baseline: what the kernel counted so far on this socket.
        // Only retransmits change it, and they update it themselves, so it is read once per
        // socket: a connect starts from zero (tcp_disconnect zeroes it for a reused socket);
        // an accepted child is cloned from its listener in SYN_RECV and only then given its
        // request's SYN-ACK retransmits, so it is read when the child is established.
        // SAFETY: `i` is this socket's storage value, alive with the socket, which the kernel
        // holds locked (or in softirq) while it changes state.
        unsafe {
            let (old, new) = (old as u8, new as u8);
            if new == tcp_state::SYN_SENT {
                (*i).segs_base = 1;
            } else if old == tcp_state::SYN_RECV
                || ((*i).segs_base == 0 && new != tcp_state::SYN_RECV)
            {
                let total: u32 = rd(sk as u64, off_total);
                (*i).segs_base = total.wrapping_add(1);
            }
        }
    }
    // Without socket storage the value is the address-keyed one: it goes at CLOSE.
    transition(
        &mut m,
        &AddrSrc::sock(skaddr),
        info,
        NO_SK_STORAGE.load() != 0,
    );
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn state_tp(ctx: TracePointContext) -> u32 {
    try_state_tp(&ctx).unwrap_or(0)
}

/// A field of the classic tracepoint's record at the offset its format gives.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, off: &Global<u32>) -> Result<T, i64> {
    // SAFETY: `read_at` copies with bpf_probe_read from the record; the offset comes from
    // this kernel's tracefs format for the field, so the bytes are a `T`.
    unsafe { ctx.read_at(off.load() as usize) }.map_err(i64::from)
}

fn try_state_tp(ctx: &TracePointContext) -> Result<u32, i64> {
    let proto: u16 = field(ctx, &TPS_PROTOCOL)?;
    if proto != IPPROTO_TCP {
        return Ok(0);
    }
    let mut m = Meta::new(kind::STATE);
    m.skaddr = field::<u64>(ctx, &TPS_SKADDR)?;
    m.old_state = field::<i32>(ctx, &TPS_OLDSTATE)? as u8;
    m.new_state = field::<i32>(ctx, &TPS_NEWSTATE)? as u8;
    m.sport = field(ctx, &TPS_SPORT)?;
    m.dport = field(ctx, &TPS_DPORT)?;
    let family: u16 = field(ctx, &TPS_FAMILY)?;
    m.family = family as u8;
    m.netns = netns_of(m.skaddr);
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
    let rec = ctx.as_ptr() as u64;
    let addrs = AddrSrc {
        local: Side {
            base: rec,
            off4: TPS_SADDR.load(),
            off6: TPS_SADDR_V6.load(),
        },
        remote: Side {
            base: rec,
            off4: TPS_DADDR.load(),
            off6: TPS_DADDR_V6.load(),
        },
    };
    let info = addr_info(m.skaddr);
    transition(&mut m, &addrs, info, true);
    Ok(0)
}

/// Owner and timing bookkeeping shared by both hooks, then emission. `keyed` entries live in
/// the address-keyed map and must be removed when the socket closes.
#[inline(always)]
fn transition(m: &mut Meta, addrs: &AddrSrc, info: Option<*mut SockInfo>, keyed: bool) {
    let now = now_ns();
    m.ts_ns = now;
    let softirq = in_softirq();
    let cur = current();
    m.ctx_pid = cur.pid;
    if softirq {
        m.flags |= flags::SOFTIRQ;
    }
    let Some(info) = info else {
        emit(m, addrs, core::ptr::null());
        return;
    };
    // SAFETY: `info` is this socket's value in socket storage or the address-keyed map,
    // alive while the program runs; `listener_owner` returns a live map value.
    unsafe {
        if !softirq {
            // Task context: a syscall (connect, listen, close, shutdown, or release_sock
            // draining the backlog) of the process acting on this socket.
            take_current_owner(info, &cur);
        } else if m.old_state == tcp_state::LISTEN
            && m.new_state == tcp_state::SYN_RECV
            && (*info).flags & flags::OWNER_KNOWN != 0
        {
            // A child born from a listener in softirq, its storage cloned from that listener's:
            // the owner is the listener's (the interrupted task is never the owner).
            (*info).flags = flags::OWNER_KNOWN | flags::OWNER_FROM_LISTENER;
        } else if m.old_state == tcp_state::LISTEN && (*info).flags & flags::OWNER_KNOWN == 0 {
            // The same for a listener whose owner the kernel side never saw (it existed before
            // start): what userspace seeded for its port.
            if let Some(o) = listener_owner(m.netns, m.sport) {
                (*info).pid = (*o).pid;
                (*info).tid = (*o).tid;
                (*info).cgroup_id = (*o).cgroup_id;
                copy16((*info).comm.as_mut_ptr(), (*o).comm.as_ptr());
                (*info).flags = flags::OWNER_KNOWN | flags::OWNER_FROM_LISTENER;
            }
        }
        if m.new_state == tcp_state::SYN_SENT || m.old_state == tcp_state::LISTEN {
            // A new connection on this socket: its retransmits count from one again.
            (*info).retrans = 0;
            (*info).last_retrans_ts_ns = 0;
        }
        let last = (*info).last_ts_ns;
        if last != 0 && m.old_state != tcp_state::LISTEN {
            m.dur_ns = now - last;
        }
        (*info).last_ts_ns = now;
        if m.new_state == tcp_state::LISTEN && (*info).flags & flags::OWNER_KNOWN != 0 {
            set_listener_owner(m.netns, m.sport, info);
        }
    }
    emit(m, addrs, info);
    if m.new_state == tcp_state::CLOSE {
        if m.old_state == tcp_state::LISTEN {
            forget_listener(m.netns, m.sport);
        }
        if keyed {
            let _ = SOCKS.remove(m.skaddr);
        }
    }
}
