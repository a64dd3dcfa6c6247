//! What the kernel side counts without sending events: ring-full and per-kind drops, the
//! per-CPU COUNTERS slots, and each program's run statistics (run time, recursion misses).
use aya::maps::{MapData, PerCpuArray};
use tcpwatch_common::counter;

use super::probe::Probe;

/// Run statistics of one attached program (run time needs `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub name: String,
    pub run_ns: u64,
    pub runs: u64,
    /// Times the kernel skipped the program because it was already running on that CPU (a
    /// softirq interrupting it): events lost before any of our code ran.
    pub recursion_misses: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD`; aya 0.14's `ProgramInfo` does not expose `recursion_misses`.
fn prog_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: zeroed C structs are valid; the kernel fills at most info_len bytes of `info`.
    unsafe {
        let mut info: aya_obj::generated::bpf_prog_info = std::mem::zeroed();
        let mut attr: aya_obj::generated::bpf_attr = std::mem::zeroed();
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info_len = std::mem::size_of_val(&info) as u32;
        attr.info.info = &mut info as *mut _ as u64;
        let rc = libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut _,
            std::mem::size_of_val(&attr),
        );
        (rc == 0).then_some(info)
    }
}

impl Probe {
    /// Sum over CPUs of one kernel-side counter.
    pub fn counter(&self, idx: u32) -> u64 {
        match self.counters.as_ref().map(|c| c.get(&idx, 0)) {
            Some(Ok(v)) => v.iter().sum(),
            _ => 0,
        }
    }

    pub fn kernel_dropped(&self) -> u64 {
        self.counter(counter::RINGBUF_FULL)
    }

    /// Records lost to a full ring, by wire kind (see `tcpwatch_common::kind`).
    pub fn kernel_dropped_by_kind(&self) -> [u64; 16] {
        let mut out = [0u64; 16];
        let Some(map) = self.ebpf.as_ref().and_then(|e| e.map("DROPS_BY_KIND")) else {
            return out;
        };
        let Ok(arr) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return out;
        };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = arr.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// Statistics of every loaded program.
    pub fn program_stats(&self) -> Vec<ProgStats> {
        use std::os::fd::AsFd as _;
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.iter().flat_map(|e| e.programs()) {
            let Ok(fd) = prog.fd() else { continue };
            if let Some(i) = prog_info(fd.as_fd()) {
                out.push(ProgStats {
                    name: name.to_string(),
                    run_ns: i.run_time_ns,
                    runs: i.run_cnt,
                    recursion_misses: i.recursion_misses,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Events the kernel never handed to our programs (see [`ProgStats::recursion_misses`]).
    /// `state_btf_nested` skips by design and rescues `state_btf_main`'s skips.
    pub fn recursion_misses(&self) -> u64 {
        let rescued = self.counter(counter::STATE_RESCUED);
        self.program_stats()
            .iter()
            .map(|p| match p.name.as_str() {
                "state_btf_nested" => 0,
                "state_btf_main" => p.recursion_misses.saturating_sub(rescued),
                _ => p.recursion_misses,
            })
            .sum()
    }
}
