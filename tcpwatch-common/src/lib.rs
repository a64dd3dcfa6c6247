//! Wire types shared by the eBPF programs and the userspace decoder: fixed-size, `#[repr(C)]`,
//! fixed-width integers only, every padding byte spelled out so the verifier accepts stack copies.
#![no_std]

/// Kinds of [`RawEvent`]. Numbers are part of the wire format: append, never renumber. Each
/// kind's own fields are its [`Payload`] member, named in its line.
pub mod kind {
    /// `inet_sock_set_state`: `old_state`/`new_state` set, `dur_ns` = time spent in
    /// `old_state`. No payload.
    pub const STATE: u8 = 1;
    /// `tcp_retransmit_skb`: `new_state` = socket state, `dur_ns` = time since the previous
    /// retransmit of this socket (0 for the first one). Payload [`super::RetransmitArgs`].
    pub const RETRANSMIT: u8 = 2;
    /// `tcp_retransmit_synack`: `skaddr`/`cookie` are the listener's, the 4-tuple is the
    /// request's (local = the listener's address), `aux_addr` = request, `dur_ns` = time since
    /// this request's previous SYN-ACK retransmit. Payload [`super::SynAckArgs`].
    pub const SYNACK_RETRANSMIT: u8 = 3;
    /// `tcp_send_reset`: `new_state` = state of the sending socket (or 0 when there is none).
    /// For resets sent, the 4-tuple comes from the packet answered (local = its destination).
    /// Payload [`super::ResetArgs`].
    pub const RESET_SENT: u8 = 4;
    /// `tcp_receive_reset`: `new_state` = state of the socket that received it. Payload
    /// [`super::ResetArgs`] (no reason).
    pub const RESET_RECEIVED: u8 = 5;
    /// `inet_sk_error_report`. Payload [`super::ErrorArgs`].
    pub const SOCK_ERROR: u8 = 6;
    /// A timewait socket's timer was armed (`timer_start` with `tw_timer_handler`): a new
    /// timewait socket, or a re-arm if a cancel of the same socket just preceded it on this
    /// CPU. `skaddr` = the timewait socket, `new_state` = its substate (FIN_WAIT2/TIME_WAIT).
    /// Payload [`super::TimerArgs`].
    pub const TW_START: u8 = 7;
    /// A timewait timer was detached (`timer_cancel`): followed on the same CPU by its expiry
    /// or a re-arm, or else the socket was descheduled (reuse, RST, netns teardown).
    pub const TW_CANCEL: u8 = 8;
    /// A timewait timer fired (`timer_expire_entry`): the normal end of the socket.
    pub const TW_EXPIRE: u8 = 9;
    /// `kfree_skb` with reason `TCP_LISTEN_OVERFLOW` (accept queue full at the final ACK), or
    /// `NO_SOCKET` for a syncookie ACK while the accept queue is full: the socket is the
    /// listener, the remote side the dropped packet's source. Payload
    /// [`super::OverflowArgs`].
    pub const LISTEN_OVERFLOW: u8 = 10;
    /// A timewait socket's timer was re-armed, seen at the function that does it
    /// (`__inet_twsk_schedule` with `rearm`, fentry strategy): the peer's FIN turned the
    /// FIN_WAIT2 substate into TIME_WAIT, or a FIN was retransmitted. `new_state` = substate.
    pub const TW_REARM: u8 = 11;
    /// A timewait socket taken off before its timer fired, seen where the kernel does it
    /// (`inet_twsk_deschedule_put` with the timer still pending, fentry strategy): connect()
    /// reusing the tuple, a RST, netns teardown.
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

/// One record in the ring buffer: a header every kind shares, then the kind's own fields
/// ([`Payload`]). Ports are host order; addresses are network order, IPv4 in the first 4
/// bytes.
#[repr(C)]
#[derive(Clone, Copy)]
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
    /// The kind's own fields: which member is set is told by `kind`.
    pub payload: Payload,
}

/// The fields of one kind of record. Every member is plain integers of the same 12 bytes, so
/// reading any member is sound whatever was written; `kind` says which one means something.
#[repr(C)]
#[derive(Clone, Copy)]
pub union Payload {
    pub retransmit: RetransmitArgs,
    pub synack: SynAckArgs,
    pub reset: ResetArgs,
    pub error: ErrorArgs,
    pub timer: TimerArgs,
    pub overflow: OverflowArgs,
    /// The bytes as written, for kinds without fields (zero).
    pub raw: [u32; 3],
}

