//! The pure side of tcpwatch: decoded events, owner resolution, and (later) aggregation.
pub mod event;
pub mod overflow;
pub mod owners;
pub mod reorder;
pub mod timewait;

/// Events the pipeline lost, reported in every output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    /// Records the kernel could not put into the ring buffer.
    pub kernel_dropped: u64,
    /// Events the kernel did not run our programs for (recursion on the same CPU).
    pub kernel_skipped: u64,
    /// Batches of records userspace dropped between threads.
    pub channel_dropped: u64,
    /// Records that did not decode.
    pub decode_errors: u64,
}

impl Loss {
    pub fn total(&self) -> u64 {
        self.kernel_dropped + self.kernel_skipped + self.channel_dropped + self.decode_errors
    }
}
