//! Writers that turn model events and snapshots into text, JSON and exit codes. Pure: they never
//! touch aya, netlink or /proc.
pub mod check;
pub mod json;
pub mod prometheus;
pub mod snapshot;
pub mod trace;
pub mod tui;

pub use crate::model::event::{rst_reason_name, set_rst_reasons};

/// Converts CLOCK_MONOTONIC nanoseconds into wall-clock time for human output.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime − monotonic, in ns.
    pub offset_ns: i128,
    /// Seconds east of UTC for the local time zone.
    pub utc_offset_s: i64,
}

impl Clock {
    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// `HH:MM:SS.uuuuuu` local time.
    pub fn hms(&self, mono_ns: u64) -> String {
        let wall = self.wall_ns(mono_ns) + self.utc_offset_s as i128 * 1_000_000_000;
        let secs = wall.div_euclid(1_000_000_000);
        let us = wall.rem_euclid(1_000_000_000) / 1000;
        let day = secs.rem_euclid(86_400);
        format!(
            "{:02}:{:02}:{:02}.{:06}",
            day / 3600,
            day % 3600 / 60,
            day % 60,
            us
        )
    }
}

/// Human duration: `812ns`, `3.2us`, `15.0ms`, `2.05s`, `3m12s`.
pub fn human_ns(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}us", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else if ns < 120_000_000_000 {
        format!("{:.2}s", ns as f64 / 1e9)
    } else {
        let s = ns / 1_000_000_000;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(812), "812ns");
        assert_eq!(human_ns(3_200), "3.2us");
        assert_eq!(human_ns(15_000_000), "15.0ms");
        assert_eq!(human_ns(2_050_000_000), "2.05s");
        assert_eq!(human_ns(192_000_000_000), "3m12s");
    }

    #[test]
    fn clock_formats_local_time() {
        let c = Clock {
            offset_ns: 3_600_000_000_000,
            utc_offset_s: 0,
        };
        assert_eq!(c.hms(1_500_000), "01:00:00.001500");
    }
}