// The readers: any member of a `Payload` is plain integers of the same 12 bytes, so reading
// whichever one `kind` names is sound whatever was written.
macro_rules! readers {
    ($($name:ident: $ty:ty),*) => {
        impl Payload {
            $(
                pub fn $name(&self) -> $ty {
                    // SAFETY: every member is `repr(C)` integers filling the same 12 bytes:
                    // any bit pattern is a valid value of any of them.
                    unsafe { self.$name }
                }
            )*
        }
    };
}

readers!(
    retransmit: RetransmitArgs,
    synack: SynAckArgs,
    reset: ResetArgs,
    error: ErrorArgs,
    timer: TimerArgs,
    overflow: OverflowArgs
);

/// [`kind::RETRANSMIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitArgs {
    /// TCP flags of the skb, with [`RetransmitArgs::FLAGS_VALID`] set when they could be read.
    pub tcp_flags: u16,
    /// Segments the kernel added to `RetransSegs` for it (0: an attempt it gave up).
    pub segs: u16,
    /// 1-based count of this socket's retransmits (attempts with no segment do not advance
    /// it).
    pub nth: u32,
    /// The kernel's `err` (0 where the tracepoint has no such argument, before 6.10).
    pub err: i32,
}

impl RetransmitArgs {
    /// Set in `tcp_flags` when the skb's flags could be read.
    pub const FLAGS_VALID: u16 = 0x100;
}

/// [`kind::SYNACK_RETRANSMIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynAckArgs {
    /// The request's `num_retrans` before this one.
    pub num_retrans: u32,
    /// The listener's accept queue length and SYN queue length.
    pub accept_queue: u32,
    pub syn_queue: u32,
}

/// [`kind::RESET_SENT`], [`kind::RESET_RECEIVED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetArgs {
    /// The kernel's reset reason (`enum sk_rst_reason`), [`ResetArgs::NO_REASON`] when it
    /// gives none.
    pub reason: u32,
    pub _pad: [u32; 2],
}

impl ResetArgs {
    pub const NO_REASON: u32 = u32::MAX;
}

/// [`kind::SOCK_ERROR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorArgs {
    /// The errno the socket reports (ECONNREFUSED, ETIMEDOUT, ...).
    pub errno: i32,
    pub _pad: [u32; 2],
}

/// [`kind::TW_START`] and the other timewait kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerArgs {
    pub _pad0: u32,
    /// 1 when `current` is a kworker (a cancel or deschedule by netns teardown).
    pub kworker: u32,
    pub _pad1: u32,
}

/// [`kind::LISTEN_OVERFLOW`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowArgs {
    /// The listener's accept queue length and limit, and SYN queue length.
    pub accept_queue: u32,
    pub accept_max: u32,
    pub syn_queue: u32,
}

impl Default for RawEvent {
    fn default() -> Self {
        RawEvent {
            ts_ns: 0,
            cookie: 0,
            skaddr: 0,
            dur_ns: 0,
            cgroup_id: 0,
            aux_addr: 0,
            netns: 0,
            pid: 0,
            tid: 0,
            ctx_pid: 0,
            kind: 0,
            family: 0,
            old_state: 0,
            new_state: 0,
            sport: 0,
            dport: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            flags: 0,
            payload: Payload { raw: [0; 3] },
        }
    }
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
const _: () = assert!(core::mem::offset_of!(RawEvent, payload) == 124);
const _: () = assert!(core::mem::size_of::<Payload>() == 12);
const _: () = assert!(core::mem::size_of::<RetransmitArgs>() == 12);
const _: () = assert!(core::mem::size_of::<SynAckArgs>() == 12);
const _: () = assert!(core::mem::size_of::<ResetArgs>() == 12);
const _: () = assert!(core::mem::size_of::<ErrorArgs>() == 12);
const _: () = assert!(core::mem::size_of::<TimerArgs>() == 12);
const _: () = assert!(core::mem::size_of::<OverflowArgs>() == 12);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 64);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);
const _: () = assert!(core::mem::size_of::<Owner>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (each impl): plain `repr(C)` structs of integers and byte arrays (and a union of
    // such structs, all of one size) with every padding byte spelled out, so any bit pattern
    // is a valid value and copying bytes in and out is sound.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SockInfo {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Owner {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::IterRec {}
}
