//! What a probe is asked for (filters, ring size, hooks to avoid, what the host offers) and
//! what it reports per signal.

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpwatch"));

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Filters applied in the kernel (0 = off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFilters {
    pub port: u16,
    pub lport: u16,
    pub rport: u16,
    pub pid: u32,
    /// 2 (AF_INET), 10 (AF_INET6) or 0.
    pub family: u8,
    pub netns: u32,
}

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub filters: KernelFilters,
    pub ring_bytes: u32,
    /// Hooks the user asked not to use (for testing fallbacks): e.g. `tp_btf`.
    pub disabled: Vec<String>,
    /// Attach the tracing programs; without it only the inventory iterator is loaded (an
    /// instant snapshot needs nothing else).
    pub trace: bool,
    /// Whether NETLINK_SOCK_DIAG answers here (the caller asks it), or why not: the inventory
    /// falls back to it, and an instant snapshot needs no BPF when it answers.
    pub sock_diag: Result<(), String>,
    /// Limits of an unprivileged listing, to report with an instant snapshot's hooks.
    pub listing_limits: Option<String>,
    /// The programs' debug diagnostics too (warnings always come).
    pub log_ebpf: bool,
    /// Maps resized from the object's defaults (tests reach their limits with these).
    pub map_entries: Vec<(String, u32)>,
    /// A quiet namespace's listeners are sampled once a second instead of four times (the
    /// always-on daemon's idle cost); a drop or a queue that fills brings it back.
    pub relaxed_sampling: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            filters: KernelFilters::default(),
            ring_bytes: 16 << 20,
            relaxed_sampling: false,
            disabled: Vec::new(),
            trace: true,
            sock_diag: Ok(()),
            listing_limits: None,
            log_ebpf: false,
            map_entries: Vec::new(),
        }
    }
}

/// Which hook serves a signal, or why none does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalStatus {
    pub signal: &'static str,
    /// The hook in use, `None` when the signal is unavailable.
    pub hook: Option<String>,
    /// Why a preferred hook was not used, or what degrades.
    pub note: Option<String>,
}

impl SignalStatus {
    pub fn line(&self) -> String {
        match (&self.hook, &self.note) {
            (Some(h), None) => format!("{}: {h}", self.signal),
            (Some(h), Some(n)) => format!("{}: {h} ({n})", self.signal),
            (None, n) => format!(
                "{}: UNAVAILABLE ({})",
                self.signal,
                n.as_deref().unwrap_or("no hook")
            ),
        }
    }
}

/// Where the socket inventory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inventory {
    /// The `iter/tcp` program: every namespace's hash tables walked in the kernel, the
    /// listeners-only walk ending at the first non-listener.
    Iter,
    /// NETLINK_SOCK_DIAG, as `ss` reads it: no BPF needed.
    SockDiag,
}

pub(super) fn one_walk(cfg: &ProbeConfig) -> bool {
    !cfg.disabled.iter().any(|d| d == "tcpdiag_getsock")
}

/// Whether this run needs BPF at all: everything but an instant snapshot served by sock_diag.
pub fn needs_bpf(cfg: &ProbeConfig) -> bool {
    cfg.trace || cfg.disabled.iter().any(|d| d == "sock_diag") || cfg.sock_diag.is_err()
}

pub(super) fn sock_diag_status(cfg: &ProbeConfig, iter_error: Option<String>) -> SignalStatus {
    match &cfg.sock_diag {
        Ok(()) => SignalStatus {
            signal: "inventory",
            hook: Some("sock_diag".into()),
            note: iter_error.map(|e| format!("iter/tcp: {e}")),
        },
        Err(e) => SignalStatus {
            signal: "inventory",
            hook: None,
            note: Some(format!(
                "{}sock_diag: {e}; sockets that existed before start are not seen",
                iter_error.map_or(String::new(), |i| format!("iter/tcp: {i}; "))
            )),
        },
    }
}
