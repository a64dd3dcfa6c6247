//! Validated settings derived from the command line: names resolved, conflicts rejected.
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::cli::{FilterArgs, ProbeArgs};
use crate::ebpf::{KernelFilters, ProbeConfig};
use crate::model::event::{Comm, Event};

/// Filters as applied: most in the kernel, `comm` in userspace.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub kernel: KernelFilters,
    pub comm: Option<Comm>,
}

impl Filters {
    pub fn from_args(a: &FilterArgs) -> anyhow::Result<Filters> {
        let netns = match &a.netns {
            Some(s) => resolve_netns(s)?,
            None if a.all_netns => 0,
            None => default_netns().unwrap_or(0),
        };
        let comm = match &a.comm {
            Some(c) if c.is_empty() || c.len() > 15 => {
                anyhow::bail!("--comm {c:?}: a command name has 1 to 15 bytes")
            }
            Some(c) => Some(Comm::new(c)),
            None => None,
        };
        Ok(Filters {
            kernel: KernelFilters {
                port: a.port.unwrap_or(0),
                lport: a.lport.unwrap_or(0),
                rport: a.rport.unwrap_or(0),
                pid: a.pid.unwrap_or(0),
                family: if a.ipv4 {
                    tcpwatch_common::AF_INET
                } else if a.ipv6 {
                    tcpwatch_common::AF_INET6
                } else {
                    0
                },
                netns,
            },
            comm,
        })
    }

    /// The filters a daemon's client asked for (validated again: the client is another
    /// process).
    pub fn from_api(f: &crate::model::api::Filters) -> anyhow::Result<Filters> {
        let comm = match &f.comm {
            Some(c) if c.is_empty() || c.len() > 15 => {
                anyhow::bail!("comm {c:?}: a command name has 1 to 15 bytes")
            }
            Some(c) => Some(Comm::new(c)),
            None => None,
        };
        let family = match f.family.as_deref() {
            None => 0,
            Some("inet") => tcpwatch_common::AF_INET,
            Some("inet6") => tcpwatch_common::AF_INET6,
            Some(other) => anyhow::bail!("family {other:?}: expected inet or inet6"),
        };
        Ok(Filters {
            kernel: KernelFilters {
                port: f.port.unwrap_or(0),
                lport: f.lport.unwrap_or(0),
                rport: f.rport.unwrap_or(0),
                pid: f.pid.unwrap_or(0),
                family,
                netns: f.netns.unwrap_or(0),
            },
            comm,
        })
    }

    /// Whether an event passes every filter (kernel side and userspace side).
    pub fn accepts_event(&self, ev: &Event) -> bool {
        self.kernel_accepts(ev) && self.accepts(ev)
    }

    /// The kernel's filters, for events made in userspace (counter-based overflows).
    pub fn kernel_accepts(&self, ev: &Event) -> bool {
        let k = &self.kernel;
        let (sp, dp) = (ev.local.port(), ev.remote.port());
        (k.netns == 0 || k.netns == ev.netns)
            && (k.family == 0
                || (k.family == tcpwatch_common::AF_INET)
                    == (ev.family == crate::model::event::Family::Inet))
            && (k.port == 0 || k.port == sp || k.port == dp)
            && (k.lport == 0 || k.lport == sp)
            && (k.rport == 0 || k.rport == dp)
    }

    /// The same filters for a socket of the inventory (`--pid`/`--comm` need its owner known).
    pub fn accepts_sock(&self, s: &crate::model::system::SockRec) -> bool {
        let k = &self.kernel;
        self.accepts_sock_tuple(s)
            && (k.pid == 0 || s.owner.is_some_and(|o| o.pid == k.pid))
            && self
                .comm
                .is_none_or(|c| s.owner.is_some_and(|o| o.comm == c))
    }

    /// Family and port filters only, for samples read without owners (listener gauges).
    pub fn accepts_sock_tuple(&self, s: &crate::model::system::SockRec) -> bool {
        let k = &self.kernel;
        let (sp, dp) = (s.local.port(), s.remote.port());
        (k.family == 0
            || (k.family == tcpwatch_common::AF_INET)
                == (s.family == crate::model::event::Family::Inet))
            && (k.port == 0 || k.port == sp || k.port == dp)
            && (k.lport == 0 || k.lport == sp)
            && (k.rport == 0 || k.rport == dp)
    }

    /// Whether some filtering is left for userspace (owners the kernel did not know).
    pub fn userspace(&self) -> bool {
        self.comm.is_some() || self.kernel.pid != 0
    }

    /// The part of the filter userspace applies, after owner resolution: `--comm`, and `--pid`
    /// for events whose owner only userspace knows (the kernel lets those through).
    pub fn accepts(&self, ev: &Event) -> bool {
        if self.kernel.pid != 0 && ev.owner.is_none_or(|o| o.pid != self.kernel.pid) {
            return false;
        }
        match &self.comm {
            Some(c) => ev.owner.is_some_and(|o| o.comm == *c),
            None => true,
        }
    }
}

/// The command line's filters as a daemon's client sends them (the namespace resolved to
/// its inode here, where the name means something).
pub fn api_filters(a: &FilterArgs) -> anyhow::Result<crate::model::api::Filters> {
    let f = Filters::from_args(a)?;
    Ok(crate::model::api::Filters {
        port: a.port,
        lport: a.lport,
        rport: a.rport,
        pid: a.pid,
        comm: a.comm.clone(),
        netns: (f.kernel.netns != 0).then_some(f.kernel.netns),
        family: if a.ipv4 {
            Some("inet".into())
        } else if a.ipv6 {
            Some("inet6".into())
        } else {
            None
        },
    })
}

