//! Wire types shared by the eBPF programs and the userspace decoder: fixed-size, `#[repr(C)]`,
//! fixed-width integers only, every padding byte spelled out so the verifier accepts stack copies.
#![no_std]

/// Kinds of [`RawEvent`]. Numbers are part of the wire format: append, never renumber.
pub mod kind {
    /// `inet_sock_set_state`: `old_state`/`new_state` set, `dur_ns` = time spent in `old_state`.
    pub const STATE: u8 = 1;
    /// `tcp_retransmit_skb`: `new_state` = socket state, `arg0` = TCP flags of the skb with
    /// 0x100 set when they could be read, and in its upper 16 bits the segments the kernel
    /// counted in `RetransSegs` (0: an attempt it gave up), `arg1` = 1-based count of this
    /// socket's retransmits (attempts with no segment do not advance it),
    /// `arg2` = the kernel's `err` (as u32, 0 when the kernel has no such argument), `dur_ns` =
    /// time since the previous retransmit of this socket (0 for the first one).
    pub const RETRANSMIT: u8 = 2;
    /// `tcp_retransmit_synack`: `skaddr`/`cookie` are the listener's, the 4-tuple is the
    /// request's (local = the listener's address), `arg0` = the request's `num_retrans` before
    /// this one, `arg1` = accept queue length, `arg2` = SYN queue length, `aux_addr` = request,
    /// `dur_ns` = time since this request's previous SYN-ACK retransmit.
    pub const SYNACK_RETRANSMIT: u8 = 3;
    /// `tcp_send_reset`: `new_state` = state of the sending socket (or 0 when there is none),
    /// `arg0` = reset reason when the kernel gives one (`u32::MAX` when not).
    pub const RESET_SENT: u8 = 4;
    /// `tcp_receive_reset`: `new_state` = state of the socket that received it. For resets
    /// sent, the 4-tuple comes from the packet answered (local = its destination).
    pub const RESET_RECEIVED: u8 = 5;
    /// `inet_sk_error_report`: `arg0` = errno the socket reports (ECONNREFUSED, ETIMEDOUT, …).
    pub const SOCK_ERROR: u8 = 6;
    /// A timewait socket's timer was armed (`timer_start` with `tw_timer_handler`): a new
    /// timewait socket, or a re-arm if a cancel of the same socket just preceded it on this
    /// CPU. `skaddr` = the timewait socket, `new_state` = its substate (FIN_WAIT2/TIME_WAIT).
    pub const TW_START: u8 = 7;
    /// A timewait timer was detached (`timer_cancel`): followed on the same CPU by its expiry
    /// or a re-arm, or else the socket was descheduled (reuse, RST, netns teardown).
    /// `arg1` = 1 when `current` is a kworker.
    pub const TW_CANCEL: u8 = 8;
    /// A timewait timer fired (`timer_expire_entry`): the normal end of the socket.
    pub const TW_EXPIRE: u8 = 9;
    /// `kfree_skb` with reason `TCP_LISTEN_OVERFLOW` (accept queue full at the final ACK), or
    /// `NO_SOCKET` for a syncookie ACK while the accept queue is full: the socket is the
    /// listener, the remote side the dropped packet's source, `arg0` = accept queue length,
    /// `arg1` = its max, `arg2` = SYN queue length.
    pub const LISTEN_OVERFLOW: u8 = 10;
    /// A timewait socket's timer was re-armed, seen at the function that does it
    /// (`__inet_twsk_schedule` with `rearm`, fentry strategy): the peer's FIN turned the
    /// FIN_WAIT2 substate into TIME_WAIT, or a FIN was retransmitted. `new_state` = substate.
    pub const TW_REARM: u8 = 11;
    /// A timewait socket taken off before its timer fired, seen where the kernel does it
    /// (`inet_twsk_deschedule_put` with the timer still pending, fentry strategy): connect()
    /// reusing the tuple, a RST, netns teardown. `arg1` = 1 when `current` is a kworker.
    pub const TW_DESCHEDULE: u8 = 12;
}

/// Bits of [`RawEvent::flags`].
pub mod flags {
    /// The event ran in softirq context, so `ctx_pid` is whoever was interrupted.
    pub const SOFTIRQ: u32 = 1 << 0;
    /// `pid`/`tid`/`comm` come from the owner recorded for this socket.
    pub const OWNER_KNOWN: u32 = 1 << 1;
    /// The owner was inherited from the listener (an accepted child in softirq).
    pub const OWNER_FROM_LISTENER: u32 = 1 << 2;
    /// `cookie` is the kernel's socket cookie (tp_btf); 0 otherwise.
    pub const HAS_COOKIE: u32 = 1 << 3;
    /// `netns` was read from the socket; 0 means unknown rather than "the root netns".
    pub const HAS_NETNS: u32 = 1 << 4;
}

/// Indexes of the per-CPU `COUNTERS` array: everything the kernel side wants userspace to know
/// without sending an event.
pub mod counter {
    /// `bpf_ringbuf_reserve` failed: the event was lost in the kernel.
    pub const RINGBUF_FULL: u32 = 0;
    /// The per-socket owner map could not take a new entry.
    pub const SOCK_MAP_FULL: u32 = 1;
    /// Unused (was: events seen before filters; an atomic add per event for a diagnostic).
    pub const UNUSED_2: u32 = 2;
    /// An event was dropped by an in-kernel filter.
    pub const FILTERED: u32 = 3;
    /// State events the `nested` program handled because `main` was interrupted and skipped.
    pub const STATE_RESCUED: u32 = 4;
    /// Number of slots.
    pub const LEN: u32 = 8;
}

