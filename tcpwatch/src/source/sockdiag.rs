//! The socket inventory from NETLINK_SOCK_DIAG (what `ss` reads): no BPF program to load, so an
//! instant snapshot starts in a few milliseconds, and the fallback when `iter/tcp` is missing.
//!
//! The kernel reports a timewait socket with its substate as the state and timer 3, a request
//! socket as SYN_RECV without the `INET_DIAG_INFO` attribute that every full socket carries.
//! Request sockets do not name their listener: they are matched to one by namespace and local
//! address:port, which also gives each listener its SYN queue length.
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NETLINK_HEADER_LEN, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, InetResponseBuffer, SocketId, StateFlags, Timer,
};
use netlink_packet_utils::traits::{Emitable as _, Parseable as _};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use crate::model::event::{Family, TcpState};
use crate::model::system::SockRec;

/// `struct tcp_info` offsets (uapi, append-only): retransmits, probes, and the milliseconds
/// since the last data sent, data received and ACK received.
const TI_RETRANSMITS: usize = 2;
const TI_PROBES: usize = 3;
const TI_LAST_DATA_SENT: usize = 44;
const TI_LAST_DATA_RECV: usize = 52;
const TI_LAST_ACK_RECV: usize = 56;

/// What one dump found: the sockets, and the messages that did not decode.
#[derive(Debug, Default)]
pub struct Dump {
    pub socks: Vec<SockRec>,
    pub bad: usize,
}

/// `TCPDIAG_GETSOCK`, the original request type: the kernel answers it for both families in
/// one walk of its hash tables, where SOCK_DIAG_BY_FAMILY names one family (two walks).
const TCPDIAG_GETSOCK: u16 = 18;
/// `struct inet_diag_req`: family, prefix lengths, extensions, the 48-byte socket id, states,
/// tables.
const INET_DIAG_REQ_LEN: usize = 60;

/// What to ask the kernel for.
#[derive(Clone, Copy)]
enum Request {
    /// Both families in one walk (`TCPDIAG_GETSOCK`).
    Both,
    /// One family (`SOCK_DIAG_BY_FAMILY`), for a kernel that refuses the former.
    Family(u8),
}

/// Dumps the TCP sockets of the calling thread's network namespace (`netns` is its inode, for
/// the records). `listeners_only` returns LISTEN sockets only, their SYN queues still counted.
/// `one_walk` asks for both families at once (`TCPDIAG_GETSOCK`), falling back to one request
/// per family if the kernel refuses it; without, per family from the start.
pub fn dump(netns: u32, listeners_only: bool, one_walk: bool) -> io::Result<Dump> {
    let sock = open()?;
    let states = if listeners_only {
        StateFlags::LISTEN | StateFlags::SYN_RECV
    } else {
        StateFlags::all()
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut out = Dump::default();
    if !one_walk || request(&sock, Request::Both, states, netns, &mut buf, &mut out).is_err() {
        out = Dump::default();
        let v4 = Request::Family(AF_INET);
        request(&sock, v4, states, netns, &mut buf, &mut out)?;
        // A kernel without IPv6 has no handler for it: nothing to list, not a failure.
        let v6 = Request::Family(AF_INET6);
        let _ = request(&sock, v6, states, netns, &mut buf, &mut out);
    }
    attribute_requests(&mut out.socks);
    if listeners_only {
        out.socks.retain(|s| s.state == TcpState::Listen);
    }
    Ok(out)
}

/// Whether sock_diag answers in this process's namespace, asked once (the start-up path and
/// `doctor` all want to know; the answer does not change while tcpwatch runs).
pub fn available() -> Result<(), String> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| probe().map_err(|e| e.to_string()))
        .clone()
}

/// One short walk (the listeners of this namespace) to see whether sock_diag answers.
fn probe() -> io::Result<()> {
    let sock = open()?;
    let mut buf = vec![0u8; 64 << 10];
    let states = StateFlags::LISTEN;
    let mut out = Dump::default();
    request(&sock, Request::Both, states, 0, &mut buf, &mut out).or_else(|_| {
        request(
            &sock,
            Request::Family(AF_INET),
            states,
            0,
            &mut buf,
            &mut out,
        )
    })
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&NlAddr::new(0, 0))?;
    // Fewer, larger reads: the kernel sizes its batches by the reader's buffer.
    let _ = sock.set_rx_buf_sz(1 << 20);
    Ok(sock)
}