pub fn probe_config(p: &ProbeArgs, filters: &Filters) -> ProbeConfig {
    ProbeConfig {
        filters: filters.kernel,
        ring_bytes: p.ring_mib << 20,
        disabled: p.disable_hook.clone(),
        log_ebpf: p.log_ebpf,
        map_entries: p.map_entries.clone(),
        ..ProbeConfig::default()
    }
}

/// A netns as an inode number (of a namespace that exists), a path to a network namespace's
/// nsfs file (opened once: its inode is what is kept), or an `ip netns` name.
pub fn resolve_netns(s: &str) -> anyhow::Result<u32> {
    use crate::source::netns;
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            anyhow::bail!("--netns 0 is not a namespace inode");
        }
        if n == own_netns() || netns::list().iter().any(|ns| ns.inode == n) {
            return Ok(n);
        }
        anyhow::bail!("--netns {n}: no network namespace has inode {n} (`lsns -t net` lists them)");
    }
    let path = if s.contains('/') {
        Path::new(s).to_path_buf()
    } else {
        Path::new("/run/netns").join(s)
    };
    match netns::inode_of(&path) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !s.contains('/') => anyhow::bail!(
            "--netns {s}: no such namespace (expected an inode number, a path like /proc/PID/ns/net, or a name in /run/netns)"
        ),
        Err(e) => anyhow::bail!("--netns {s}: {e}"),
    }
}

/// The init network namespace's inode, where the kernel fixes it (`PROC_NET_INIT_INO`,
/// recent kernels); older ones number it like any other.
const INIT_NET_INO: u32 = 0xEFFF_FFF9;
/// The init pid namespace's inode (`PROC_PID_INIT_INO`, fixed since 3.8).
const INIT_PID_INO: u64 = 0xEFFF_FFFC;

/// The namespace tcpwatch watches when none is named: its own when that is not the host's
/// (under `ip netns exec`, in a container without host networking), as `ss` and `nstat`
/// do; `None` (every namespace) in the host's.
pub fn default_netns() -> Option<u32> {
    let own = own_netns();
    if own == 0 || own == INIT_NET_INO {
        return None;
    }
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    if ino("/proc/self/ns/pid") == Some(INIT_PID_INO) {
        // The host's pids are visible: kthreadd (pid 2) lives in the host's namespace.
        // Unreadable (no privilege): keep the host-wide default.
        let kthreadd =
            std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
        return match (kthreadd, ino("/proc/2/ns/net")) {
            (true, Some(host)) if host as u32 != own => Some(own),
            _ => None,
        };
    }
    // In a container's pid namespace on a kernel without the fixed inode: the host's
    // namespace cannot be told from here, so the container's own is the scope (`--all-netns`
    // widens it).
    Some(own)
}

/// The namespace the command line leaves tcpwatch in by default (`None` when host-wide or
/// named on the command line).
pub fn default_scope(a: &FilterArgs) -> Option<u32> {
    if a.netns.is_some() || a.all_netns {
        return None;
    }
    default_netns()
}

/// A line saying the default scope is this process's namespace.
pub fn scope_note(a: &FilterArgs) -> Option<String> {
    default_scope(a).map(|n| {
        format!(
            "watching network namespace {n}, the one tcpwatch runs in (--all-netns for every namespace)"
        )
    })
}

/// Inode of the network namespace tcpwatch itself runs in.
pub fn own_netns() -> u32 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_forms() {
        let own = own_netns();
        assert_eq!(resolve_netns(&own.to_string()).unwrap(), own);
        assert!(resolve_netns("0").is_err());
        assert_eq!(resolve_netns("/proc/self/ns/net").unwrap(), own);
        let e = resolve_netns("surely-no-such-netns")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such namespace"), "{e}");
    }

    #[test]
    fn anything_but_a_network_namespace_is_refused() {
        let e = resolve_netns("/etc/passwd").unwrap_err().to_string();
        assert_eq!(
            e,
            "--netns /etc/passwd: not a namespace file (expected /proc/PID/ns/net or /run/netns/NAME)"
        );
        let e = resolve_netns("/proc/self/ns/mnt").unwrap_err().to_string();
        assert!(e.contains("not a network namespace"), "{e}");
        let e = resolve_netns("/nonexistent/ns").unwrap_err().to_string();
        assert!(e.starts_with("--netns /nonexistent/ns: "), "{e}");
        let e = resolve_netns("4294967295").unwrap_err().to_string();
        assert!(
            e.contains("no network namespace has inode 4294967295"),
            "{e}"
        );
    }

    #[test]
    fn comm_length_is_checked() {
        let a = FilterArgs {
            comm: Some("x".repeat(16)),
            ..Default::default()
        };
        assert!(Filters::from_args(&a).is_err());
        let a = FilterArgs {
            comm: Some("nginx".into()),
            ipv6: true,
            ..Default::default()
        };
        let f = Filters::from_args(&a).unwrap();
        assert_eq!(f.kernel.family, 10);
        assert_eq!(f.comm.unwrap().as_bytes(), b"nginx");
    }
}