/// Address families as carried on the wire.
pub const AF_INET: u8 = 2;
/// Address families as carried on the wire.
pub const AF_INET6: u8 = 10;

/// Kernel TCP states (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// One record in the ring buffer. All kinds share this layout; `arg*` meanings are per kind
/// (see [`kind`]). Ports are host order; addresses are network order, IPv4 in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Socket cookie, 0 when the hook cannot give one.
    pub cookie: u64,
    /// Kernel address of the socket (full, timewait or listener): a key, never dereferenced.
    pub skaddr: u64,
    /// Kind-specific duration, see [`kind`].
    pub dur_ns: u64,
    /// Owner's cgroup id (0 unknown).
    pub cgroup_id: u64,
    /// A second kernel address where the kind needs one (the request socket of a SYN-ACK).
    pub aux_addr: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Owner's tgid (process id), 0 when unknown.
    pub pid: u32,
    /// Owner's thread id.
    pub tid: u32,
    /// tgid of `current` when the event ran (only meaningful without [`flags::SOFTIRQ`]).
    pub ctx_pid: u32,
    pub kind: u8,
    pub family: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Owner's comm, NUL-padded.
    pub comm: [u8; 16],
    /// [`flags`] bits.
    pub flags: u32,
    pub arg0: u32,
    pub arg1: u32,
    pub arg2: u32,
}

/// Per-socket state kept in the kernel: the owner and the time of the last transition.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockInfo {
    pub last_ts_ns: u64,
    pub last_retrans_ts_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub retrans: u32,
    /// [`flags`] bits describing how the owner was learned.
    pub flags: u32,
    /// `tcp_sock.total_retrans` + 1 when last read (at a transition or a retransmit), 0 when
    /// never: what each retransmit added to it is what the kernel added to `RetransSegs`.
    pub segs_base: u32,
    pub _pad: u32,
}

/// Key of the listener-owner map: accepted children inherit the owner of the listener on
/// (netns, local port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Owner of a listener, as recorded at `listen()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
}

/// One socket of the `iter/tcp` inventory (full, timewait or request socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterRec {
    pub skaddr: u64,
    pub cookie: u64,
    /// Request sockets: their listener's address (the SYN queue they sit in).
    pub listener: u64,
    /// Socket inode (full sockets that have a file), to find the owner in /proc/*/fd.
    pub ino: u64,
    /// Full sockets: `tcp_mstamp`, the CLOCK_MONOTONIC microsecond of the last packet sent or
    /// received (how long a CLOSE_WAIT socket has been idle).
    pub last_pkt_us: u64,
    pub netns: u32,
    /// Listener: packets it dropped (`sk_drops`): every listen drop, a final-ACK overflow
    /// twice, and backlog or filter drops.
    pub drops: u32,
    pub ack_backlog: u32,
    pub max_ack_backlog: u32,
    /// Listener: request sockets in its SYN queue (`icsk_accept_queue.qlen`) and how many
    /// of them have not had a SYN-ACK retransmitted (`young`).
    pub syn_qlen: u32,
    pub syn_young: u32,
    pub uid: u32,
    /// Full sockets: `icsk_retransmits` and `icsk_probes_out` of the current episode.
    pub retransmits: u16,
    pub probes: u16,
    pub family: u8,
    /// Kernel state; timewait sockets report `TIME_WAIT` here and their substate below.
    pub state: u8,
    pub substate: u8,
    pub _pad: u8,
    /// Local port (host order) and remote port (host order).
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// One socket file a process holds, from `iter/task_file`: who owns socket inode `ino`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRec {
    pub ino: u64,
    pub tgid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

/// Size of [`OwnerRec`] as written by `bpf_seq_write`.
pub const OWNER_REC_SIZE: usize = 32;
const _: () = assert!(core::mem::size_of::<OwnerRec>() == OWNER_REC_SIZE);

/// Size of [`IterRec`] as written by `bpf_seq_write`.
pub const ITER_REC_SIZE: usize = 112;
const _: () = assert!(core::mem::size_of::<IterRec>() == ITER_REC_SIZE);

/// Size of [`RawEvent`] on the wire.
pub const RAW_EVENT_SIZE: usize = 136;

const _: () = assert!(core::mem::size_of::<RawEvent>() == RAW_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<RawEvent>() == 8);
const _: () = assert!(core::mem::offset_of!(RawEvent, netns) == 48);
const _: () = assert!(core::mem::offset_of!(RawEvent, kind) == 64);
const _: () = assert!(core::mem::offset_of!(RawEvent, sport) == 68);
const _: () = assert!(core::mem::offset_of!(RawEvent, saddr) == 72);
const _: () = assert!(core::mem::offset_of!(RawEvent, comm) == 104);
const _: () = assert!(core::mem::offset_of!(RawEvent, flags) == 120);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 64);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);
const _: () = assert!(core::mem::size_of::<Owner>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` structs of integers and byte arrays with no implicit padding.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::IterRec {}
}
