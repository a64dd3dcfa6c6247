//! The pure side of tcpwatch: decoded events, owner resolution, and (later) aggregation.
pub mod aggregate;
pub mod api;
pub mod check;
pub mod endpoints;
pub mod event;
pub mod findings;
pub mod history;
pub mod overflow;
pub mod owners;
pub mod reorder;
pub mod slab;
pub mod snapshot;
pub mod system;
pub mod time;
pub mod timewait;

/// Events the pipeline lost, reported in every output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    /// Records the kernel could not put into the ring buffer.
    pub kernel_dropped: u64,
    /// The same by output type (`state`, `retransmit`, ...).
    pub kernel_dropped_by_type: ByType,
    /// Events the kernel did not run our programs for (recursion on the same CPU).
    pub kernel_skipped: u64,
    /// Batches of records userspace dropped between threads.
    pub channel_dropped: u64,
    /// Records that did not decode.
    pub decode_errors: u64,
}

/// Counts per output event type, in a fixed order (no allocation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByType(pub [u64; ByType::NAMES.len()]);

impl ByType {
    pub const NAMES: [&'static str; 6] = [
        "state",
        "retransmit",
        "reset",
        "error",
        "timewait",
        "overflow",
    ];

    /// Folds per-wire-kind counts (`tcpwatch_common::kind`) into output types.
    pub fn from_wire(by_kind: &[u64; 16]) -> ByType {
        use tcpwatch_common::kind as k;
        let mut t = [0u64; 6];
        for (kind, n) in by_kind.iter().enumerate() {
            let i = match kind as u8 {
                k::STATE => 0,
                k::RETRANSMIT | k::SYNACK_RETRANSMIT => 1,
                k::RESET_SENT | k::RESET_RECEIVED => 2,
                k::SOCK_ERROR => 3,
                k::TW_START | k::TW_CANCEL | k::TW_EXPIRE | k::TW_REARM | k::TW_DESCHEDULE => 4,
                k::LISTEN_OVERFLOW => 5,
                _ => continue,
            };
            t[i] += n;
        }
        ByType(t)
    }

    pub fn minus(&self, o: &ByType) -> ByType {
        let mut t = self.0;
        for (a, b) in t.iter_mut().zip(o.0) {
            *a = a.saturating_sub(b);
        }
        ByType(t)
    }

    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::NAMES
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (*k, n))
    }
}

impl Loss {
    pub fn total(&self) -> u64 {
        self.kernel_dropped + self.kernel_skipped + self.channel_dropped + self.decode_errors
    }

    /// What was lost since `prev` (an earlier reading of the same account).
    pub fn minus(&self, prev: &Loss) -> Loss {
        Loss {
            kernel_dropped: self.kernel_dropped.saturating_sub(prev.kernel_dropped),
            kernel_dropped_by_type: self
                .kernel_dropped_by_type
                .minus(&prev.kernel_dropped_by_type),
            kernel_skipped: self.kernel_skipped.saturating_sub(prev.kernel_skipped),
            channel_dropped: self.channel_dropped.saturating_sub(prev.channel_dropped),
            decode_errors: self.decode_errors.saturating_sub(prev.decode_errors),
        }
    }

    /// The kinds of loss `trace` and `snapshot` name on stderr.
    pub fn breakdown(&self) -> String {
        format!(
            "kernel ring full {}, skipped by the kernel {}, undecodable {}",
            self.kernel_dropped, self.kernel_skipped, self.decode_errors
        )
    }
}
