//! Writers that turn model events and snapshots into text, JSON and exit codes. Pure: they never
//! touch aya, netlink or /proc.
pub mod check;
pub mod history;
pub mod json;
pub mod printable;
pub mod prometheus;
pub mod snapshot;
pub mod trace;
pub mod tui;

pub use crate::model::time::Clock;

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
}
