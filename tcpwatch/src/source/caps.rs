//! Privilege check before touching BPF, so the user gets one line naming what is missing instead
//! of an EPERM from deep inside the loader.
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYSLOG: u32 = 34;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process, from `/proc/self/status`.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// What is missing to load and attach tracing programs, or `None` when nothing is.
pub fn missing_for_tracing(cap_eff: u64) -> Option<String> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    Some(format!(
        "tcpwatch needs root, or CAP_BPF and CAP_PERFMON (missing: {}); run it with sudo",
        missing.join(", ")
    ))
}

/// Whether this process may enter other network namespaces (setns needs CAP_SYS_ADMIN).
pub fn can_enter_namespaces() -> bool {
    effective().is_some_and(|c| c & (1u64 << CAP_SYS_ADMIN) != 0)
}

/// What a socket listing without BPF misses at these capabilities, or `None` when nothing:
/// other namespaces (CAP_SYS_ADMIN) and the owners of other users' sockets (CAP_SYS_PTRACE,
/// for their /proc/PID/fd).
pub fn listing_limits(cap_eff: u64) -> Option<String> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    let mut lost = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        lost.push("this network namespace only (others need CAP_SYS_ADMIN)");
    }
    if !has(CAP_SYS_PTRACE) {
        lost.push("owners of this user's processes only (others need CAP_SYS_PTRACE)");
    }
    (!lost.is_empty()).then(|| format!("not root: {}", lost.join("; ")))
}

/// What the event modes miss at these capabilities beyond the listing's limits, or `None`:
/// TIME_WAIT timers (tw_timer_handler's address, CAP_SYSLOG) and the classic tracepoint
/// fallbacks (tracefs, CAP_DAC_READ_SEARCH).
pub fn tracing_limits(cap_eff: u64) -> Option<String> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    // Owners come from the kernel's task iterator there: no /proc/PID/fd to be denied.
    let mut lost: Vec<String> = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        lost.push(
            "this network namespace's sockets and counters only (others need CAP_SYS_ADMIN)".into(),
        );
    }
    if !has(CAP_SYSLOG) && !has(CAP_SYS_ADMIN) {
        lost.push(
            "no TIME_WAIT timer events where the kernel has no BPF trampolines (tw_timer_handler's address needs CAP_SYSLOG)".into(),
        );
    }
    if !has(CAP_DAC_READ_SEARCH) && !has(CAP_DAC_OVERRIDE) {
        lost.push("no classic tracepoint fallbacks (tracefs needs CAP_DAC_READ_SEARCH)".into());
    }
    (!lost.is_empty()).then(|| format!("not root: {}", lost.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_bpf_perfmon_suffice() {
        assert_eq!(missing_for_tracing(0x000001ffffffffff), None);
        assert_eq!(
            missing_for_tracing((1 << CAP_BPF) | (1 << CAP_PERFMON)),
            None
        );
        assert_eq!(missing_for_tracing(1 << CAP_SYS_ADMIN), None);
    }

    #[test]
    fn names_what_is_missing() {
        let m = missing_for_tracing(1 << CAP_BPF).unwrap();
        assert!(m.contains("missing: CAP_PERFMON"), "{m}");
        let m = missing_for_tracing(0).unwrap();
        assert!(m.contains("missing: CAP_BPF, CAP_PERFMON"), "{m}");
    }

    #[test]
    fn a_listing_names_what_it_cannot_see() {
        assert_eq!(listing_limits(0x000001ffffffffff), None);
        let m = listing_limits(0).unwrap();
        assert!(
            m.contains("CAP_SYS_ADMIN") && m.contains("CAP_SYS_PTRACE"),
            "{m}"
        );
        let m = listing_limits(1 << CAP_SYS_ADMIN).unwrap();
        assert!(
            !m.contains("CAP_SYS_ADMIN") && m.contains("CAP_SYS_PTRACE"),
            "{m}"
        );
    }

    #[test]
    fn the_event_modes_name_what_bpf_and_perfmon_alone_miss() {
        assert_eq!(tracing_limits(0x000001ffffffffff), None);
        let m = tracing_limits((1 << CAP_BPF) | (1 << CAP_PERFMON)).unwrap();
        for cap in ["CAP_SYS_ADMIN", "CAP_SYSLOG", "CAP_DAC_READ_SEARCH"] {
            assert!(m.contains(cap), "{cap}: {m}");
        }
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(s), Some(0x000001ffffffffff));
        assert_eq!(parse_cap_eff("Name: x"), None);
    }
}
