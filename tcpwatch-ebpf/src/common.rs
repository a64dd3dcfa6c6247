//! Maps, globals and helpers shared by every program: owner bookkeeping, filters, emission.
use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_RB_NO_WAKEUP, bpf_map_type},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated as raw,
    },
    macros::{btf_map, btf_tracepoint, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use tcpwatch_common::{ListenKey, Owner, Payload, RawEvent, SockInfo, counter, flags};

// Ring buffers, one per CPU group: a single shared ring costs ~135 ns per event in spinlock
// and cache-line contention at 600 k events/s on 2 CPUs (measured with bpf_stats). CPU c uses
// ring c % NRINGS; userspace sizes the used rings and merges them by timestamp.
#[map]
pub static EVENTS_0: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static EVENTS_1: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static EVENTS_2: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static EVENTS_3: RingBuf = RingBuf::with_byte_size(4096, 0);
#[unsafe(no_mangle)]
static NRINGS: Global<u32> = Global::new(1);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);
/// Records lost to a full ring, by record kind, so every output can say which signal lost data.
#[map]
pub static DROPS_BY_KIND: PerCpuArray<u64> = PerCpuArray::with_max_entries(16, 0);
/// Per-socket owner and timing for hooks with a typed `struct sock *` (tp_btf, iter): socket
/// local storage lives and dies with the socket, and costs no hash lookup. Cloned: the kernel
/// copies a listener's value into each child it clones (`sk_clone_lock`), so a child knows
/// the owner of the very socket that took it, exact within an SO_REUSEPORT group.
#[btf_map]
pub static SK_INFO: ClonedSkStorage<SockInfo> = ClonedSkStorage::new();

/// aya's `SkStorage` definition with `BPF_F_CLONE` added to the flags it fixes (a BTF map
/// definition is this struct: each value is the length of an array type).
#[repr(C)]
pub struct ClonedSkStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholders the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}
/// Every listening socket, marked when it starts listening (tp_btf) or when the inventory
/// walk meets it: the 4 Hz queue sampler iterates this map (`iter/bpf_sk_storage_map`) and so
/// visits listeners only, of every namespace at once, instead of walking the hash tables.
#[btf_map]
pub static LISTEN_SK: SkStorage<u32> = SkStorage::new();

/// Marks `sk` (a full `struct sock *`) as a listener for the queue sampler.
#[inline(always)]
pub fn mark_listener(sk: *const c_void) {
    if NO_SK_STORAGE.load() != 0 {
        return;
    }
    if storage(core::ptr::addr_of!(LISTEN_SK) as *mut c_void, sk, true).is_null() {
        bump(counter::SOCK_MAP_FULL);
        warn!(
            &(),
            "a listener got no socket storage for its mark: its queues go unsampled"
        );
    }
}