/// One dump request, its answers decoded into `out` until the kernel says done.
fn request(
    sock: &Socket,
    req: Request,
    states: StateFlags,
    netns: u32,
    buf: &mut [u8],
    out: &mut Dump,
) -> io::Result<()> {
    sock.send(&request_bytes(req, states), 0)?;
    let now = super::host::monotonic_ns();
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let Ok(msg) = NetlinkBuffer::new_checked(&buf[off..n]) else {
                // Not even framed: the rest of this read is lost.
                out.bad += 1;
                break;
            };
            let len = msg.length() as usize;
            let payload = msg.payload();
            // Both carry an errno (negative), 0 for success; a dump that failed midway ends
            // with it in its DONE.
            let code = || {
                payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
            };
            match msg.message_type() {
                NLMSG_DONE | NLMSG_ERROR if code() < 0 => {
                    return Err(io::Error::from_raw_os_error(-code()));
                }
                NLMSG_DONE => return Ok(()),
                TCPDIAG_GETSOCK | SOCK_DIAG_BY_FAMILY => {
                    let rec = InetResponseBuffer::new_checked(payload)
                        .ok()
                        .and_then(|b| InetResponse::parse(&b).ok())
                        .and_then(|r| decode(&r, netns, now));
                    match rec {
                        Some(s) => out.socks.push(s),
                        // One socket whose attributes do not parse: skipped and counted.
                        None => out.bad += 1,
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

fn request_bytes(req: Request, states: StateFlags) -> Vec<u8> {
    let ext = ExtensionFlags::INFO | ExtensionFlags::SKMEMINFO;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    match req {
        Request::Both => {
            hdr.message_type = TCPDIAG_GETSOCK;
            hdr.length = (NETLINK_HEADER_LEN + INET_DIAG_REQ_LEN) as u32;
            let mut b = vec![0u8; hdr.length as usize];
            hdr.emit(&mut b[..NETLINK_HEADER_LEN]);
            let r = &mut b[NETLINK_HEADER_LEN..];
            // Family (ignored: both are dumped), prefix lengths 0, extensions; a zero id.
            r[3] = ext.bits();
            r[52..56].copy_from_slice(&states.bits().to_ne_bytes());
            b
        }
        Request::Family(family) => {
            let mut msg = NetlinkMessage::new(
                hdr,
                SockDiagMessage::InetRequest(InetRequest {
                    family,
                    protocol: IPPROTO_TCP,
                    extensions: ext,
                    states,
                    socket_id: if family == AF_INET {
                        SocketId::new_v4()
                    } else {
                        SocketId::new_v6()
                    },
                })
                .into(),
            );
            msg.finalize();
            let mut b = vec![0u8; msg.buffer_len()];
            msg.serialize(&mut b);
            b
        }
    }
}

/// One response as a record; `now_ns` (CLOCK_MONOTONIC) turns tcp_info's "ms ago" into a time.
/// The socket cookie stands in for the kernel address, which sock_diag does not expose.
pub fn decode(r: &InetResponse, netns: u32, now_ns: u64) -> Option<SockRec> {
    let h = &r.header;
    let family = match h.family {
        AF_INET => Family::Inet,
        AF_INET6 => Family::Inet6,
        _ => return None,
    };
    let id = &h.socket_id;
    let lo = u32::from_ne_bytes(id.cookie[..4].try_into().ok()?);
    let hi = u32::from_ne_bytes(id.cookie[4..].try_into().ok()?);
    let cookie = u64::from(lo) | (u64::from(hi) << 32);
    let reported = TcpState::from_kernel(h.state)?;
    let mut info: Option<&[u8]> = None;
    let mut drops = 0;
    for nla in &r.nlas {
        match nla {
            Nla::TcpInfo(b) => info = Some(b.as_slice()),
            Nla::MemInfo(m) => drops = m.drops,
            _ => {}
        }
    }
    let (state, substate) = match (&h.timer, info) {
        (Some(Timer::TimeWait), _) => (TcpState::TimeWait, Some(reported)),
        (_, None) if reported == TcpState::SynRecv => (TcpState::NewSynRecv, None),
        _ => (reported, None),
    };
    let byte = |off: usize| info.and_then(|b| b.get(off)).copied().unwrap_or(0);
    let ms = |off: usize| {
        info.and_then(|b| b.get(off..off + 4))
            .map(|s| u32::from_ne_bytes(s.try_into().unwrap_or([0xff; 4])))
    };
    let (retransmits, probes) = match state {
        // A request socket's count is of SYN-ACKs retransmitted.
        TcpState::NewSynRecv => (
            match h.timer {
                Some(Timer::Retransmit(_, n)) => u16::from(n),
                _ => 0,
            },
            0,
        ),
        _ => (u16::from(byte(TI_RETRANSMITS)), u16::from(byte(TI_PROBES))),
    };
    // The most recent packet either way, as the iterator's tcp_mstamp would give it.
    let last_pkt_ns = match state {
        TcpState::Listen | TcpState::TimeWait | TcpState::NewSynRecv => 0,
        _ => [TI_LAST_DATA_SENT, TI_LAST_DATA_RECV, TI_LAST_ACK_RECV]
            .into_iter()
            .filter_map(ms)
            .min()
            .map(|ago| u64::from(ago) * 1_000_000)
            .filter(|&ago| ago < now_ns)
            .map_or(0, |ago| now_ns - ago),
    };
    let listen = state == TcpState::Listen;
    Some(SockRec {
        skaddr: cookie,
        cookie,
        netns,
        family,
        state,
        substate,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        ino: u64::from(h.inode),
        uid: h.uid,
        listener: 0,
        accept_queue: if listen { h.recv_queue } else { 0 },
        accept_max: if listen { h.send_queue } else { 0 },
        syn_queue: 0,
        syn_young: 0,
        drops,
        retransmits,
        probes,
        last_pkt_ns,
        owner: None,
    })
}

/// The address as IPv4 when it is one (plain or v4-mapped), so a request on a dual-stack
/// listener compares with the listener's own address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Gives each request socket its listener (same namespace and port, the same address or a
/// wildcard one) and each listener its SYN queue: the requests it holds, and of them those
/// whose SYN-ACK was not retransmitted yet ("young", as the kernel counts them). Members of
/// an SO_REUSEPORT group cannot be told apart this way: the first one gets the requests.
pub fn attribute_requests(socks: &mut [SockRec]) {
    let mut by_port: HashMap<(u32, u16), Vec<usize>> = HashMap::new();
    for (i, s) in socks.iter().enumerate() {
        if s.state == TcpState::Listen {
            by_port
                .entry((s.netns, s.local.port()))
                .or_default()
                .push(i);
        }
    }
    for i in 0..socks.len() {
        if socks[i].state != TcpState::NewSynRecv {
            continue;
        }
        let Some(cands) = by_port.get(&(socks[i].netns, socks[i].local.port())) else {
            continue;
        };
        let want = canonical(socks[i].local.ip());
        let exact = cands
            .iter()
            .find(|&&l| canonical(socks[l].local.ip()) == want);
        // A wildcard of the request's own family first: an IPv4 request goes to 0.0.0.0
        // before a dual-stack [::] (which may be IPV6_V6ONLY) on the same port.
        let wild = cands
            .iter()
            .filter(|&&l| {
                let ip = socks[l].local.ip();
                ip.is_unspecified() && (ip.is_ipv6() || want.is_ipv4())
            })
            .min_by_key(|&&l| socks[l].local.ip().is_ipv4() != want.is_ipv4());
        let Some(&l) = exact.or(wild) else { continue };
        socks[i].listener = socks[l].skaddr;
        let young = socks[i].retransmits == 0;
        socks[l].syn_queue += 1;
        socks[l].syn_young += u32::from(young);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_sock_diag::inet::InetResponseHeader;
    use netlink_packet_sock_diag::inet::nlas::MemInfo;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn resp(
        state: u8,
        timer: Option<Timer>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> InetResponse {
        let mut cookie = [0u8; 8];
        cookie[..4].copy_from_slice(&0x1122_3344u32.to_ne_bytes());
        cookie[4..].copy_from_slice(&0x55u32.to_ne_bytes());
        InetResponse {
            header: InetResponseHeader {
                family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
                state,
                timer,
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: local.ip(),
                    destination_address: remote.ip(),
                    interface_id: 0,
                    cookie,
                },
                recv_queue: 3,
                send_queue: 128,
                uid: 1000,
                inode: 4242,
            },
            nlas: Default::default(),
        }
    }

    /// Through the wire format and back, as the kernel's bytes would arrive.
    fn wire(r: &InetResponse) -> InetResponse {
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b);
        let buf = netlink_packet_sock_diag::inet::InetResponseBuffer::new(&b[..]);
        InetResponse::parse(&buf).expect("parses back")
    }

    fn tcp_info(retrans: u8, probes: u8, sent_ms: u32, recv_ms: u32, ack_ms: u32) -> Nla {
        let mut b = vec![0u8; 232];
        b[TI_RETRANSMITS] = retrans;
        b[TI_PROBES] = probes;
        b[TI_LAST_DATA_SENT..][..4].copy_from_slice(&sent_ms.to_ne_bytes());
        b[TI_LAST_DATA_RECV..][..4].copy_from_slice(&recv_ms.to_ne_bytes());
        b[TI_LAST_ACK_RECV..][..4].copy_from_slice(&ack_ms.to_ne_bytes());
        Nla::TcpInfo(b)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_sockets_keep_state_queues_drops_and_last_packet() {
        let mut r = resp(8, None, addr("127.0.0.1:8080"), addr("10.0.0.2:40000"));
        r.nlas.push(tcp_info(2, 1, 9000, 7000, 5000));
        r.nlas.push(Nla::MemInfo(MemInfo {
            receive_queue: 0,
            receive_queue_max: 0,
            bottom_send_queues: 0,
            send_queue_max: 0,
            cache: 0,
            send_queue: 0,
            options: 0,
            backlog_queue_length: 0,
            drops: 6,
        }));
        let s = decode(&wire(&r), 77, 60_000_000_000).unwrap();
        assert_eq!(s.state, TcpState::CloseWait);
        assert_eq!(s.substate, None);
        assert_eq!(s.cookie, 0x55_1122_3344);
        assert_eq!(s.skaddr, s.cookie);
        assert_eq!((s.netns, s.ino, s.uid), (77, 4242, 1000));
        assert_eq!(s.local.to_string(), "127.0.0.1:8080");
        assert_eq!(s.remote.to_string(), "10.0.0.2:40000");
        assert_eq!((s.retransmits, s.probes, s.drops), (2, 1, 6));
        assert_eq!(
            (s.accept_queue, s.accept_max),
            (0, 0),
            "queues are listeners' only"
        );
        assert_eq!(
            s.last_pkt_ns, 55_000_000_000,
            "the most recent of the three"
        );
    }

    #[test]
    fn listeners_give_their_accept_queue() {
        let mut r = resp(10, None, addr("0.0.0.0:80"), addr("0.0.0.0:0"));
        r.nlas.push(tcp_info(0, 0, u32::MAX, u32::MAX, u32::MAX));
        let s = decode(&wire(&r), 1, 1).unwrap();
        assert_eq!(s.state, TcpState::Listen);
        assert_eq!((s.accept_queue, s.accept_max, s.last_pkt_ns), (3, 128, 0));
    }

    #[test]
    fn timewait_and_request_sockets_are_told_from_full_ones() {
        let l = addr("[::1]:443");
        let p = addr("[::1]:50000");
        let tw = decode(&wire(&resp(6, Some(Timer::TimeWait), l, p)), 1, 1).unwrap();
        assert_eq!(
            (tw.state, tw.substate),
            (TcpState::TimeWait, Some(TcpState::TimeWait))
        );
        assert_eq!(tw.family, Family::Inet6);
        let fw2 = decode(&wire(&resp(5, Some(Timer::TimeWait), l, p)), 1, 1).unwrap();
        assert_eq!(
            (fw2.state, fw2.substate),
            (TcpState::TimeWait, Some(TcpState::FinWait2))
        );
        let mut full_fw2 = resp(5, Some(Timer::KeepAlive(Duration::from_secs(1))), l, p);
        full_fw2.nlas.push(tcp_info(0, 0, 1, 1, 1));
        let full = decode(&wire(&full_fw2), 1, 10_000_000).unwrap();
        assert_eq!((full.state, full.substate), (TcpState::FinWait2, None));
        let req = resp(3, Some(Timer::Retransmit(Duration::from_secs(1), 2)), l, p);
        let req = decode(&wire(&req), 1, 1).unwrap();
        assert_eq!((req.state, req.retransmits), (TcpState::NewSynRecv, 2));
        let mut fastopen = resp(3, None, l, p);
        fastopen.nlas.push(tcp_info(0, 0, 1, 1, 1));
        let child = decode(&wire(&fastopen), 1, 10_000_000).unwrap();
        assert_eq!(child.state, TcpState::SynRecv, "a full socket in SYN_RECV");
    }

    #[test]
    fn unknown_families_and_states_are_refused() {
        let mut r = resp(0, None, addr("127.0.0.1:1"), addr("127.0.0.1:2"));
        assert!(decode(&r, 1, 1).is_none(), "state 0");
        r.header.state = 1;
        r.header.family = 1;
        assert!(decode(&r, 1, 1).is_none(), "AF_UNIX");
    }

    fn rec(state: TcpState, netns: u32, local: &str, cookie: u64, retrans: u16) -> SockRec {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        SockRec {
            skaddr: cookie,
            cookie,
            retransmits: retrans,
            ..crate::testkit::test_rec(state, netns, addr(local), any)
        }
    }

    #[test]
    fn requests_go_to_the_listener_on_their_address_else_the_wildcard() {
        let mut wild6 = rec(TcpState::Listen, 1, "[::]:80", 1, 0);
        wild6.family = Family::Inet6;
        let mut v = vec![
            wild6,
            rec(TcpState::Listen, 1, "10.0.0.1:80", 2, 0),
            rec(TcpState::Listen, 2, "0.0.0.0:80", 3, 0),
            rec(TcpState::NewSynRecv, 1, "10.0.0.1:80", 10, 0),
            rec(TcpState::NewSynRecv, 1, "10.0.0.9:80", 11, 1),
            rec(TcpState::NewSynRecv, 2, "10.0.0.9:80", 12, 0),
            rec(TcpState::NewSynRecv, 2, "10.0.0.9:81", 13, 0),
        ];
        let mut mapped = rec(TcpState::NewSynRecv, 1, "10.0.0.1:80", 14, 0);
        mapped.local = SocketAddr::new(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()), 80);
        v.push(mapped);
        let mut other6 = rec(TcpState::NewSynRecv, 1, "[::1]:80", 15, 0);
        other6.local = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 80);
        v.push(other6);
        attribute_requests(&mut v);
        let lq = |i: usize| (v[i].syn_queue, v[i].syn_young);
        assert_eq!(
            lq(0),
            (2, 1),
            "[::]:80 takes 10.0.0.9 (retransmitted) and ::1"
        );
        assert_eq!(lq(1), (2, 2), "exact address wins, v4-mapped included");
        assert_eq!(lq(2), (1, 1), "namespaces apart");
        let owner: Vec<u64> = v[3..].iter().map(|r| r.listener).collect();
        assert_eq!(owner, vec![2, 1, 3, 0, 2, 1]);
        // With both wildcards on a port, each family's requests go to its own.
        let mut both = vec![
            rec(TcpState::Listen, 1, "[::]:90", 20, 0),
            rec(TcpState::Listen, 1, "0.0.0.0:90", 21, 0),
            rec(TcpState::NewSynRecv, 1, "10.0.0.1:90", 22, 0),
            rec(TcpState::NewSynRecv, 1, "[::1]:90", 23, 0),
        ];
        attribute_requests(&mut both);
        assert_eq!((both[2].listener, both[3].listener), (21, 20));
    }
}
