//! What every part of the daemon shares: the session's context and clock, the status the
//! reader thread publishes, the recorder, the way to the model thread.
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use crate::model::Loss;
use crate::model::snapshot::HookView;
use crate::model::time::Clock;
use crate::recorder::Recorder;
use crate::session::Context;
use crate::session::sampler::InventoryReader;

use super::messages;

/// What the reader thread publishes every second for whoever answers a client.
pub struct Status {
    pub hooks: Vec<HookView>,
    pub loss: Loss,
    pub events_seen: u64,
    pub inventory: Option<Arc<InventoryReader>>,
}

/// What every part of the daemon shares.
pub struct Shared {
    pub ctx: Context,
    pub clock: Clock,
    pub started_wall_ns: i64,
    pub status: Mutex<Status>,
    pub recorder: Option<Arc<Recorder>>,
    /// To the model thread.
    pub up: SyncSender<messages::Up>,
    pub waker: crate::ebpf::reader::Waker,
    /// Past-window snapshots replay the record: two at a time at most (two cores).
    pub heavy: tokio::sync::Semaphore,
    pub group: Option<u32>,
}

impl Shared {
    pub fn status<T>(&self, f: impl FnOnce(&Status) -> T) -> T {
        f(&self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A monotonic time (this boot's events' clock) for a Unix time.
    pub fn mono(&self, wall_ns: i64) -> u64 {
        (wall_ns as i128 - self.clock.offset_ns).max(1) as u64
    }

    pub fn wall(&self, mono_ns: u64) -> i64 {
        self.clock.wall_ns(mono_ns) as i64
    }
}
