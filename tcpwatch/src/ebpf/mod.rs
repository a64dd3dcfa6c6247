//! Loading, configuring and attaching the eBPF programs, with one strategy list per signal chosen
//! by what this kernel accepts, plus access to the ring buffer and the kernel-side counters.
pub mod btf;
mod config;
mod counters;
pub mod decode;
mod diagnostics;
mod globals;
mod iter;
mod kallsyms;
mod probe;
pub mod reader;
pub mod records;
mod rings;
mod strategies;
pub mod tracefs;
mod verifier;

pub use config::{Inventory, KernelFilters, ProbeConfig, SignalStatus, VMLINUX_BTF, needs_bpf};
pub use counters::ProgStats;
pub use probe::Probe;
pub use rings::ring_count;
