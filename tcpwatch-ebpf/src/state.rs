//! TCP state transitions: `tp_btf/inet_sock_set_state` (socket cookie, typed `struct sock *`)
//! and the classic `sock/inet_sock_set_state` tracepoint as the fallback without BTF.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::generated::bpf_get_socket_cookie,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use tcpwatch_common::{SockInfo, counter, flags, kind, tcp_state};

use crate::common::{
    AddrSrc, IPPROTO_TCP, Meta, OFF_INET_SPORT, OFF_SK_PROTOCOL, SOCKS, bump, copy16, current,
    emit, forget_listener, in_softirq, listener_owner, netns_of, now_ns, rd, scalar_at,
    set_listener_owner, sock_meta, take_current_owner,
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

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    // The same pointer as a plain number, so it can be stored in records and map keys.
    let skaddr = scalar_at(ctx.as_ptr() as *const c_void);
    let proto: u16 = rd(skaddr, OFF_SK_PROTOCOL.load());
    if proto != IPPROTO_TCP {
        return 0;
    }
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let mut m = Meta::new(kind::STATE);
    m.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    m.flags = flags::HAS_COOKIE;
    m.skaddr = skaddr;
    m.old_state = old as u8;
    m.new_state = new as u8;
    sock_meta(skaddr, &mut m, OFF_INET_SPORT.load());
    transition(&mut m, &AddrSrc::sock(skaddr));
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn state_tp(ctx: TracePointContext) -> u32 {
    let _ = try_state_tp(&ctx);
    0
}

fn try_state_tp(ctx: &TracePointContext) -> Result<(), i64> {
    let proto: u16 = unsafe { ctx.read_at(TPS_PROTOCOL.load() as usize) }?;
    if proto != IPPROTO_TCP {
        return Ok(());
    }
    let mut m = Meta::new(kind::STATE);
    m.skaddr = unsafe { ctx.read_at::<u64>(TPS_SKADDR.load() as usize) }?;
    m.old_state = unsafe { ctx.read_at::<i32>(TPS_OLDSTATE.load() as usize) }? as u8;
    m.new_state = unsafe { ctx.read_at::<i32>(TPS_NEWSTATE.load() as usize) }? as u8;
    m.sport = unsafe { ctx.read_at(TPS_SPORT.load() as usize) }?;
    m.dport = unsafe { ctx.read_at(TPS_DPORT.load() as usize) }?;
    let family: u16 = unsafe { ctx.read_at(TPS_FAMILY.load() as usize) }?;
    m.family = family as u8;
    m.netns = netns_of(m.skaddr);
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
    let addrs = AddrSrc {
        base: ctx.as_ptr() as u64,
        saddr4: TPS_SADDR.load(),
        daddr4: TPS_DADDR.load(),
        saddr6: TPS_SADDR_V6.load(),
        daddr6: TPS_DADDR_V6.load(),
    };
    transition(&mut m, &addrs);
    Ok(())
}

/// Owner and timing bookkeeping shared by both hooks, then emission.
#[inline(always)]
fn transition(m: &mut Meta, addrs: &AddrSrc) {
    let now = now_ns();
    m.ts_ns = now;
    let softirq = in_softirq();
    let cur = current();
    m.ctx_pid = cur.pid;
    if softirq {
        m.flags |= flags::SOFTIRQ;
    }
    let mut info = SOCKS.get_ptr_mut(m.skaddr);
    if info.is_none() {
        let fresh = SockInfo {
            last_ts_ns: 0,
            last_retrans_ts_ns: 0,
            cgroup_id: 0,
            pid: 0,
            tid: 0,
            comm: [0; 16],
            retrans: 0,
            flags: 0,
        };
        if SOCKS.insert(m.skaddr, fresh, 0).is_err() {
            bump(counter::SOCK_MAP_FULL);
        }
        info = SOCKS.get_ptr_mut(m.skaddr);
    }
    let Some(info) = info else {
        emit(m, addrs, None);
        return;
    };
    unsafe {
        if !softirq {
            // Task context: a syscall (connect, listen, close, shutdown, or release_sock
            // draining the backlog) of the process acting on this socket.
            take_current_owner(info, &cur);
        } else if (*info).flags & flags::OWNER_KNOWN == 0 && m.old_state == tcp_state::LISTEN {
            // A child born from a listener in softirq: the interrupted task is never the owner.
            if let Some(o) = listener_owner(m.netns, m.sport) {
                (*info).pid = (*o).pid;
                (*info).tid = (*o).tid;
                (*info).cgroup_id = (*o).cgroup_id;
                copy16((*info).comm.as_mut_ptr(), (*o).comm.as_ptr());
                (*info).flags = flags::OWNER_KNOWN | flags::OWNER_FROM_LISTENER;
            }
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
    emit(m, addrs, Some(info));
    if m.new_state == tcp_state::CLOSE {
        if m.old_state == tcp_state::LISTEN {
            forget_listener(m.netns, m.sport);
        }
        let _ = SOCKS.remove(m.skaddr);
    }
}
