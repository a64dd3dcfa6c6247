//! The sysctls that govern what tcpwatch shows, read in a given network namespace (most
//! `net.ipv4.tcp_*` are per netns; `/proc/sys/net` resolves against the calling thread).
use std::collections::BTreeMap;

#[cfg(test)]
use crate::model::system::{num, port_range};

/// Every sysctl a finding or a signal refers to.
pub const NAMES: &[&str] = &[
    "net.ipv4.tcp_syn_retries",
    "net.ipv4.tcp_synack_retries",
    "net.ipv4.tcp_syn_linear_timeouts",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.somaxconn",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_abort_on_overflow",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_orphan_retries",
    "net.ipv4.tcp_retries1",
    "net.ipv4.tcp_retries2",
    "net.ipv4.tcp_congestion_control",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    // Host-wide: only the initial namespace has them.
    "net.ipv4.tcp_max_orphans",
    "net.ipv4.tcp_mem",
];

pub fn path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

/// Current values in the calling thread's netns (multi-value sysctls keep their tabs as one
/// space); sysctls this kernel lacks are left out.
pub fn read_all() -> BTreeMap<String, String> {
    NAMES
        .iter()
        .filter_map(|n| {
            let v = std::fs::read_to_string(path(n)).ok()?;
            Some((
                n.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            path("net.ipv4.tcp_fin_timeout"),
            "/proc/sys/net/ipv4/tcp_fin_timeout"
        );
    }

    #[test]
    fn reads_this_kernel() {
        let v = read_all();
        assert!(num(&v, "net.ipv4.tcp_syn_retries").is_some(), "{v:?}");
        assert!(port_range(&v).is_some());
    }
}
