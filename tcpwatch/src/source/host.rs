//! Facts about the host read once or on demand: the clocks (monotonic now, and the
//! wall-clock offset outputs render with), the host name and the kernel release.
use crate::model::time::Clock;

/// CLOCK_MONOTONIC now, in ns: the time base of every kernel event.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The offset between CLOCK_REALTIME and CLOCK_MONOTONIC, and the local time zone's.
pub fn wall_clock() -> Clock {
    let now = |id| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid clock ids and a valid out pointer.
        unsafe { libc::clock_gettime(id, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    let offset_ns = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    // SAFETY: localtime_r with valid pointers.
    let utc_offset_s = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm.tm_gmtoff
    };
    Clock {
        offset_ns,
        utc_offset_s,
    }
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
