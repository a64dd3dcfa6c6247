//! What the kernel reports about sockets, counters and sysctls, as plain data: one listed
//! socket, the MIB counters and sockstat of a namespace (with their pure text parsers), and
//! the sysctl values findings quote. Reading them is `source`'s job.
use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::event::{Family, Owner, TcpState};

/// One socket as the kernel listed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SockRec {
    pub skaddr: u64,
    pub cookie: u64,
    pub netns: u32,
    pub family: Family,
    pub state: TcpState,
    /// Timewait sockets: FIN_WAIT2 or TIME_WAIT.
    pub substate: Option<TcpState>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub ino: u64,
    pub uid: u32,
    /// Request sockets: the listener whose SYN queue holds them.
    pub listener: u64,
    pub accept_queue: u32,
    pub accept_max: u32,
    pub syn_queue: u32,
    pub syn_young: u32,
    pub drops: u32,
    pub retransmits: u16,
    pub probes: u16,
    /// Full sockets: CLOCK_MONOTONIC time of the last packet, ns (0 unknown).
    pub last_pkt_ns: u64,
    pub owner: Option<Owner>,
}

/// The state `ss` would print: a timewait socket in its FIN_WAIT2 substate shows as FIN-WAIT-2,
/// a request socket as SYN-RECV.
pub fn ss_state(s: &SockRec) -> TcpState {
    match (s.state, s.substate) {
        (TcpState::TimeWait, Some(sub)) => sub,
        (TcpState::NewSynRecv, _) => TcpState::SynRecv,
        (st, _) => st,
    }
}

/// Kernel MIB counters by "Group:Name" (e.g. `TcpExt:ListenOverflows`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Parses the header-line / value-line pairs of /proc/net/netstat or /proc/net/snmp.
    pub fn parse(text: &str) -> Counters {
        let mut out = BTreeMap::new();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i + 1 < lines.len() {
            let (h, v) = (lines[i], lines[i + 1]);
            let (Some((hg, hn)), Some((vg, vv))) = (h.split_once(':'), v.split_once(':')) else {
                i += 1;
                continue;
            };
            if hg != vg {
                i += 1;
                continue;
            }
            for (name, val) in hn.split_whitespace().zip(vv.split_whitespace()) {
                // Some snmp fields (Tcp MaxConn) are -1: keep only counters.
                if let Ok(n) = val.parse::<u64>() {
                    out.insert(format!("{hg}:{name}"), n);
                }
            }
            i += 2;
        }
        Counters(out)
    }

    pub fn merge(mut self, other: Counters) -> Counters {
        self.0.extend(other.0);
        self
    }

    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// Counter increases since `prev` (a counter that went down, e.g. after a reset, counts
    /// from zero).
    pub fn delta(&self, prev: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| {
                    let p = prev.0.get(k).copied().unwrap_or(0);
                    (k.clone(), if *v >= p { v - p } else { *v })
                })
                .collect(),
        )
    }
}

/// The TCP line of /proc/net/sockstat (and the TCP6 in-use count of sockstat6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem_pages: u64,
}

impl Sockstat {
    pub fn parse(text: &str) -> Sockstat {
        let mut s = Sockstat::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("TCP: ") else {
                continue;
            };
            let w: Vec<&str> = rest.split_whitespace().collect();
            for pair in w.chunks(2) {
                if let [k, v] = pair {
                    let v = v.parse().unwrap_or(0);
                    match *k {
                        "inuse" => s.inuse = v,
                        "orphan" => s.orphan = v,
                        "tw" => s.tw = v,
                        "alloc" => s.alloc = v,
                        "mem" => s.mem_pages = v,
                        _ => {}
                    }
                }
            }
        }
        s
    }
}

/// A numeric sysctl from a map read by `source::sysctl::read_all`.
pub fn num(values: &BTreeMap<String, String>, name: &str) -> Option<i64> {
    values.get(name)?.split_whitespace().next()?.parse().ok()
}

/// `ip_local_port_range` as (low, high).
pub fn port_range(values: &BTreeMap<String, String>) -> Option<(u16, u16)> {
    let v = values.get("net.ipv4.ip_local_port_range")?;
    let mut it = v.split_whitespace().map(|x| x.parse::<u16>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Symbolic errno names for the errors TCP sockets report.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => "E?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPReqQFullDoCookies TCPReqQFullDrop TW
TcpExt: 7 0 24 24 7 14 335
IpExt: InNoRoutes InOctets
IpExt: 0 6064804
";
    const SNMP: &str = "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens RetransSegs
Tcp: 1 200 120000 -1 337 4
";
    const SOCKSTAT: &str = "sockets: used 5
TCP: inuse 3 orphan 1 tw 598 alloc 4 mem 2
UDP: inuse 0 mem 0
";

    #[test]
    fn parses_netstat_and_snmp() {
        let c = Counters::parse(NETSTAT).merge(Counters::parse(SNMP));
        assert_eq!(c.get("TcpExt:ListenOverflows"), 24);
        assert_eq!(c.get("TcpExt:TCPReqQFullDrop"), 14);
        assert_eq!(c.get("TcpExt:TW"), 335);
        assert_eq!(c.get("IpExt:InOctets"), 6064804);
        assert_eq!(c.get("Tcp:ActiveOpens"), 337);
        assert_eq!(c.get("Tcp:RetransSegs"), 4);
        assert!(!c.0.contains_key("Tcp:MaxConn"), "-1 is not a counter");
        assert_eq!(c.get("TcpExt:Nope"), 0);
    }

    #[test]
    fn deltas() {
        let a = Counters::parse(NETSTAT);
        let b = Counters::parse(&NETSTAT.replace("7 0 24 24", "9 0 30 31"));
        let d = b.delta(&a);
        assert_eq!(d.get("TcpExt:SyncookiesSent"), 2);
        assert_eq!(d.get("TcpExt:ListenOverflows"), 6);
        assert_eq!(d.get("TcpExt:ListenDrops"), 7);
        assert_eq!(d.get("TcpExt:TW"), 0);
        let reset = Counters::parse(&NETSTAT.replace("7 0 24 24", "1 0 24 24"));
        assert_eq!(reset.delta(&a).get("TcpExt:SyncookiesSent"), 1);
    }

    #[test]
    fn parses_sockstat() {
        let s = Sockstat::parse(SOCKSTAT);
        assert_eq!(
            s,
            Sockstat {
                inuse: 3,
                orphan: 1,
                tw: 598,
                alloc: 4,
                mem_pages: 2
            }
        );
        assert_eq!(Sockstat::parse("garbage"), Sockstat::default());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let c = Counters::parse("TcpExt: A B\nIpExt: 1 2\nTcpExt: A\nTcpExt: x\n");
        assert!(c.0.is_empty());
    }

    #[test]
    fn sysctl_values() {
        let mut m = BTreeMap::new();
        m.insert(
            "net.ipv4.ip_local_port_range".to_string(),
            "32768 60999".to_string(),
        );
        m.insert("net.ipv4.tcp_syncookies".to_string(), "1".to_string());
        assert_eq!(port_range(&m), Some((32768, 60999)));
        assert_eq!(num(&m, "net.ipv4.tcp_syncookies"), Some(1));
        assert_eq!(num(&m, "net.ipv4.tcp_fin_timeout"), None);
    }
}
