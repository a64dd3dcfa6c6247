//! The record on disk: one SQLite database (WAL, so readers never wait for the writer, and a
//! crash loses at most the last second), its schema, and the bound: every table has a share
//! of `--history-mib`, the oldest rows go first, and what was pruned is counted.
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};

use crate::model::api::{Pruned, RecordSpan};

/// The schema this build writes; an older file is migrated, a newer one refused.
pub const SCHEMA_VERSION: i64 = 2;

/// The database's name inside the state directory.
pub const DB_FILE: &str = "record.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Every event: the columns people query (type as `trace --json` names it: state,
-- retransmit, reset, error, timewait, overflow), and the whole event in tcpwatch's own
-- encoding (`tcpwatch trace --since` prints it as JSON).
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, wall_ns INTEGER NOT NULL, type TEXT NOT NULL,
    cookie INTEGER NOT NULL, netns INTEGER NOT NULL, saddr TEXT NOT NULL,
    sport INTEGER NOT NULL, daddr TEXT NOT NULL, dport INTEGER NOT NULL, pid INTEGER,
    comm TEXT, ev BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_wall ON events (wall_ns);
-- Retransmits, resets, errors and overflows again: kept longer than the full stream.
CREATE TABLE IF NOT EXISTS signals (
    id INTEGER PRIMARY KEY, wall_ns INTEGER NOT NULL, type TEXT NOT NULL,
    cookie INTEGER NOT NULL, netns INTEGER NOT NULL, saddr TEXT NOT NULL,
    sport INTEGER NOT NULL, daddr TEXT NOT NULL, dport INTEGER NOT NULL, pid INTEGER,
    comm TEXT, ev BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS signals_wall ON signals (wall_ns);
-- Closed connections' timelines (the snapshot's `sockets` entries); `interest` says why one
-- is kept (retransmits, reset, ...), empty for a plain one, which goes first.
CREATE TABLE IF NOT EXISTS timelines (
    id INTEGER PRIMARY KEY, closed_wall_ns INTEGER NOT NULL, cookie INTEGER NOT NULL,
    netns INTEGER NOT NULL, local TEXT NOT NULL, remote TEXT NOT NULL, pid INTEGER,
    comm TEXT, interest TEXT NOT NULL, clock_offset_ns INTEGER NOT NULL, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS timelines_closed ON timelines (closed_wall_ns);
CREATE INDEX IF NOT EXISTS timelines_cookie ON timelines (cookie);
CREATE INDEX IF NOT EXISTS timelines_plain ON timelines (interest, id);
-- One row per 10-second frame: states at its end and what happened in it.
CREATE TABLE IF NOT EXISTS frames (wall_ns INTEGER PRIMARY KEY, json TEXT NOT NULL);
-- Listeners with activity in a frame: queue peaks, drops, overflows.
CREATE TABLE IF NOT EXISTS listener_frames (
    wall_ns INTEGER NOT NULL, netns INTEGER NOT NULL, addr TEXT NOT NULL,
    port INTEGER NOT NULL, cookie INTEGER NOT NULL, pid INTEGER, comm TEXT,
    accept_peak INTEGER NOT NULL, accept_max INTEGER NOT NULL, syn_peak INTEGER NOT NULL,
    drops INTEGER NOT NULL, overflow_accept INTEGER NOT NULL, overflow_syn INTEGER NOT NULL,
    syncookies INTEGER NOT NULL, final_ack_packets INTEGER NOT NULL,
    synack_retransmits INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS listener_frames_wall ON listener_frames (wall_ns);
-- Each namespace's kernel counters (TcpExt/Tcp, nonzero ones) at a frame's end, when they
-- changed: where a past window's counter deltas start.
CREATE TABLE IF NOT EXISTS counters (
    netns INTEGER NOT NULL, wall_ns INTEGER NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (netns, wall_ns));
CREATE INDEX IF NOT EXISTS counters_wall ON counters (wall_ns);
";

/// The tables the bound is shared among, pruned oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Events,
    Signals,
    Timelines,
    Frames,
    Counters,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Events,
        Table::Signals,
        Table::Timelines,
        Table::Frames,
        Table::Counters,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Signals => "signals",
            Table::Timelines => "timelines",
            Table::Frames => "frames",
            Table::Counters => "counters",
        }
    }

    /// Its share of the bound, in percent. Frames are small (a day of them is a few MB);
    /// the full event stream takes what is left and is the first to be cut.
    fn share(self) -> u64 {
        match self {
            Table::Events => 45,
            Table::Signals => 15,
            Table::Timelines => 20,
            Table::Frames => 10,
            Table::Counters => 10,
        }
    }

    /// What a row weighs besides its fixed part.
    fn payload(self) -> &'static str {
        match self {
            Table::Events | Table::Signals => {
                "length(ev) + length(saddr) + length(daddr) + coalesce(length(comm), 0)"
            }
            _ => "length(json)",
        }
    }

    /// Its age column.
    fn age(self) -> &'static str {
        match self {
            Table::Timelines => "closed_wall_ns",
            _ => "wall_ns",
        }
    }
}