/// `sk`'s value in socket-storage map `map`, created zeroed if `create`; null if absent or
/// out of memory.
#[inline(always)]
fn storage(map: *mut c_void, sk: *const c_void, create: bool) -> *mut c_void {
    let flags = if create {
        aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: the helper takes a map and a socket pointer the verifier has typed (BTF) and returns null or a pointer to a value the kernel keeps alive with the socket.
    unsafe { raw::bpf_sk_storage_get(map, sk as *mut c_void, core::ptr::null_mut(), flags) }
}

/// The same for hooks that only know the socket's address (classic tracepoints), keyed by it
/// until the socket reaches CLOSE; LRU so sockets that vanish unseen cannot fill it.
#[map]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(262_144, 0);
/// Listener owners by port, for accepted children born in softirq where the listener's own
/// cloned storage names none: the classic-tracepoint fallback (no socket storage), and
/// listeners older than tcpwatch (userspace seeds those from the inventory).
#[map]
pub static LISTENERS: HashMap<ListenKey, Owner> = HashMap::with_max_entries(16_384, 0);
/// Current softirq vector + 1 on this CPU, 0 in task context.
#[map]
static SOFTIRQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Set by userspace when this kernel does not let tracing programs use socket local storage
/// (before 5.11): per-socket values then live in SOCKS, keyed by the socket's address and
/// removed at CLOSE, and listeners are not marked for the queue sampler's map iterator
/// (userspace does not load it then). A frozen global: the verifier never walks, so never
/// checks, the branch this kernel cannot run.
#[unsafe(no_mangle)]
pub static NO_SK_STORAGE: Global<u32> = Global::new(0);
/// Set when tracing programs may not call `bpf_get_socket_cookie` (before 5.12): events then
/// carry no cookie, as with the classic tracepoint, and are told apart by address and tuple.
#[unsafe(no_mangle)]
pub static NO_SOCK_COOKIE: Global<u32> = Global::new(0);

// Kernel struct offsets resolved from BTF by userspace (0 with HAVE_BTF_OFFSETS = 0).
#[unsafe(no_mangle)]
pub static HAVE_BTF_OFFSETS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_RCV_SADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_DPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_FAMILY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_V6_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SKC_V6_RCV_SADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_NET_NS_INUM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_PROTOCOL: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_INET_SPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TP_TOTAL_RETRANS: Global<u32> = Global::new(0);

// Filters; 0 means "no filter".
#[unsafe(no_mangle)]
static FILTER_PORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_LPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_RPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_PID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_FAMILY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_NETNS: Global<u32> = Global::new(0);

pub const IPPROTO_TCP: u16 = 6;

/// A direct load through a typed kernel pointer (tp_btf/iter arguments): the verifier knows the
/// offset (a frozen .rodata value) and checks it against BTF, and the JIT turns it into a
/// fault-safe load, so no helper call is needed.
#[inline(always)]
pub fn ld<T: Copy>(base: *const c_void, off: u32) -> T {
    // SAFETY: `base` is a BTF-typed kernel pointer and `off` a frozen offset into it: the verifier checks the access against the type and the JIT makes it a fault-safe load.
    unsafe { core::ptr::read_volatile((base as *const u8).add(off as usize) as *const T) }
}

#[inline(always)]
pub fn rd<T: Copy + Default>(base: u64, off: u32) -> T {
    // SAFETY: the helper copies from any kernel address and reports a fault instead of taking one; a failed read gives the default value.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

/// The socket cookie of a BTF-typed socket pointer.
#[inline(always)]
pub fn cookie_of(sk: *const c_void) -> u64 {
    if NO_SOCK_COOKIE.load() != 0 {
        return 0;
    }
    // SAFETY: the helper reads the cookie of the socket the verifier typed `sk` as (it
    // assigns one on first use); it has no other effect.
    unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(sk as *mut c_void) }
}

/// The socket's `SockInfo` in socket local storage, created zeroed on first use.
#[inline(always)]
pub fn sk_info(sk: *const c_void) -> Option<*mut SockInfo> {
    if NO_SK_STORAGE.load() != 0 {
        return addr_info(sk as u64);
    }
    let p = storage(core::ptr::addr_of!(SK_INFO) as *mut c_void, sk, true) as *mut SockInfo;
    if p.is_null() {
        bump(counter::SOCK_MAP_FULL);
        warn!(
            &(),
            "a socket got no socket storage: its owner and timings are not kept"
        );
        None
    } else {
        Some(p)
    }
}

/// The socket's `SockInfo` if it has one (no creation: for events that only read the owner).
#[inline(always)]
pub fn sk_info_get(sk: *const c_void) -> *const SockInfo {
    if NO_SK_STORAGE.load() != 0 {
        return SOCKS.get_ptr(sk as u64).unwrap_or(core::ptr::null());
    }
    storage(core::ptr::addr_of!(SK_INFO) as *mut c_void, sk, false) as *const SockInfo
}

/// The socket's `SockInfo` in the address-keyed map, inserted zeroed on first use.
#[inline(always)]
pub fn addr_info(skaddr: u64) -> Option<*mut SockInfo> {
    if let Some(p) = SOCKS.get_ptr_mut(skaddr) {
        return Some(p);
    }
    let fresh = SockInfo {
        last_ts_ns: 0,
        last_retrans_ts_ns: 0,
        cgroup_id: 0,
        pid: 0,
        tid: 0,
        comm: [0; 16],
        retrans: 0,
        flags: 0,
        segs_base: 0,
        _pad: 0,
    };
    if SOCKS.insert(skaddr, fresh, 0).is_err() {
        bump(counter::SOCK_MAP_FULL);
        // (No address in the message: on the tp_btf path it is a BTF pointer, which the
        // logger's byte splitting would shift, and 5.10's verifier refuses that.)
        warn!(
            &(),
            "a socket was refused by the socket map: its owner is not kept"
        );
    }
    SOCKS.get_ptr_mut(skaddr)
}

/// Counts with an atomic add: a program interrupted by a softirq can be re-entered on the same
/// CPU (see `state_btf_nested`), so a plain read-modify-write could lose increments.
#[inline(always)]
pub fn bump(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // BPF_ATOMIC add: Rust's BPF target offers no atomic read-modify-write.
        // SAFETY: `p` is a non-null pointer into this CPU's slot of a per-CPU array, valid for 8 bytes; the instruction is the verifier's BPF_ATOMIC add.
        unsafe {
            core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) 1u64);
        }
    }
}

