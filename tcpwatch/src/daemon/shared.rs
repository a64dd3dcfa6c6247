//! What every part of the daemon shares: the session's context and clock, the status the
//! reader thread publishes, the recorder, the way to the model thread.
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use crate::model::Loss;
use crate::model::snapshot::HookView;
use crate::model::snapshot::NsInput;
use crate::model::system::SockRec;
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
    /// The last full listing (when, of which namespace, what): instant snapshots within a
    /// second share it, as scrapes do.
    pub listing: Mutex<Option<Listing>>,
    pub group: Option<u32>,
}

/// A listing read at a time, of one namespace (0: every watched one).
pub type Listing = (std::time::Instant, u32, Arc<(Vec<SockRec>, Vec<NsInput>)>);

/// How old a listing an instant snapshot may be given.
pub const LISTING_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Shared {
    /// Every socket with its owner, and each namespace's readings (namespace `netns` only
    /// if not 0, read even when the session has not found it yet): at most `LISTING_AGE`
    /// old.
    pub fn listing(&self, netns: u32) -> Arc<(Vec<SockRec>, Vec<NsInput>)> {
        let mut cache = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, ns, l)) = cache.as_ref()
            && *ns == netns
            && t.elapsed() < LISTING_AGE
        {
            return l.clone();
        }
        let read = match self.status(|s| s.inventory.clone()) {
            Some(i) => i.including(netns).read(),
            None => (Vec::new(), Vec::new()),
        };
        let l = Arc::new(read);
        *cache = Some((std::time::Instant::now(), netns, l.clone()));
        l
    }

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
