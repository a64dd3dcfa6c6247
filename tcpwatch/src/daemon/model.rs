//! The model thread: the live analysis of the whole host (and filtered views of it for
//! clients that asked with filters), the 10-second frames, the subscribers' streams and the
//! metrics. It hands the recorder every event, each frame and the closed timelines. Requests
//! are answered between two batches; a subscriber that does not keep up skips, and is told.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::messages::{Chunk, Up};
use super::shared::Shared;
use crate::model::Loss;
use crate::model::api::{self, StreamNote};
use crate::model::event::Event;
use crate::model::history::{FRAME_NS, FrameBuilder, interest};
use crate::model::snapshot::{NsInput, Snapshot, SocketView};
use crate::model::system::SockRec;
use crate::output::trace::TraceWriter;
use crate::recorder::{Rec, TimelineRow};
use crate::session::analysis::listener_sample;
use crate::session::{Analysis, Context, Reading};
use crate::settings::Filters;
use crate::source::host::{monotonic_ns, wall_ns};

struct Sub {
    filters: Filters,
    tx: mpsc::Sender<Chunk>,
    queued: super::messages::Queued,
    skipped: u64,
    skipped_total: u64,
}

/// A filtered view of the live model, kept while a client asks for it.
struct View {
    key: api::Filters,
    filters: Filters,
    analysis: Analysis,
    asked: Instant,
}

/// A filtered view starts with this much of the record.
const VIEW_PAST_NS: u64 = 15 * 60 * 1_000_000_000;
/// A view not asked for this long goes.
const VIEW_IDLE: Duration = Duration::from_secs(60);

pub struct Model {
    live: Analysis,
    shared: Arc<Shared>,
    frames: FrameBuilder,
    next_frame_wall: i64,
    writer: TraceWriter<Vec<u8>>,
    subs: Vec<Sub>,
    views: Vec<View>,
    max_listeners: usize,
    close_wait_ns: u64,
    /// The last full listing and when it was read (at most a second old for `top`).
    listing: Option<(Instant, Vec<SockRec>, Vec<NsInput>)>,
    /// Seconds run, for the work done every few.
    seconds: u64,
    loss_seen: Loss,
}

fn next_boundary(wall: i64) -> i64 {
    (wall.div_euclid(FRAME_NS as i64) + 1) * FRAME_NS as i64
}

impl Model {
    pub fn new(
        live: Analysis,
        shared: Arc<Shared>,
        max_listeners: usize,
        close_wait_secs: u64,
    ) -> Model {
        let now = wall_ns();
        let loss = shared.status(|s| s.loss);
        Model {
            frames: FrameBuilder::new(live.aggregator(), &loss, now),
            next_frame_wall: next_boundary(now),
            writer: TraceWriter::new(Vec::new(), true, shared.clock, crate::settings::own_netns())
                .with_reasons(shared.ctx.reasons.clone()),
            live,
            shared,
            subs: Vec::new(),
            views: Vec::new(),
            max_listeners,
            close_wait_ns: close_wait_secs.saturating_mul(1_000_000_000),
            listing: None,
            seconds: 0,
            loss_seen: loss,
        }
    }

