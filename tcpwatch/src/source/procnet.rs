//! /proc/net/{netstat,snmp,sockstat}: pure parsers (fixture-tested) and per-netns readers.
use std::collections::BTreeMap;

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

/// Counters of the calling thread's network namespace.
pub fn read_counters() -> std::io::Result<Counters> {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    Ok(Counters::parse(&netstat).merge(Counters::parse(&snmp)))
}

/// sockstat of the calling thread's network namespace.
pub fn read_sockstat() -> std::io::Result<Sockstat> {
    Ok(Sockstat::parse(&std::fs::read_to_string(
        "/proc/thread-self/net/sockstat",
    )?))
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
}
