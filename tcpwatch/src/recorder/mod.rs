//! The flight recorder: what the daemon saw, kept on disk within a bound so it can be asked
//! about later (`snapshot --since`, `trace --since`, `top` stepping back) and survives a
//! restart. A writer thread owns the database; the daemon hands it records through a
//! bounded queue and never waits for the disk (what does not fit is dropped and counted).
pub mod query;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::params;

use crate::model::api::RecordSpan;
use crate::model::event::Event;
use crate::model::history::{Frame, is_signal};
pub use store::{DB_FILE, Store, Table};

/// An event as the record keeps it: its columns for queries, and the whole event in
/// tcpwatch's own compact encoding (serde through postcard: about a third of its JSON line).
/// The encoding follows `model::event` and only grows at the end (variants, fields).
pub fn encode(e: &Event) -> Vec<u8> {
    postcard::to_allocvec(e).unwrap_or_default()
}

pub fn decode(b: &[u8]) -> Option<Event> {
    postcard::from_bytes(b).ok()
}

/// A closed connection's timeline, ready to store.
#[derive(Clone, Debug)]
pub struct TimelineRow {
    pub closed_wall_ns: i64,
    pub cookie: u64,
    pub netns: u32,
    pub local: String,
    pub remote: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Why it is kept (comma-separated), empty for a plain one.
    pub interest: String,
    /// realtime − monotonic when it was recorded: its times are monotonic.
    pub clock_offset_ns: i64,
    /// The snapshot's `SocketView` as JSON.
    pub json: String,
}

pub enum Rec {
    /// Events with their Unix times, in order.
    Events(Vec<(i64, Event)>),
    Timelines(Vec<TimelineRow>),
    Frame {
        frame: Box<Frame>,
        /// Each namespace's nonzero counters as JSON.
        counters: Vec<(u32, String)>,
    },
    /// Counters read outside a frame (when the daemon started).
    Counters {
        wall_ns: i64,
        counters: Vec<(u32, String)>,
    },
    /// Write everything queued now and answer.
    Sync(SyncSender<()>),
}

impl Rec {
    fn bytes(&self) -> usize {
        match self {
            Rec::Events(v) => v.len() * std::mem::size_of::<(i64, Event)>(),
            Rec::Timelines(v) => v.iter().map(|t| t.json.len() + 64).sum(),
            Rec::Frame { counters, .. } | Rec::Counters { counters, .. } => {
                4096 + counters.iter().map(|c| c.1.len()).sum::<usize>()
            }
            Rec::Sync(_) => 0,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Rec::Events(v) => v.len() as u64,
            Rec::Timelines(v) => v.len() as u64,
            Rec::Frame { .. } => 1,
            Rec::Counters { .. } | Rec::Sync(_) => 0,
        }
    }
}

/// Records queued for the writer at most, in bytes: beyond it they are dropped and counted.
const QUEUE_BYTES: usize = 64 << 20;
/// The writer commits at least this often.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Or sooner, once this much is waiting.
const COMMIT_BYTES: usize = 1 << 20;
/// And measures the tables again this often (the estimate drifts a little).
const MEASURE_EVERY: Duration = Duration::from_secs(600);
/// Plain events (not signals) written a second at most. Writing every event of a full
/// churn (250 k a second) costs a core and holds seconds of it in the bound; past this
/// rate the record keeps every event of a sample of the connections instead (their
/// timelines too), and counts what it left out as dropped. Signals are never shed.
const PLAIN_EVENTS_PER_SEC: u64 = 20_000;

/// Chooses, second by second, which connections' plain events and timelines are written:
/// those whose cookie falls in a share sized by the last second's offer, so a sampled
/// connection is whole.
struct Shedder {
    second: i64,
    offered: u64,
    /// Of 1024: the share of cookies kept this second.
    keep: u64,
}

impl Default for Shedder {
    fn default() -> Shedder {
        Shedder {
            second: i64::MIN,
            offered: 0,
            keep: 1024,
        }
    }
}

