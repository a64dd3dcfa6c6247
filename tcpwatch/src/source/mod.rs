//! Everything read from the running system besides the eBPF events: network namespaces,
//! /proc/net counters, sysctls, socket owners from /proc/*/fd, the iter/tcp and sock_diag inventories.
pub mod caps;
pub mod daemon;
pub mod files;
pub mod host;
pub mod netns;
pub mod procfd;
pub mod procnet;
pub mod replay;
pub mod scope;
pub mod sockdiag;
pub mod sysctl;
