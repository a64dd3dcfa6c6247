//! What the model thread is sent, and what a subscriber's stream is made of.
use tokio::sync::{mpsc, oneshot};

use crate::model::Loss;
use crate::model::api;
use crate::model::event::Event;
use crate::model::snapshot::{HookView, Snapshot, SocketView};
use crate::model::system::SockRec;
use crate::session::sampler::InventoryReader;
use crate::settings::Filters;

/// What the model thread is sent.
pub enum Up {
    Batch(Vec<Event>, Vec<SockRec>),
    /// Answer to a state request: what a scrape needs from the collector.
    State {
        inventory: InventoryReader,
        hooks: Vec<HookView>,
        loss: Loss,
        events: u64,
    },
    /// A scrape waiting for the exposition.
    Want(oneshot::Sender<String>),
    /// The live model (or a filtered view of it), for `top`.
    Live {
        filters: api::Filters,
        close_wait_secs: u64,
        connections: usize,
        reply: oneshot::Sender<anyhow::Result<(Snapshot, Vec<SocketView>, u64)>>,
    },
    /// Timelines the live model holds, by cookie or endpoints.
    Timeline {
        cookie: Option<u64>,
        local: Option<String>,
        remote: Option<String>,
        netns: Option<u32>,
        reply: oneshot::Sender<Vec<SocketView>>,
    },
    /// A new subscriber: events from now on.
    Subscribe {
        filters: Filters,
        tx: mpsc::Sender<Chunk>,
        queued: Queued,
        /// `Err` when there are `MAX_SUBSCRIBERS` already.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A piece of a subscriber's stream: notes (skipped, loss), then event lines, one per entry
/// of `walls` (their Unix times, so a stream resumed from the record can skip what it sent).
#[derive(Default)]
pub struct Chunk {
    pub notes: Vec<u8>,
    pub walls: Vec<i64>,
    pub lines: Vec<u8>,
}

impl Chunk {
    pub fn bytes(&self) -> usize {
        self.notes.len() + self.lines.len() + self.walls.len() * 8
    }
}

/// Chunks (one per batch, 50 a second at most) a subscriber's queue holds.
pub const SUB_QUEUE: usize = 512;

/// Bytes queued for one subscriber at most (its chunks not yet taken by its connection):
/// beyond it, it skips. With the connection's own buffers a stalled subscriber holds about
/// 3 MiB of the daemon's memory, and there are `MAX_SUBSCRIBERS` at most.
pub const SUB_BYTES: usize = 2 << 20;
pub const MAX_SUBSCRIBERS: usize = 64;

/// What one subscriber has queued, shared by the model thread (adds) and its connection
/// (takes).
pub type Queued = std::sync::Arc<std::sync::atomic::AtomicUsize>;