#[inline(always)]
pub fn in_softirq() -> bool {
    softirq_vector().is_some()
}

/// `TIMER_SOFTIRQ`, the vector in which timer callbacks run.
pub const TIMER_SOFTIRQ: u32 = 1;

/// The softirq vector running on this CPU, if any.
#[inline(always)]
pub fn softirq_vector() -> Option<u32> {
    match SOFTIRQ.get(0) {
        Some(v) if *v != 0 => Some(*v - 1),
        _ => None,
    }
}

/// Network namespace inode of a `sock_common`-prefixed socket.
#[inline(always)]
pub fn netns_of(sk: u64) -> u32 {
    if HAVE_BTF_OFFSETS.load() == 0 {
        return 0;
    }
    let net: u64 = rd(sk, OFF_SKC_NET.load());
    if net == 0 {
        return 0;
    }
    rd(net, OFF_NET_NS_INUM.load())
}

/// Where one side's address lives: `base + off4` (IPv4, 4 bytes) or `base + off6` (16 bytes):
/// a socket through BTF offsets, a tracepoint record through its format, or packet headers.
#[derive(Clone, Copy)]
pub struct Side {
    pub base: u64,
    pub off4: u32,
    pub off6: u32,
}

/// Where a record's local and remote addresses come from.
#[derive(Clone, Copy)]
pub struct AddrSrc {
    pub local: Side,
    pub remote: Side,
}

impl Side {
    #[inline(always)]
    pub fn sock_local(sk: u64) -> Side {
        Side {
            base: sk,
            off4: OFF_SKC_RCV_SADDR.load(),
            off6: OFF_SKC_V6_RCV_SADDR.load(),
        }
    }

    #[inline(always)]
    pub fn sock_remote(sk: u64) -> Side {
        Side {
            base: sk,
            off4: OFF_SKC_DADDR.load(),
            off6: OFF_SKC_V6_DADDR.load(),
        }
    }

    /// Source address of a packet whose network header is at `nh`.
    #[inline(always)]
    pub fn pkt_src(nh: u64) -> Side {
        Side {
            base: nh,
            off4: 12,
            off6: 8,
        }
    }

    /// Destination address of a packet whose network header is at `nh`.
    #[inline(always)]
    pub fn pkt_dst(nh: u64) -> Side {
        Side {
            base: nh,
            off4: 16,
            off6: 24,
        }
    }
}

impl AddrSrc {
    #[inline(always)]
    pub fn sock(sk: u64) -> AddrSrc {
        AddrSrc {
            local: Side::sock_local(sk),
            remote: Side::sock_remote(sk),
        }
    }
}

/// The small scalar part of an event, known before the record is reserved: enough to filter.
#[derive(Clone, Copy)]
pub struct Meta {
    pub ts_ns: u64,
    pub skaddr: u64,
    pub cookie: u64,
    pub dur_ns: u64,
    pub aux_addr: u64,
    pub netns: u32,
    pub ctx_pid: u32,
    pub flags: u32,
    /// The kind's own fields (see `tcpwatch_common::kind`).
    pub payload: Payload,
    pub sport: u16,
    pub dport: u16,
    pub kind: u8,
    pub family: u8,
    pub old_state: u8,
    pub new_state: u8,
}