    /// Runs until `stop`; returns why it stopped when it was not asked to.
    pub fn run(
        mut self,
        up_rx: Receiver<Up>,
        state_tx: &SyncSender<()>,
        stop: &AtomicBool,
        queued: &AtomicUsize,
    ) -> Option<String> {
        let mut cache: Option<(Instant, String)> = None;
        let mut build_seconds = 0.0;
        let mut wants: Vec<oneshot::Sender<String>> = Vec::new();
        let mut last_second = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            match up_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Up::Batch(evs, samples)) => self.apply(evs, samples, queued),
                Ok(Up::Want(reply)) => wants.push(reply),
                Ok(Up::State { .. }) => {}
                Ok(other) => self.answer(other),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return Some("the reader thread ended".into()),
            }
            let now = wall_ns();
            if now >= self.next_frame_wall {
                self.frame(now);
                self.next_frame_wall = next_boundary(now);
            }
            if last_second.elapsed() >= Duration::from_secs(1) {
                last_second = Instant::now();
                self.every_second();
            }
            for reply in std::mem::take(&mut wants) {
                if cache
                    .as_ref()
                    .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1))
                {
                    let t = Instant::now();
                    if state_tx.send(()).is_err() {
                        return Some("the reader thread ended".into());
                    }
                    // Not up to a whole poll interval later.
                    self.shared.waker.wake();
                    // Events that arrive meanwhile still go into the analysis first.
                    let (inv, hooks, loss, events) = loop {
                        match up_rx.recv_timeout(Duration::from_secs(5)) {
                            Ok(Up::Batch(evs, samples)) => self.apply(evs, samples, queued),
                            Ok(Up::Want(r)) => wants.push(r),
                            Ok(Up::State {
                                inventory,
                                hooks,
                                loss,
                                events,
                            }) => break (inventory, hooks, loss, events),
                            Ok(other) => self.answer(other),
                            Err(_) => {
                                return Some("the reader thread did not answer within 5 s".into());
                            }
                        }
                    };
                    let (inventory, namespaces) = inv.read();
                    let mut snap = self.live.snapshot(
                        monotonic_ns(),
                        Reading {
                            inventory: Some(&inventory),
                            namespaces,
                            loss,
                            hooks,
                        },
                    );
                    self.add_record_loss(&mut snap);
                    let mut text = crate::output::prometheus::render(
                        &snap,
                        &crate::output::prometheus::Extras {
                            events,
                            build_seconds,
                            max_listeners: self.max_listeners,
                        },
                    );
                    if let Some(r) = &self.shared.recorder {
                        text.push_str(&crate::output::prometheus::render_record(
                            &r.span(),
                            self.subs.len(),
                            wall_ns(),
                        ));
                    }
                    self.live.reset_peaks();
                    build_seconds = t.elapsed().as_secs_f64();
                    cache = Some((Instant::now(), text));
                }
                if let Some((_, text)) = &cache {
                    let _ = reply.send(text.clone());
                }
            }
        }
        None
    }

    fn add_record_loss(&self, snap: &mut Snapshot) {
        if let Some(r) = &self.shared.recorder {
            snap.loss.recorder_dropped = r.span().dropped;
        }
    }

    fn apply(&mut self, evs: Vec<Event>, samples: Vec<SockRec>, queued: &AtomicUsize) {
        queued.fetch_sub(evs.len(), Ordering::Relaxed);
        let now = monotonic_ns();
        self.live.apply(&evs);
        self.live.observe(&samples, now);
        self.live.tick(now);
        self.frames.apply(&evs);
        let ls: Vec<_> = samples.iter().map(listener_sample).collect();
        self.frames.observe(&ls);
        for v in &mut self.views {
            let mine: Vec<Event> = evs
                .iter()
                .filter(|e| v.filters.accepts_event(e))
                .copied()
                .collect();
            v.analysis.apply(&mine);
            let k = v.filters.kernel.netns;
            let mine: Vec<SockRec> = samples
                .iter()
                .filter(|s| (k == 0 || s.netns == k) && v.filters.accepts_sock_tuple(s))
                .copied()
                .collect();
            v.analysis.observe(&mine, now);
            v.analysis.tick(now);
        }
        let retired = self.live.take_retired(now);
        if let Some(r) = &self.shared.recorder
            && !retired.is_empty()
        {
            let offset = self.shared.clock.offset_ns as i64;
            let rows = retired
                .into_iter()
                .map(|(v, ended)| TimelineRow {
                    closed_wall_ns: self.shared.wall(ended),
                    cookie: v.cookie,
                    netns: v.netns,
                    local: v.local.clone(),
                    remote: v.remote.clone(),
                    pid: v.owner.as_ref().map(|o| o.pid),
                    comm: v.owner.as_ref().map(|o| o.comm.clone()),
                    interest: interest(&v, self.close_wait_ns).join(","),
                    clock_offset_ns: offset,
                    json: serde_json::to_string(&v).unwrap_or_default(),
                })
                .collect();
            r.send(Rec::Timelines(rows));
        }
        if evs.is_empty() {
            return;
        }
        let walls: Vec<i64> = evs.iter().map(|e| self.shared.wall(e.ts_ns)).collect();
        if !self.subs.is_empty() {
            // Each event is written as a JSON line once, for every subscriber.
            for e in &evs {
                let _ = self.writer.event(e);
            }
            let lines = self.writer.take_lines();
            let spans: Vec<(usize, usize)> = line_spans(&lines);
            self.subs.retain_mut(|s| {
                let mut c = Chunk::default();
                for (i, e) in evs.iter().enumerate() {
                    if s.filters.accepts_event(e) {
                        let (a, b) = spans[i];
                        c.lines.extend_from_slice(&lines[a..b]);
                        c.walls.push(walls[i]);
                    }
                }
                deliver(s, c)
            });
        }
        if let Some(r) = &self.shared.recorder {
            r.send(Rec::Events(walls.into_iter().zip(evs).collect()));
        }
    }

    /// Loss lines to the subscribers, and views nobody asks for any more go.
    fn every_second(&mut self) {
        self.views.retain(|v| v.asked.elapsed() < VIEW_IDLE);
        self.seconds += 1;
        if self.seconds.is_multiple_of(10) {
            crate::source::host::trim_heap();
        }
        let loss = self.shared.status(|s| s.loss);
        if loss.total() > self.loss_seen.total() {
            let delta = Loss {
                kernel_dropped: loss.kernel_dropped
                    - self.loss_seen.kernel_dropped.min(loss.kernel_dropped),
                kernel_skipped: loss
                    .kernel_skipped
                    .saturating_sub(self.loss_seen.kernel_skipped),
                channel_dropped: loss
                    .channel_dropped
                    .saturating_sub(self.loss_seen.channel_dropped),
                decode_errors: loss
                    .decode_errors
                    .saturating_sub(self.loss_seen.decode_errors),
                ..Loss::default()
            };
            self.loss_seen = loss;
            let _ = self.writer.loss(monotonic_ns(), &delta, &loss);
            let line = self.writer.take_lines();
            self.subs.retain_mut(|s| {
                deliver(
                    s,
                    Chunk {
                        notes: line.clone(),
                        ..Chunk::default()
                    },
                )
            });
        }
    }

    /// Ends a frame: states from a listing (without owners: cheap), the rest from the
    /// live model.
    fn frame(&mut self, now_wall: i64) {
        let Some(inv) = self.shared.status(|s| s.inventory.clone()) else {
            return;
        };
        let (socks, nss) = inv.read_with(false);
        let loss = self.shared.status(|s| s.loss);
        let frame = self
            .frames
            .close(self.live.aggregator(), Some(&socks), &loss, now_wall);
        if let Some(r) = &self.shared.recorder {
            r.send(Rec::Frame {
                frame: Box::new(frame),
                counters: counters_json(nss.iter().map(|n| (n.inode, &n.counters_now))),
            });
        }
    }

    /// The counters as they were when the daemon started: a window reaching back before
    /// the first frame counts from them.
    pub fn record_start(&self, start_wall: i64) {
        let (Some(r), Some(inv)) = (
            &self.shared.recorder,
            self.shared.status(|s| s.inventory.clone()),
        ) else {
            return;
        };
        r.send(Rec::Counters {
            wall_ns: start_wall,
            counters: counters_json(inv.start_counters()),
        });
    }

    /// A listing at most a second old, read here when older.
    fn listing(&mut self) -> Option<(Vec<SockRec>, Vec<NsInput>)> {
        let stale = self
            .listing
            .as_ref()
            .is_none_or(|(t, _, _)| t.elapsed() > Duration::from_secs(1));
        if stale {
            let inv = self.shared.status(|s| s.inventory.clone())?;
            let (s, n) = inv.read();
            self.listing = Some((Instant::now(), s, n));
        }
        self.listing
            .as_ref()
            .map(|(_, s, n)| (s.clone(), n.clone()))
    }

    fn listing_has(&mut self, netns: u32) -> bool {
        self.listing();
        self.listing
            .as_ref()
            .is_some_and(|(_, _, n)| n.iter().any(|n| n.inode == netns))
    }

    fn answer(&mut self, up: Up) {
        match up {
            Up::Live {
                filters,
                close_wait_secs,
                connections,
                reply,
            } => {
                let _ = reply.send(self.live_snapshot(filters, close_wait_secs, connections));
            }
            Up::Timeline {
                cookie,
                local,
                remote,
                netns,
                reply,
            } => {
                let now = monotonic_ns();
                let agg = self.live.aggregator();
                let found: Vec<SocketView> = match cookie {
                    Some(c) => agg
                        .socket(c)
                        .map(|t| crate::model::snapshot::socket_view(t, now))
                        .into_iter()
                        .collect(),
                    None => {
                        let (l, r) = (local.unwrap_or_default(), remote.unwrap_or_default());
                        let mut v: Vec<_> = agg
                            .sockets()
                            .filter(|t| netns.is_none_or(|n| n == t.netns))
                            .filter(|t| {
                                let (a, b) = (t.local.to_string(), t.remote.to_string());
                                (a == l && b == r) || (a == r && b == l)
                            })
                            .map(|t| crate::model::snapshot::socket_view(t, now))
                            .collect();
                        v.truncate(100);
                        v
                    }
                };
                let _ = reply.send(found);
            }
            Up::Subscribe {
                filters,
                tx,
                queued,
                reply,
            } => {
                self.subs.retain(|s| !s.tx.is_closed());
                if self.subs.len() >= super::messages::MAX_SUBSCRIBERS {
                    let _ = reply.send(Err(format!(
                        "{} clients follow the events already; try again later",
                        self.subs.len()
                    )));
                    return;
                }
                self.subs.push(Sub {
                    filters,
                    tx,
                    queued,
                    skipped: 0,
                    skipped_total: 0,
                });
                let _ = reply.send(Ok(()));
            }
            Up::Batch(..) | Up::State { .. } | Up::Want(_) => {}
        }
    }

    fn live_snapshot(
        &mut self,
        filters: api::Filters,
        close_wait_secs: u64,
        connections: usize,
    ) -> anyhow::Result<(Snapshot, Vec<SocketView>, u64)> {
        let f = Filters::from_api(&filters)?;
        let (socks, nss) = match f.kernel.netns {
            // A namespace the session has not found yet is read on its own.
            k if k != 0 && !self.listing_has(k) => self
                .shared
                .status(|s| s.inventory.clone())
                .map(|i| i.including(k).read())
                .ok_or_else(|| anyhow::anyhow!("no socket listing yet"))?,
            _ => self
                .listing()
                .ok_or_else(|| anyhow::anyhow!("no socket listing yet"))?,
        };
        let (loss, hooks, events) = self
            .shared
            .status(|s| (s.loss, s.hooks.clone(), s.events_seen));
        let now = monotonic_ns();
        let unfiltered = filters == api::Filters::default();
        let analysis = if unfiltered {
            &self.live
        } else {
            let at = match self.views.iter().position(|v| v.key == filters) {
                Some(i) => i,
                None => {
                    let ctx = Context {
                        thresholds: crate::model::snapshot::Thresholds {
                            close_wait_secs,
                            ..self.shared.ctx.thresholds
                        },
                        sockets_filtered: filters.narrows_sockets(),
                        ..self.shared.ctx.clone()
                    };
                    // It starts with the record's last minutes, as the unfiltered view
                    // holds the time since the daemon started.
                    let mut analysis = Analysis::new(ctx, Some(now.saturating_sub(VIEW_PAST_NS)));
                    if let Err(e) = super::window::seed_view(
                        &self.shared,
                        &f,
                        &mut analysis,
                        VIEW_PAST_NS as i64,
                    ) {
                        use std::io::Write as _;
                        let _ = writeln!(
                            std::io::stderr(),
                            "tcpwatch: a filtered view starts empty: {e:#}"
                        );
                    }
                    self.views.push(View {
                        key: filters.clone(),
                        filters: f.clone(),
                        analysis,
                        asked: Instant::now(),
                    });
                    self.views.len() - 1
                }
            };
            self.views[at].asked = Instant::now();
            &self.views[at].analysis
        };
        let k = f.kernel.netns;
        let socks: Vec<SockRec> = socks
            .into_iter()
            .filter(|s| (k == 0 || s.netns == k) && f.accepts_sock(s))
            .collect();
        let nss: Vec<NsInput> = nss.into_iter().filter(|n| k == 0 || n.inode == k).collect();
        let mut snap = analysis.snapshot(
            now,
            Reading {
                inventory: Some(&socks),
                namespaces: nss,
                loss,
                hooks,
            },
        );
        self.add_record_loss(&mut snap);
        let mut conns = analysis.connections(now);
        conns.truncate(connections);
        Ok((snap, conns, events))
    }
}