impl Shedder {
    fn keeps(&mut self, wall_ns: i64, cookie: u64) -> bool {
        let s = wall_ns.div_euclid(1_000_000_000);
        if s != self.second {
            // The share for this second from what the last one offered (none: keep all).
            self.keep = if s == self.second + 1 && self.offered > PLAIN_EVENTS_PER_SEC {
                (PLAIN_EVENTS_PER_SEC * 1024 / self.offered).max(1)
            } else {
                1024
            };
            self.second = s;
            self.offered = 0;
        }
        self.offered += 1;
        if self.keep >= 1024 {
            // Still, never far past the rate within the second itself.
            return self.offered <= PLAIN_EVENTS_PER_SEC * 2;
        }
        (cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) < self.keep
    }
}

/// The daemon's handle on the writer thread.
pub struct Recorder {
    tx: SyncSender<Rec>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    span: Arc<Mutex<RecordSpan>>,
    dir: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    /// Opens the record in `dir` (which the caller made safe) and starts the writer.
    pub fn start(dir: &Path, bound: u64) -> anyhow::Result<Recorder> {
        let mut store = Store::open(dir, bound)?;
        store.prune()?;
        store.vacuum()?;
        let span = Arc::new(Mutex::new(store.span()));
        let (tx, rx) = sync_channel::<Rec>(4096);
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (queued, dropped, span, stop) =
                (queued.clone(), dropped.clone(), span.clone(), stop.clone());
            std::thread::Builder::new()
                .name("recorder".into())
                .spawn(move || write_loop(store, rx, &queued, &dropped, &span, &stop))
                .map_err(|e| anyhow::anyhow!("starting the recorder thread: {e}"))?
        };
        Ok(Recorder {
            tx,
            queued,
            dropped,
            span,
            dir: dir.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Queues `r` for the disk; when the writer is behind by more than the queue holds, the
    /// record is dropped and counted.
    pub fn send(&self, r: Rec) {
        let (bytes, n) = (r.bytes(), r.count());
        if self.queued.load(Ordering::Relaxed) + bytes > QUEUE_BYTES {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(bytes, Ordering::Relaxed);
                self.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A handle that waits until what was queued before it is on disk (for readers that
    /// want the last second too).
    pub fn syncer(&self) -> Syncer {
        Syncer(self.tx.clone())
    }

    /// Where the record starts and what it dropped (updated after every commit).
    pub fn span(&self) -> RecordSpan {
        let mut s = *self.span.lock().unwrap_or_else(|p| p.into_inner());
        s.dropped += self.dropped.load(Ordering::Relaxed);
        s
    }

    pub fn shared_span(&self) -> Arc<Mutex<RecordSpan>> {
        self.span.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the writer stopped (a disk error it could not get past).
    pub fn failed(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Recorder {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone)]
pub struct Syncer(SyncSender<Rec>);

impl Syncer {
    /// True once everything queued before the call is committed, false after `timeout`.
    pub fn sync(&self, timeout: Duration) -> bool {
        let (tx, rx) = sync_channel(1);
        if self.0.try_send(Rec::Sync(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

/// A line on stderr that cannot panic.
fn note(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn write_loop(
    mut store: Store,
    rx: Receiver<Rec>,
    queued: &AtomicUsize,
    dropped: &AtomicU64,
    span: &Mutex<RecordSpan>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut pending: Vec<Rec> = Vec::new();
    let mut waiting: Vec<SyncSender<()>> = Vec::new();
    let mut last_commit = Instant::now();
    let mut last_measure = Instant::now();
    let mut counters_seen: HashMap<u32, String> = HashMap::new();
    let mut shed = Shedder::default();
    let mut closed = false;
    let mut failures = 0u32;
    let mut bytes = 0usize;
    while !closed {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Rec::Sync(tx)) => waiting.push(tx),
            Ok(r) => {
                bytes += r.bytes();
                pending.push(r);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        closed |= stop.load(Ordering::SeqCst);
        // Small transactions: the write-ahead log and the room made before each stay small
        // against the bound even under full churn.
        let due = last_commit.elapsed() >= COMMIT_EVERY
            || bytes >= COMMIT_BYTES
            || !waiting.is_empty()
            || closed;
        if !due {
            continue;
        }
        // Whatever else arrived meanwhile goes into the same transaction, up to its size.
        while bytes < COMMIT_BYTES {
            match rx.try_recv() {
                Ok(Rec::Sync(tx)) => waiting.push(tx),
                Ok(r) => {
                    bytes += r.bytes();
                    pending.push(r);
                }
                Err(_) => break,
            }
        }
        let count: u64 = pending.iter().map(Rec::count).sum();
        store.dropped += dropped.swap(0, Ordering::Relaxed);
        match commit(&mut store, &pending, &mut counters_seen, &mut shed) {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                store.dropped += count;
                note(&format!("tcpwatch: recorder: {e}"));
                if failures >= 10 {
                    note("tcpwatch: recorder: ten writes in a row failed; the record stops");
                    queued.fetch_sub(bytes, Ordering::Relaxed);
                    return;
                }
            }
        }
        queued.fetch_sub(bytes, Ordering::Relaxed);
        pending.clear();
        bytes = 0;
        last_commit = Instant::now();
        if last_measure.elapsed() >= MEASURE_EVERY {
            last_measure = Instant::now();
            let _ = store.measure();
        }
        if store.disk_bytes() > store.bound()
            && let Err(e) = store.vacuum()
        {
            note(&format!("tcpwatch: recorder: giving space back: {e}"));
        }
        *span.lock().unwrap_or_else(|p| p.into_inner()) = store.span();
        for w in waiting.drain(..) {
            let _ = w.try_send(());
        }
    }
}

fn commit(
    store: &mut Store,
    pending: &[Rec],
    counters_seen: &mut HashMap<u32, String>,
    shed: &mut Shedder,
) -> rusqlite::Result<()> {
    store.conn.execute_batch("BEGIN")?;
    // Room first, for what comes in: the file never holds more than the bound.
    let incoming: u64 = pending.iter().map(|r| r.bytes() as u64).sum();
    let res = store
        .make_room(incoming)
        .and_then(|_| insert(store, pending, counters_seen, shed))
        .and_then(|(added, left_out)| {
            store.dropped += left_out;
            for (t, (rows, bytes)) in Table::ALL.into_iter().zip(added) {
                store.added(t, rows, bytes + rows * store::ROW_BYTES);
            }
            store.correct()?;
            store.prune()?;
            store.save_meta()
        });
    match res {
        Ok(()) => store.conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = store.conn.execute_batch("ROLLBACK");
            counters_seen.clear();
            // The estimates counted rows that were rolled back.
            let _ = store.measure();
            Err(e)
        }
    }
}

/// Inserts the records; returns rows and bytes added per table, and how many plain
/// events and timelines the rate budget left out.
fn insert(
    store: &Store,
    pending: &[Rec],
    counters_seen: &mut HashMap<u32, String>,
    shed: &mut Shedder,
) -> rusqlite::Result<([(u64, u64); 5], u64)> {
    let tx = &store.conn;
    let mut added = [(0u64, 0u64); 5];
    let mut left_out = 0u64;
    {
        let cols = "(wall_ns, type, cookie, netns, saddr, sport, daddr, dport, pid, comm, ev)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
        let mut ev = tx.prepare_cached(&format!("INSERT INTO events {cols}"))?;
        let mut sig = tx.prepare_cached(&format!("INSERT INTO signals {cols}"))?;
        let mut tl = tx.prepare_cached(
            "INSERT INTO timelines (closed_wall_ns, cookie, netns, local, remote, pid, comm,
               interest, clock_offset_ns, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut fr =
            tx.prepare_cached("INSERT OR REPLACE INTO frames (wall_ns, json) VALUES (?1, ?2)")?;
        let mut lf = tx.prepare_cached(
            "INSERT INTO listener_frames (wall_ns, netns, addr, port, cookie, pid, comm,
               accept_peak, accept_max, syn_peak, drops, overflow_accept, overflow_syn,
               syncookies, final_ack_packets, synack_retransmits)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        let mut ct = tx.prepare_cached(
            "INSERT OR REPLACE INTO counters (netns, wall_ns, json) VALUES (?1, ?2, ?3)",
        )?;
        for r in pending {
            match r {
                Rec::Events(v) => {
                    for (wall, e) in v {
                        let signal = is_signal(e);
                        if !signal && !shed.keeps(*wall, e.cookie) {
                            left_out += 1;
                            continue;
                        }
                        let blob = encode(e);
                        let (saddr, daddr) = (e.local.ip().to_string(), e.remote.ip().to_string());
                        let comm = e.owner.as_ref().map(|o| o.comm.to_string_lossy());
                        let bytes = (blob.len()
                            + saddr.len()
                            + daddr.len()
                            + comm.as_ref().map_or(0, String::len))
                            as u64;
                        let p = params![
                            wall,
                            e.kind.type_name(),
                            e.cookie as i64,
                            e.netns,
                            saddr,
                            e.local.port(),
                            daddr,
                            e.remote.port(),
                            e.owner.as_ref().map(|o| o.pid),
                            comm,
                            blob
                        ];
                        ev.execute(p)?;
                        added[0].0 += 1;
                        added[0].1 += bytes;
                        if signal {
                            sig.execute(p)?;
                            added[1].0 += 1;
                            added[1].1 += bytes;
                        }
                    }
                }
                Rec::Timelines(v) => {
                    for t in v {
                        if t.interest.is_empty() && !shed.keeps(t.closed_wall_ns, t.cookie) {
                            left_out += 1;
                            continue;
                        }
                        tl.execute(params![
                            t.closed_wall_ns,
                            t.cookie as i64,
                            t.netns,
                            t.local,
                            t.remote,
                            t.pid,
                            t.comm,
                            t.interest,
                            t.clock_offset_ns,
                            t.json
                        ])?;
                        added[2].0 += 1;
                        added[2].1 += t.json.len() as u64;
                    }
                }
                Rec::Frame { frame, counters } => {
                    let mut plain = (**frame).clone();
                    let listeners = std::mem::take(&mut plain.listeners);
                    let json = serde_json::to_string(&plain).unwrap_or_default();
                    fr.execute(params![frame.wall_ns, json])?;
                    added[3].0 += 1;
                    added[3].1 +=
                        json.len() as u64 + listeners.len() as u64 * store::LISTENER_ROW_BYTES;
                    for l in &listeners {
                        lf.execute(params![
                            frame.wall_ns,
                            l.netns,
                            l.addr,
                            l.port,
                            l.cookie as i64,
                            l.owner.as_ref().map(|o| o.pid),
                            l.owner.as_ref().map(|o| o.comm.as_str()),
                            l.accept_peak,
                            l.accept_max,
                            l.syn_peak,
                            l.drops as i64,
                            l.overflows.accept as i64,
                            l.overflows.syn as i64,
                            l.overflows.syncookies as i64,
                            l.overflows.final_ack_packets as i64,
                            l.synack_retransmits as i64
                        ])?;
                    }
                    for (ns, json) in counters {
                        if counters_seen.get(ns) == Some(json) {
                            continue;
                        }
                        ct.execute(params![ns, frame.wall_ns, json])?;
                        counters_seen.insert(*ns, json.clone());
                        added[4].0 += 1;
                        added[4].1 += json.len() as u64;
                    }
                }
                Rec::Counters { wall_ns, counters } => {
                    for (ns, json) in counters {
                        ct.execute(params![ns, wall_ns, json])?;
                        counters_seen.insert(*ns, json.clone());
                        added[4].0 += 1;
                        added[4].1 += json.len() as u64;
                    }
                }
                Rec::Sync(_) => {}
            }
        }
    }
    Ok((added, left_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::history::ListenerFrame;
    use crate::model::snapshot::OwnerView;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("twrec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn events(from: u64, n: u64, every_signal: u64) -> Rec {
        use crate::model::event::{EventKind, RetransmitKind, TcpState};
        Rec::Events(
            (from..from + n)
                .map(|i| {
                    let kind = if every_signal > 0 && i % every_signal == 0 {
                        EventKind::Retransmit {
                            kind: RetransmitKind::Data,
                            state: Some(TcpState::Established),
                            nth: 1,
                            interval_ns: Some(200_000_000),
                            err: 0,
                            segs: 1,
                            accept_queue: None,
                            syn_queue: None,
                        }
                    } else {
                        EventKind::State {
                            old: TcpState::SynSent,
                            new: TcpState::Established,
                            prev_state_ns: Some(i),
                        }
                    };
                    (i as i64 * STEP, crate::testkit::test_event(i, i, kind))
                })
                .collect(),
        )
    }

    /// Events 100 µs apart: 10 000 a second, inside the rate budget.
    const STEP: i64 = 100_000;

    #[test]
    fn past_the_rate_budget_whole_connections_are_sampled() {
        let mut s = Shedder::default();
        // Under the budget: everything.
        assert!((0..PLAIN_EVENTS_PER_SEC).all(|i| s.keeps(1_000_000_000, i)));
        // A second offered ten times the budget (eleven events per connection)...
        let mut t = 2_000_000_000;
        for i in 0..PLAIN_EVENTS_PER_SEC * 10 {
            s.keeps(t, i / 11);
        }
        // ...the next keeps about a tenth of the connections, each with all its events.
        t += 1_000_000_000;
        let mut kept = 0;
        for c in 0..10_000u64 {
            let k: Vec<bool> = (0..11).map(|_| s.keeps(t, 1_000_000 + c)).collect();
            assert!(k.iter().all(|&x| x == k[0]), "connection {c} split");
            kept += k[0] as u64;
        }
        assert!((700..1300).contains(&kept), "kept {kept} of 10000");
    }

    #[test]
    fn what_is_written_reads_back_and_survives_a_restart() {
        let d = scratch("roundtrip");
        {
            let r = Recorder::start(&d, 64 << 20).unwrap();
            r.send(events(1, 100, 10));
            let frame = Frame {
                wall_ns: 50_000,
                span_ns: 10,
                listeners: vec![ListenerFrame {
                    netns: 1,
                    addr: "127.0.0.1".into(),
                    port: 8080,
                    cookie: 3,
                    owner: Some(OwnerView {
                        pid: 42,
                        comm: "srv".into(),
                    }),
                    accept_peak: 5,
                    accept_max: 4,
                    overflows: crate::model::snapshot::OverflowsView {
                        accept: 7,
                        ..Default::default()
                    },
                    ..Default::default()
                }],
                ..Default::default()
            };
            r.send(Rec::Frame {
                frame: Box::new(frame.clone()),
                counters: vec![(1, r#"{"TcpExt:ListenDrops":7}"#.into())],
            });
            r.send(Rec::Timelines(vec![TimelineRow {
                closed_wall_ns: 60_000,
                cookie: 77,
                netns: 1,
                local: "10.0.0.1:40000".into(),
                remote: "10.0.0.2:80".into(),
                pid: Some(42),
                comm: Some("curl".into()),
                interest: "retransmits".into(),
                clock_offset_ns: 5,
                json: serde_json::to_string(&crate::testkit::conn(
                    77,
                    "CLOSE",
                    "10.0.0.1:40000",
                    "curl",
                    42,
                ))
                .unwrap(),
            }]));
            assert!(r.syncer().sync(Duration::from_secs(10)));
            let span = r.span();
            assert_eq!(span.events_from_wall_ns, Some(STEP));
            assert_eq!(span.signals_from_wall_ns, Some(10 * STEP));
            assert_eq!(span.frames_from_wall_ns, Some(50_000));
        }
        // Reopened: everything is still there.
        let _r = Recorder::start(&d, 64 << 20).unwrap();
        let c = store::open_reader(&d).unwrap();
        let mut got = Vec::new();
        query::events(&c, Table::Events, 5 * STEP, Some(8 * STEP), |w, e| {
            got.push((w, e));
            true
        })
        .unwrap();
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            [5 * STEP, 6 * STEP, 7 * STEP]
        );
        // The whole event comes back.
        let Rec::Events(want) = events(6, 1, 10) else {
            unreachable!()
        };
        assert_eq!(got[1].1, want[0].1);
        let mut sig = 0;
        query::events(&c, Table::Signals, 0, None, |_, e| {
            assert_eq!(e.kind.type_name(), "retransmit");
            sig += 1;
            true
        })
        .unwrap();
        assert_eq!(sig, 10);
        // The columns are there for people's queries.
        let (ty, saddr, dport): (String, String, u16) = c
            .query_row(
                "SELECT type, saddr, dport FROM events WHERE cookie = 6",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (ty.as_str(), saddr.as_str(), dport),
            ("state", "10.0.0.1", 80)
        );
        let frames = query::frames(&c, 0, None).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].listeners.len(), 1);
        assert_eq!(frames[0].listeners[0].overflows.accept, 7);
        assert_eq!(frames[0].listeners[0].owner.as_ref().unwrap().comm, "srv");
        assert!(query::counters_at(&c, 1, 10, false).unwrap().is_none());
        let (at, cs) = query::counters_at(&c, 1, 10, true).unwrap().unwrap();
        assert_eq!((at, cs.get("TcpExt:ListenDrops")), (50_000, Some(&7)));
        let t = query::timelines(&c, &query::Which::Cookie(77), 10).unwrap();
        assert_eq!((t.len(), t[0].1), (1, 5));
        let t = query::timelines(
            &c,
            &query::Which::Endpoints {
                local: "10.0.0.2:80",
                remote: "10.0.0.1:40000",
                netns: None,
            },
            10,
        )
        .unwrap();
        assert_eq!(t.len(), 1, "either side's view finds it");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_record_stays_inside_its_bound_and_says_what_it_cut() {
        let d = scratch("bound");
        let bound = 16u64 << 20;
        let r = Recorder::start(&d, bound).unwrap();
        // About 60 MB of events (encoded), one in twenty a signal.
        for b in 0..200 {
            r.send(events(b * 4000, 4000, 20));
            if b % 10 == 9 {
                assert!(r.syncer().sync(Duration::from_secs(30)));
            }
        }
        assert!(r.syncer().sync(Duration::from_secs(30)));
        let span = r.span();
        let c = store::open_reader(&d).unwrap();
        let disk = std::fs::metadata(d.join(DB_FILE)).unwrap().len();
        assert!(disk <= bound, "the file is {disk} bytes, over {bound}");
        assert!(span.bytes <= bound + (4 << 20), "{span:?}");
        assert!(span.pruned.events > 100_000, "{span:?}");
        assert_eq!(span.dropped, 0);
        // The full stream was cut; signals reach further back.
        let ev_from = span.events_from_wall_ns.unwrap();
        let sig_from = span.signals_from_wall_ns.unwrap();
        assert!(ev_from > 0 && sig_from < ev_from, "{span:?}");
        // What is left is contiguous up to the last event.
        let mut last = 0;
        let n = query::events(&c, Table::Events, ev_from, None, |w, _| {
            assert!(w > last);
            last = w;
            true
        })
        .unwrap();
        assert_eq!(last, (200 * 4000 - 1) * STEP);
        assert_eq!(n, (last - ev_from) as u64 / STEP as u64 + 1);
        drop(r);
        let _ = std::fs::remove_dir_all(&d);
    }
}