/// Bytes a row costs besides its JSON (row header, key, index entries): an estimate the
/// measured page use corrects (`Store::overhead`).
pub const ROW_BYTES: u64 = 64;
/// A listener frame row, all columns.
pub const LISTENER_ROW_BYTES: u64 = 160;

/// Room kept for the write-ahead log, which is truncated to this after each checkpoint.
const WAL_BYTES: u64 = 6 << 20;

pub struct Store {
    pub conn: Connection,
    pub path: PathBuf,
    bound: u64,
    /// Estimated bytes per table (JSON plus `ROW_BYTES` a row).
    bytes: [u64; 5],
    rows: [u64; 5],
    pub pruned: Pruned,
    /// Records that never reached the disk.
    pub dropped: u64,
    /// Pages in use over the estimate (indexes, page slack): the shares are divided by it.
    overhead: f64,
}

fn idx(t: Table) -> usize {
    t as usize
}

impl Store {
    /// Opens (creating) the record in `dir`, bounded by `bound` bytes.
    pub fn open(dir: &Path, bound: u64) -> anyhow::Result<Store> {
        let path = dir.join(DB_FILE);
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && !m.file_type().is_file()
        {
            anyhow::bail!("{}: not a regular file", path.display());
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Must come before the first table exists: freed pages can then be given back.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "journal_size_limit", WAL_BYTES as i64)?;
        // Checkpoint after each half megabyte of log: with 1 MiB transactions the log stays
        // inside its room.
        conn.pragma_update(None, "wal_autocheckpoint", 128i64)?;
        conn.pragma_update(None, "cache_size", -4096i64)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap_or(0);
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "{}: written by a newer tcpwatch (schema {version}, this one knows {SCHEMA_VERSION}); move it away or use --state-dir",
                path.display()
            );
        }
        if version == 1 {
            // Version 1 kept events as JSON text; they are not carried over.
            conn.execute_batch("DROP TABLE IF EXISTS events; DROP TABLE IF EXISTS signals;")?;
        }
        conn.execute_batch(SCHEMA)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let mut s = Store {
            conn,
            path,
            bound,
            bytes: [0; 5],
            rows: [0; 5],
            pruned: Pruned::default(),
            dropped: 0,
            overhead: 1.0,
        };
        s.pruned = Pruned {
            events: s.meta("pruned_events"),
            signals: s.meta("pruned_signals"),
            timelines: s.meta("pruned_timelines"),
            frames: s.meta("pruned_frames"),
        };
        s.dropped = s.meta("dropped");
        s.measure()?;
        Ok(s)
    }

    fn meta(&self, key: &str) -> u64 {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, i64>(0)
            })
            .map_or(0, |v| v.max(0) as u64)
    }

    /// Saves the counters of what was pruned and dropped (inside the caller's transaction).
    pub fn save_meta(&self) -> rusqlite::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        for (k, v) in [
            ("pruned_events", self.pruned.events),
            ("pruned_signals", self.pruned.signals),
            ("pruned_timelines", self.pruned.timelines),
            ("pruned_frames", self.pruned.frames),
            ("dropped", self.dropped),
        ] {
            st.execute(params![k, v as i64])?;
        }
        Ok(())
    }

    /// Reads each table's size again, and how much the pages in use exceed the estimate.
    pub fn measure(&mut self) -> rusqlite::Result<()> {
        for t in Table::ALL {
            let (rows, json): (i64, i64) = self.conn.query_row(
                &format!(
                    "SELECT count(*), coalesce(sum({}), 0) FROM {}",
                    t.payload(),
                    t.name()
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let mut bytes = json as u64 + rows as u64 * ROW_BYTES;
            if t == Table::Frames {
                let lf: i64 =
                    self.conn
                        .query_row("SELECT count(*) FROM listener_frames", [], |r| r.get(0))?;
                bytes += lf as u64 * LISTENER_ROW_BYTES;
            }
            self.rows[idx(t)] = rows as u64;
            self.bytes[idx(t)] = bytes;
        }
        self.correct()
    }

    /// Compares the pages in use with the estimate, so the shares bound what is on disk
    /// (indexes and page slack included). Cheap: three pragmas.
    pub fn correct(&mut self) -> rusqlite::Result<()> {
        let est: u64 = self.bytes.iter().sum();
        let used = self.used_bytes()?;
        // Small records are mostly fixed costs: trust the measure once there is some data.
        if est > (1 << 20) {
            self.overhead = (used as f64 / est as f64).clamp(1.0, 4.0);
        }
        Ok(())
    }

    /// Bytes of pages in use (not free) in the main file.
    pub fn used_bytes(&self) -> rusqlite::Result<u64> {
        let q = |p: &str| -> rusqlite::Result<i64> {
            self.conn
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
        };
        let (count, free, size) = (q("page_count")?, q("freelist_count")?, q("page_size")?);
        Ok(((count - free).max(0) * size) as u64)
    }

    /// Bytes on disk: the file and its write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        len(&self.path) + len(Path::new(&wal))
    }

    /// Counts rows written to `t`.
    pub fn added(&mut self, t: Table, rows: u64, bytes: u64) {
        self.rows[idx(t)] += rows;
        self.bytes[idx(t)] += bytes;
    }

    /// A table's bytes at most: its share, the full event stream also what the others
    /// leave unused (a quiet host's frames and timelines are far from theirs).
    fn budget(&self, t: Table) -> u64 {
        let data = self.bound.saturating_sub(WAL_BYTES) as f64 / self.overhead;
        let share = |t: Table| (data * t.share() as f64 / 100.0) as u64;
        if t != Table::Events {
            return share(t);
        }
        let others: u64 = Table::ALL
            .iter()
            .filter(|o| **o != Table::Events)
            .map(|o| self.bytes[idx(*o)].min(share(*o)))
            .sum();
        (data as u64).saturating_sub(others).max(share(t))
    }

    /// Prunes as if `incoming` more bytes of events were already there.
    pub fn make_room(&mut self, incoming: u64) -> rusqlite::Result<()> {
        let i = idx(Table::Events);
        self.bytes[i] += incoming;
        self.rows[i] += 1;
        let res = self.prune();
        self.bytes[i] = self.bytes[i].saturating_sub(incoming);
        self.rows[i] = self.rows[i].saturating_sub(1);
        res.map(|_| ())
    }

    /// Deletes the oldest rows of every table over its share (plain timelines before
    /// interesting ones). Inside the caller's transaction; `vacuum` gives the pages back
    /// after it.
    pub fn prune(&mut self) -> rusqlite::Result<bool> {
        let mut any = false;
        for t in Table::ALL {
            let (bytes, rows, budget) = (self.bytes[idx(t)], self.rows[idx(t)], self.budget(t));
            if bytes <= budget || rows == 0 {
                continue;
            }
            // Down to 90 % of the share, so pruning happens in steps, not at every write.
            let excess = bytes - budget * 9 / 10;
            let n = excess.div_ceil((bytes / rows).max(1)).clamp(1, rows);
            let (deleted, freed) = self.delete_oldest(t, n)?;
            self.bytes[idx(t)] = self.bytes[idx(t)].saturating_sub(freed);
            self.rows[idx(t)] = self.rows[idx(t)].saturating_sub(deleted);
            match t {
                Table::Events => self.pruned.events += deleted,
                Table::Signals => self.pruned.signals += deleted,
                Table::Timelines => self.pruned.timelines += deleted,
                Table::Frames => self.pruned.frames += deleted,
                Table::Counters => {}
            }
            any |= deleted > 0;
        }
        Ok(any)
    }

    /// Deletes the `n` oldest rows of `t` the rows `select` picks (a query of their rowids),
    /// returning how many went and their estimated bytes.
    fn delete_rows(&self, t: Table, select: &str, n: i64) -> rusqlite::Result<(u64, u64)> {
        let (table, payload) = (t.name(), t.payload());
        let (rows, json): (i64, i64) = self.conn.query_row(
            &format!(
                "SELECT count(*), coalesce(sum({payload}), 0) FROM {table}
                 WHERE rowid IN ({select})"
            ),
            [n],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        self.conn.execute(
            &format!("DELETE FROM {table} WHERE rowid IN ({select})"),
            [n],
        )?;
        Ok((rows as u64, json as u64 + rows as u64 * ROW_BYTES))
    }

    fn delete_oldest(&self, t: Table, n: u64) -> rusqlite::Result<(u64, u64)> {
        let n = n as i64;
        match t {
            Table::Timelines => {
                // Plain ones first; interesting ones only once no plain one is left.
                let (a, ab) = self.delete_rows(
                    Table::Timelines,
                    "SELECT id FROM timelines WHERE interest = '' ORDER BY id LIMIT ?1",
                    n,
                )?;
                let rest = n - a as i64;
                if rest <= 0 {
                    return Ok((a, ab));
                }
                let (b, bb) = self.delete_rows(
                    Table::Timelines,
                    "SELECT id FROM timelines ORDER BY id LIMIT ?1",
                    rest,
                )?;
                Ok((a + b, ab + bb))
            }
            Table::Frames => {
                let cut: Option<i64> = self
                    .conn
                    .query_row(
                        "SELECT wall_ns FROM frames ORDER BY wall_ns LIMIT 1 OFFSET ?1",
                        [n - 1],
                        |r| r.get(0),
                    )
                    .ok();
                let Some(cut) = cut else { return Ok((0, 0)) };
                let lf = self
                    .conn
                    .execute("DELETE FROM listener_frames WHERE wall_ns <= ?1", [cut])?
                    as u64;
                let (f, fb) = self.delete_rows(
                    Table::Frames,
                    "SELECT rowid FROM frames WHERE wall_ns <= ?1",
                    cut,
                )?;
                Ok((f, fb + lf * LISTENER_ROW_BYTES))
            }
            Table::Counters => self.delete_rows(
                Table::Counters,
                "SELECT rowid FROM counters ORDER BY wall_ns LIMIT ?1",
                n,
            ),
            Table::Events => self.delete_rows(
                Table::Events,
                "SELECT id FROM events ORDER BY id LIMIT ?1",
                n,
            ),
            Table::Signals => self.delete_rows(
                Table::Signals,
                "SELECT id FROM signals ORDER BY id LIMIT ?1",
                n,
            ),
        }
    }

    /// Truncates free pages off the file (after a prune, outside a transaction).
    pub fn vacuum(&self) -> rusqlite::Result<()> {
        // Each step frees one page: run it to the end.
        let mut st = self.conn.prepare("PRAGMA incremental_vacuum")?;
        let mut rows = st.query([])?;
        while rows.next()?.is_some() {}
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Where each kind of history begins, the bytes used and what was cut.
    pub fn span(&self) -> RecordSpan {
        span_of(
            &self.conn,
            self.bound,
            self.pruned,
            self.dropped,
            self.disk_bytes(),
        )
    }

    pub fn bound(&self) -> u64 {
        self.bound
    }
}

fn oldest(conn: &Connection, t: Table) -> Option<i64> {
    conn.query_row(
        &format!("SELECT min({}) FROM {}", t.age(), t.name()),
        [],
        |r| r.get::<_, Option<i64>>(0),
    )
    .ok()
    .flatten()
}

pub fn span_of(
    conn: &Connection,
    bound: u64,
    pruned: Pruned,
    dropped: u64,
    bytes: u64,
) -> RecordSpan {
    RecordSpan {
        frames_from_wall_ns: oldest(conn, Table::Frames),
        events_from_wall_ns: oldest(conn, Table::Events),
        signals_from_wall_ns: oldest(conn, Table::Signals),
        timelines_from_wall_ns: oldest(conn, Table::Timelines),
        bytes,
        bound_bytes: bound,
        pruned,
        dropped,
    }
}

/// A connection for reading (queries run beside the writer: WAL readers never wait).
pub fn open_reader(dir: &Path) -> anyhow::Result<Connection> {
    let path = dir.join(DB_FILE);
    let c = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}
