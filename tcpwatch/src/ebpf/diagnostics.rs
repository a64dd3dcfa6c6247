//! The kernel side's rare diagnostics (a socket storage or map that refused an entry), sent
//! with aya-log and kept here, bounded, until a command shows them. Off the hot path: the
//! programs only log where they already count a failure.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Lines kept between two reads; more are counted, not kept.
const KEEP: usize = 64;

/// A `log::Log` for aya-log's records: shared with the probe, which hands out what it holds.
#[derive(Clone, Default)]
pub struct Diagnostics(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    lines: VecDeque<String>,
    dropped: u64,
}

impl Diagnostics {
    /// What arrived since the previous call, and how many more lines there were.
    pub fn take(&self) -> (Vec<String>, u64) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let lines = h.lines.drain(..).collect();
        (lines, std::mem::take(&mut h.dropped))
    }
}

impl log::Log for Diagnostics {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!(
            "kernel side {}: {}",
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.lines.len() < KEEP {
            h.lines.push_back(line);
        } else {
            h.dropped += 1;
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log as _;

    #[test]
    fn lines_are_bounded_and_the_rest_counted() {
        let d = Diagnostics::default();
        for i in 0..KEEP + 3 {
            d.log(
                &log::Record::builder()
                    .args(format_args!("map full {i}"))
                    .level(log::Level::Warn)
                    .build(),
            );
        }
        let (lines, dropped) = d.take();
        assert_eq!(lines.len(), KEEP);
        assert_eq!(lines[0], "kernel side warn: map full 0");
        assert_eq!(dropped, 3);
        assert_eq!(d.take(), (Vec::new(), 0));
    }
}