impl Meta {
    #[inline(always)]
    pub fn new(kind: u8) -> Meta {
        Meta {
            ts_ns: 0,
            skaddr: 0,
            cookie: 0,
            dur_ns: 0,
            aux_addr: 0,
            netns: 0,
            ctx_pid: 0,
            flags: 0,
            payload: Payload { raw: [0; 3] },
            sport: 0,
            dport: 0,
            kind,
            family: 0,
            old_state: 0,
            new_state: 0,
        }
    }
}

/// `sock_meta` through direct loads on a typed `struct sock *` (only `inet_sport` lies outside
/// `struct sock` and needs a helper).
#[inline(always)]
pub fn sock_meta_btf(sk: *const c_void, m: &mut Meta) {
    let family: u16 = ld(sk, OFF_SKC_FAMILY.load());
    m.family = family as u8;
    m.dport = u16::from_be(ld(sk, OFF_SKC_DPORT.load()));
    let net: *const c_void = ld(sk, OFF_SKC_NET.load());
    m.netns = ld(net, OFF_NET_NS_INUM.load());
    m.sport = u16::from_be(rd(sk as u64, OFF_INET_SPORT.load()));
    if m.netns != 0 {
        m.flags |= flags::HAS_NETNS;
    }
}

#[inline(always)]
fn read_into(dst: *mut u8, len: u32, src: u64) {
    // SAFETY: the helper writes at most `len` bytes into `dst`, which points into a reserved ring record at least that long; on failure those bytes are zeroed.
    unsafe {
        if raw::bpf_probe_read_kernel(dst as *mut c_void, len, src as *const c_void) != 0 {
            core::ptr::write_bytes(dst, 0, len as usize);
        }
    }
}

pub struct Current {
    pub pid: u32,
    pub tid: u32,
}