/// Each namespace's nonzero counters as JSON.
fn counters_json<'a>(
    nss: impl Iterator<Item = (u32, &'a crate::model::system::Counters)>,
) -> Vec<(u32, String)> {
    nss.map(|(inode, c)| {
        let nonzero: std::collections::BTreeMap<&String, &u64> =
            c.0.iter().filter(|(_, v)| **v != 0).collect();
        (inode, serde_json::to_string(&nonzero).unwrap_or_default())
    })
    .collect()
}

/// Where each line of `lines` starts and ends (its newline included).
fn line_spans(lines: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut start = 0;
    for (i, b) in lines.iter().enumerate() {
        if *b == b'\n' {
            v.push((start, i + 1));
            start = i + 1;
        }
    }
    v
}

/// Sends `c` to a subscriber, first telling it what it missed; a full queue skips the chunk
/// (counted), a gone subscriber is dropped (false).
fn deliver(s: &mut Sub, mut c: Chunk) -> bool {
    if c.walls.is_empty() && c.notes.is_empty() {
        return true;
    }
    let n = c.walls.len() as u64;
    if s.skipped > 0 {
        let note = StreamNote::Skipped {
            count: s.skipped,
            total: s.skipped_total,
        };
        let mut line = serde_json::to_vec(&note).unwrap_or_default();
        line.push(b'\n');
        line.extend_from_slice(&c.notes);
        c.notes = line;
    }
    let bytes = c.bytes();
    if s.queued.load(std::sync::atomic::Ordering::Relaxed) + bytes > super::messages::SUB_BYTES {
        if s.tx.is_closed() {
            return false;
        }
        s.skipped += n;
        s.skipped_total += n;
        return true;
    }
    match s.tx.try_send(c) {
        Ok(()) => {
            s.queued
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            s.skipped = 0;
            true
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            s.skipped += n;
            s.skipped_total += n;
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
