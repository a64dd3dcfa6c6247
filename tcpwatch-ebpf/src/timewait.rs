//! TIME_WAIT, two ways. Timer tracepoints: every timewait socket arms `tw_timer` and leaves
//! only by that timer firing or being shut down; these hooks see every kernel timer, so a
//! non-tw timer costs one load and one compare. Where the kernel has BPF trampolines, fentry
//! on the timewait functions themselves runs for timewait sockets only. Both emit the same
//! start/cancel/expire records; userspace tells expiry, re-arm and deschedule apart from their
//! order on one CPU.
use core::ffi::c_void;

use aya_ebpf::{
    Global,
    helpers::generated::bpf_get_current_comm,
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext},
};
use tcpwatch_common::{Payload, TimerArgs, flags, kind};

use crate::common::{
    AddrSrc, Meta, NO_SOCK_COOKIE, OFF_NET_NS_INUM, OFF_SKC_DPORT, OFF_SKC_FAMILY, OFF_SKC_NET,
    TIMER_SOFTIRQ, current, emit, in_softirq, ld, now_ns, rd, softirq_vector,
};
use crate::signals::OFF_SKC_NUM;

/// Address of `tw_timer_handler` (from /proc/kallsyms); 0 disables these programs.
#[unsafe(no_mangle)]
static TW_HANDLER: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TIMER_FUNCTION: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TW_TIMER: Global<u32> = Global::new(0);
/// `timer_list.entry.pprev`: non-null while the timer is pending.
#[unsafe(no_mangle)]
static OFF_TIMER_PPREV: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TW_SUBSTATE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKC_COOKIE: Global<u32> = Global::new(0);

/// The timewait socket behind a timer, if the timer is a `tw_timer`.
#[inline(always)]
fn tw_of(ctx: &BtfTracePointContext) -> Option<u64> {
    let timer: *const c_void = ctx.arg(0);
    let f: u64 = ld(timer, OFF_TIMER_FUNCTION.load());
    let h = TW_HANDLER.load();
    if f != h || h == 0 {
        return None;
    }
    Some(timer as u64 - OFF_TW_TIMER.load() as u64)
}

#[inline(always)]
fn tw_event(k: u8, tw: u64) {
    let mut m = Meta::new(k);
    m.ts_ns = now_ns();
    m.skaddr = tw;
    // The timewait socket carries the full socket's cookie when that one had been given one
    // (tcpwatch's state hook does), which links it to the closing socket's timeline.
    // (None without the cookie helper: the full socket's events carry none either.)
    m.cookie = if NO_SOCK_COOKIE.load() != 0 {
        0
    } else {
        rd(tw, OFF_SKC_COOKIE.load())
    };
    if m.cookie != 0 {
        m.flags |= flags::HAS_COOKIE;
    }
    m.ctx_pid = current().pid;
    let softirq = in_softirq();
    if softirq {
        m.flags |= flags::SOFTIRQ;
    }
    let family: u16 = rd(tw, OFF_SKC_FAMILY.load());
    m.family = family as u8;
    m.sport = rd(tw, OFF_SKC_NUM.load());
    m.dport = u16::from_be(rd(tw, OFF_SKC_DPORT.load()));
    let net: u64 = rd(tw, OFF_SKC_NET.load());
    m.netns = if net != 0 {
        rd(net, OFF_NET_NS_INUM.load())
    } else {
        0
    };
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
    m.new_state = rd(tw, OFF_TW_SUBSTATE.load());
    if (k == kind::TW_CANCEL || k == kind::TW_DESCHEDULE) && !softirq {
        // netns teardown runs in a kworker; tcp_tw_reuse in the connecting task.
        let mut comm = [0u64; 2];
        // SAFETY: the helper writes at most 16 bytes into `comm`, which has 16.
        unsafe { bpf_get_current_comm(comm.as_mut_ptr() as *mut c_void, 16) };
        if comm[0] & 0x00ff_ffff_ffff_ffff == u64::from_le_bytes(*b"kworker\0") {
            m.payload = Payload {
                timer: TimerArgs {
                    _pad0: 0,
                    kworker: 1,
                    _pad1: 0,
                },
            };
        }
    }
    emit(&m, &AddrSrc::sock(tw), core::ptr::null());
}

#[btf_tracepoint(function = "timer_start")]
pub fn tw_start_btf(ctx: BtfTracePointContext) -> i32 {
    try_tw_start_btf(&ctx).unwrap_or(0)
}