#[inline(always)]
pub fn current() -> Current {
    let pt = bpf_get_current_pid_tgid();
    Current {
        pid: (pt >> 32) as u32,
        tid: pt as u32,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Records `current` as the owner in a map value (task context only).
#[inline(always)]
pub fn take_current_owner(info: *mut SockInfo, cur: &Current) {
    // SAFETY: `info` is a live socket-storage (or hash map) value of the socket this program handles; `comm` is 16 bytes as the helper is told.
    unsafe {
        (*info).pid = cur.pid;
        (*info).tid = cur.tid;
        raw::bpf_get_current_comm((*info).comm.as_mut_ptr() as *mut c_void, 16);
        (*info).cgroup_id = bpf_get_current_cgroup_id();
        (*info).flags = flags::OWNER_KNOWN;
    }
}

#[inline(always)]
pub fn copy16(dst: *mut u8, src: *const u8) {
    // SAFETY: callers pass two 16-byte arrays; unaligned reads and aligned-enough writes of two u64s.
    unsafe {
        let s = src as *const u64;
        let d = dst as *mut u64;
        *d = core::ptr::read_unaligned(s);
        *d.add(1) = core::ptr::read_unaligned(s.add(1));
    }
}

#[inline(always)]
pub fn listener_owner(netns: u32, port: u16) -> Option<*const Owner> {
    let key = ListenKey {
        netns,
        port,
        _pad: 0,
    };
    LISTENERS.get_ptr(key)
}

#[inline(always)]
pub fn set_listener_owner(netns: u32, port: u16, info: *const SockInfo) {
    let key = ListenKey {
        netns,
        port,
        _pad: 0,
    };
    // SAFETY: `info` is a live socket-storage value of the listener.
    let owner = unsafe {
        Owner {
            cgroup_id: (*info).cgroup_id,
            pid: (*info).pid,
            tid: (*info).tid,
            comm: [0; 16],
        }
    };
    if LISTENERS.insert(key, owner, 0).is_err() {
        warn!(
            &(),
            "listener port {}: the listener map is full: its children's owner falls back to userspace",
            port
        );
        return;
    }
    if let Some(p) = LISTENERS.get_ptr_mut(key) {
        // SAFETY: `p` is the map value just inserted and `info` a live socket-storage value,
        // both 16-byte `comm` arrays.
        unsafe { copy16((*p).comm.as_mut_ptr(), (*info).comm.as_ptr()) };
    }
}

#[inline(always)]
pub fn forget_listener(netns: u32, port: u16) {
    let key = ListenKey {
        netns,
        port,
        _pad: 0,
    };
    let _ = LISTENERS.remove(key);
}

/// True when the event passes the userspace-requested filters. An owner the kernel does not
/// know passes the pid filter here: userspace may know it (inventory, timewait) and filters again.
#[inline(always)]
pub fn wanted(m: &Meta, owner_pid: u32) -> bool {
    let netns = FILTER_NETNS.load();
    if netns != 0 && m.netns != netns {
        return false;
    }
    let family = FILTER_FAMILY.load();
    if family != 0 && m.family as u32 != family {
        return false;
    }
    let port = FILTER_PORT.load();
    if port != 0 && m.sport as u32 != port && m.dport as u32 != port {
        return false;
    }
    let lport = FILTER_LPORT.load();
    if lport != 0 && m.sport as u32 != lport {
        return false;
    }
    let rport = FILTER_RPORT.load();
    if rport != 0 && m.dport as u32 != rport {
        return false;
    }
    let pid = FILTER_PID.load();
    if pid != 0 && owner_pid != 0 && owner_pid != pid {
        return false;
    }
    true
}

/// Applies the filters and writes the record straight into the ring buffer (no stack copy),
/// counting what is filtered or lost. `owner` is the socket's `SockInfo`, or null. (A raw
/// pointer, not an Option: LLVM spilled the uninitialised payload of a `None`, which the
/// verifier refuses.)
#[inline(always)]
pub fn emit(m: &Meta, addrs: &AddrSrc, owner: *const SockInfo) {
    let owner_pid = if owner.is_null() {
        0
    } else {
        // SAFETY: checked non-null above; a socket-storage value alive while the program runs.
        unsafe { (*owner).pid }
    };
    if !wanted(m, owner_pid) {
        bump(counter::FILTERED);
        return;
    }
    let ring = match NRINGS.load() {
        0 | 1 => 0,
        // SAFETY: a helper without arguments.
        n => (unsafe { raw::bpf_get_smp_processor_id() }) % n,
    };
    let reserved = match ring {
        0 => EVENTS_0.reserve::<RawEvent>(0),
        1 => EVENTS_1.reserve::<RawEvent>(0),
        2 => EVENTS_2.reserve::<RawEvent>(0),
        _ => EVENTS_3.reserve::<RawEvent>(0),
    };
    let Some(mut entry) = reserved else {
        bump(counter::RINGBUF_FULL);
        if let Some(p) = DROPS_BY_KIND.get_ptr_mut((m.kind & 15) as u32) {
            // SAFETY: as in `bump`: a per-CPU slot valid for 8 bytes, a BPF_ATOMIC add.
            unsafe {
                core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) 1u64)
            };
        }
        return;
    };
    let p: *mut RawEvent = entry.as_mut_ptr();
    // SAFETY: `p` is the ring record just reserved, `size_of::<RawEvent>()` bytes, written
    // field by field before it is submitted; the address reads write into its own arrays, and
    // `owner` was checked non-null where it is read.
    unsafe {
        (*p).ts_ns = m.ts_ns;
        (*p).cookie = m.cookie;
        (*p).skaddr = m.skaddr;
        (*p).dur_ns = m.dur_ns;
        (*p).aux_addr = m.aux_addr;
        (*p).netns = m.netns;
        (*p).ctx_pid = m.ctx_pid;
        (*p).kind = m.kind;
        (*p).family = m.family;
        (*p).old_state = m.old_state;
        (*p).new_state = m.new_state;
        (*p).sport = m.sport;
        (*p).dport = m.dport;
        (*p).payload = m.payload;
        let sa = (*p).saddr.as_mut_ptr();
        let da = (*p).daddr.as_mut_ptr();
        if m.family == tcpwatch_common::AF_INET6 {
            read_into(sa, 16, addrs.local.base + addrs.local.off6 as u64);
            read_into(da, 16, addrs.remote.base + addrs.remote.off6 as u64);
        } else {
            *(sa as *mut u64) = 0;
            *(sa as *mut u64).add(1) = 0;
            *(da as *mut u64) = 0;
            *(da as *mut u64).add(1) = 0;
            read_into(sa, 4, addrs.local.base + addrs.local.off4 as u64);
            read_into(da, 4, addrs.remote.base + addrs.remote.off4 as u64);
        }
        match owner.as_ref() {
            Some(o) => {
                (*p).pid = o.pid;
                (*p).tid = o.tid;
                (*p).cgroup_id = o.cgroup_id;
                copy16((*p).comm.as_mut_ptr(), o.comm.as_ptr());
                (*p).flags =
                    m.flags | (o.flags & (flags::OWNER_KNOWN | flags::OWNER_FROM_LISTENER));
            }
            None => {
                (*p).pid = 0;
                (*p).tid = 0;
                (*p).cgroup_id = 0;
                let c = (*p).comm.as_mut_ptr() as *mut u64;
                *c = 0;
                *c.add(1) = 0;
                (*p).flags = m.flags;
            }
        }
    }
    // Never wake the reader, which polls every 20 ms: a wakeup is an irq_work, and even checking
    // the fill level first reads the consumer's cache line (~100 ns per event, measured).
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}

