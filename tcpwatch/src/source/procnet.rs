//! /proc/net/{netstat,snmp,sockstat}: pure parsers (fixture-tested) and per-netns readers.
use crate::model::system::{Counters, Sockstat};

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
