//! Kernel text symbol addresses from /proc/kallsyms, cached per boot (the timer hooks need
//! `tw_timer_handler`'s address to recognise timewait timers).
use std::path::Path;

use super::btf;

/// Address of a text symbol in /proc/kallsyms content (0 when absent or hidden).
pub fn kallsyms_addr(text: &str, name: &str) -> u64 {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_ty), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if sym == name && it.next().is_none() {
            return u64::from_str_radix(addr, 16).unwrap_or(0);
        }
    }
    0
}

/// A text symbol's address, cached per boot in /run/tcpwatch (reading /proc/kallsyms takes
/// ~50 ms; the address only changes with a reboot, which also clears /run).
pub fn kallsyms_cached(name: &str) -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let file = Path::new(btf::CACHE_DIR).join(format!("kallsyms-{name}"));
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((b, a)) = text.split_once(' ')
        && b == boot.trim()
        && let Ok(addr) = u64::from_str_radix(a.trim(), 16)
    {
        return addr;
    }
    let addr = std::fs::read_to_string("/proc/kallsyms")
        .map(|t| kallsyms_addr(&t, name))
        .unwrap_or(0);
    if addr != 0 && std::fs::create_dir_all(btf::CACHE_DIR).is_ok() {
        let _ = std::fs::write(&file, format!("{} {addr:x}", boot.trim()));
    }
    addr
}