fn try_tw_start_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    if let Some(tw) = tw_of(ctx) {
        tw_event(kind::TW_START, tw);
    }
    Ok(0)
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn tw_cancel_btf(ctx: BtfTracePointContext) -> i32 {
    try_tw_cancel_btf(&ctx).unwrap_or(0)
}

fn try_tw_cancel_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    // The timer softirq detaches every timer it is about to run, and the detach fires this
    // tracepoint: not a cancel, the expiry record follows. Left to userspace to pair by time,
    // a stalled CPU (seen under QEMU TCG) split the pair into a kill and a stray expiry.
    // Real cancels come from a peer's segment (NET_RX), a task or a kworker.
    if softirq_vector() == Some(TIMER_SOFTIRQ) {
        return Ok(0);
    }
    if let Some(tw) = tw_of(ctx) {
        tw_event(kind::TW_CANCEL, tw);
    }
    Ok(0)
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tw_expire_btf(ctx: BtfTracePointContext) -> i32 {
    try_tw_expire_btf(&ctx).unwrap_or(0)
}

fn try_tw_expire_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    if let Some(tw) = tw_of(ctx) {
        tw_event(kind::TW_EXPIRE, tw);
    }
    Ok(0)
}

// The fentry strategy. Entering: the socket is fully set up (substate, ports, cookie) before
// it is hashed. Older kernels (6.1) name it `inet_twsk_hashdance`, and arm the timer apart.
#[fentry(function = "inet_twsk_hashdance_schedule")]
pub fn tw_enter_fentry(ctx: FEntryContext) -> i32 {
    try_tw_enter_fentry(&ctx).unwrap_or(0)
}

fn try_tw_enter_fentry(ctx: &FEntryContext) -> Result<i32, i64> {
    tw_event(kind::TW_START, ctx.arg(0));
    Ok(0)
}

#[fentry(function = "inet_twsk_hashdance")]
pub fn tw_enter_old_fentry(ctx: FEntryContext) -> i32 {
    try_tw_enter_old_fentry(&ctx).unwrap_or(0)
}

fn try_tw_enter_old_fentry(ctx: &FEntryContext) -> Result<i32, i64> {
    tw_event(kind::TW_START, ctx.arg(0));
    Ok(0)
}

/// `__inet_twsk_schedule(tw, timeo, rearm)` with `rearm`: the peer's FIN, a retransmitted
/// FIN. One record: a cancel/start pair would let an interrupt between them split it. The
/// first arm (`rearm` false) is already reported on entering, and may be inlined there.
#[fentry(function = "__inet_twsk_schedule")]
pub fn tw_rearm_fentry(ctx: FEntryContext) -> i32 {
    try_tw_rearm_fentry(&ctx).unwrap_or(0)
}

fn try_tw_rearm_fentry(ctx: &FEntryContext) -> Result<i32, i64> {
    let rearm: u64 = ctx.arg(2);
    if rearm & 0xff != 0 {
        tw_event(kind::TW_REARM, ctx.arg(0));
    }
    Ok(0)
}

/// The timer firing: expiry.
#[fentry(function = "tw_timer_handler")]
pub fn tw_expire_fentry(ctx: FEntryContext) -> i32 {
    try_tw_expire_fentry(&ctx).unwrap_or(0)
}

fn try_tw_expire_fentry(ctx: &FEntryContext) -> Result<i32, i64> {
    let timer: u64 = ctx.arg(0);
    tw_event(kind::TW_EXPIRE, timer - OFF_TW_TIMER.load() as u64);
    Ok(0)
}

/// Taken off early: connect() reusing the tuple, a RST, netns teardown. Only while the timer
/// is pending: otherwise it has fired (or is firing on another CPU) and the handler reports
/// the end, while this call only drops a reference.
#[fentry(function = "inet_twsk_deschedule_put")]
pub fn tw_deschedule_fentry(ctx: FEntryContext) -> i32 {
    try_tw_deschedule_fentry(&ctx).unwrap_or(0)
}

fn try_tw_deschedule_fentry(ctx: &FEntryContext) -> Result<i32, i64> {
    let tw: u64 = ctx.arg(0);
    let pprev: u64 = rd(tw + OFF_TW_TIMER.load() as u64, OFF_TIMER_PPREV.load());
    if pprev != 0 {
        tw_event(kind::TW_DESCHEDULE, tw);
    }
    Ok(0)
}