#[inline(always)]
fn set_softirq(v: u32) {
    if let Some(p) = SOFTIRQ.get_ptr_mut(0) {
        // SAFETY: `p` points into this CPU's slot of a per-CPU array.
        unsafe { *p = v };
    }
}

// The context flag must never miss an update, or a softirq event would be taken for task
// context and the interrupted task named as owner. Classic tracepoints are skipped whenever any
// BPF tracing program or a BPF map syscall is active on the CPU (the global bpf_prog_active),
// so the raw BTF tracepoints, which only guard against themselves, are preferred.
#[btf_tracepoint(function = "softirq_entry")]
pub fn softirq_entry_btf(ctx: BtfTracePointContext) -> i32 {
    try_softirq_entry_btf(&ctx).unwrap_or(0)
}

fn try_softirq_entry_btf(ctx: &BtfTracePointContext) -> Result<i32, i64> {
    let vec: u32 = ctx.arg(0);
    set_softirq(vec + 1);
    Ok(0)
}

#[btf_tracepoint(function = "softirq_exit")]
pub fn softirq_exit_btf(_ctx: BtfTracePointContext) -> i32 {
    try_softirq_exit_btf(&_ctx).unwrap_or(0)
}

fn try_softirq_exit_btf(_ctx: &BtfTracePointContext) -> Result<i32, i64> {
    set_softirq(0);
    Ok(0)
}

#[tracepoint(category = "irq", name = "softirq_entry")]
pub fn softirq_entry(ctx: TracePointContext) -> u32 {
    try_softirq_entry(&ctx).unwrap_or(0)
}

fn try_softirq_entry(ctx: &TracePointContext) -> Result<u32, i64> {
    // SAFETY: `read_at` copies with bpf_probe_read from the tracepoint record, whose `vec` field is at offset 8 in every kernel's format.
    let vec: u32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    set_softirq(vec + 1);
    Ok(0)
}

#[tracepoint(category = "irq", name = "softirq_exit")]
pub fn softirq_exit(_ctx: TracePointContext) -> u32 {
    try_softirq_exit(&_ctx).unwrap_or(0)
}

fn try_softirq_exit(_ctx: &TracePointContext) -> Result<u32, i64> {
    set_softirq(0);
    Ok(0)
}

/// Never attached: userspace loads it to learn whether this kernel lets tracing programs use
/// socket local storage (5.11+), before it sets `NO_SK_STORAGE`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn probe_sk_storage(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    storage(core::ptr::addr_of!(LISTEN_SK) as *mut c_void, sk, false);
    0
}

/// Never attached: whether tracing programs may take socket cookies (5.12+).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn probe_sock_cookie(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    // SAFETY: as in `cookie_of`.
    unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(sk as *mut c_void) };
    0
}
