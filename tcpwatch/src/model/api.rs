//! The daemon's local API, version 1: the messages both ends agree on (newline-delimited JSON
//! over a unix socket; docs/api.md is their description). Adding a field is compatible;
//! anything else is a new version.
use serde::{Deserialize, Serialize};

use crate::model::history::Frame;
use crate::model::snapshot::{HookView, LossView, NsInput, Snapshot, SocketView};
use crate::model::system::{Counters, Sockstat};

/// The version this build speaks.
pub const API_VERSION: u32 = 1;

/// A request line (or a response line) is at most this long; snapshots and streams are sent
/// as many lines or one long one the client reads with its own bound.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The first line the daemon sends on every connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hello {
    /// Always "tcpwatch": tells a daemon from anything else listening on the path.
    pub service: String,
    pub api: u32,
    /// The daemon's build.
    pub version: String,
    pub host: String,
    pub kernel: String,
    pub pid: u32,
    /// Unix time in ns when the daemon started, and its clock (realtime − monotonic) for
    /// turning the events' monotonic times into wall-clock times.
    pub started_wall_ns: i64,
    pub clock_offset_ns: i64,
    /// The kernel's reset reasons (code, name), for naming them in text.
    #[serde(default)]
    pub reasons: Vec<(u32, String)>,
    /// Where the flight recorder's history begins: frames, and full events (older events
    /// were pruned to stay within the bound; signals may reach further back).
    pub record: Option<RecordSpan>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct RecordSpan {
    pub frames_from_wall_ns: Option<i64>,
    pub events_from_wall_ns: Option<i64>,
    pub signals_from_wall_ns: Option<i64>,
    pub timelines_from_wall_ns: Option<i64>,
    /// Bytes the recorder uses on disk, and its bound.
    pub bytes: u64,
    pub bound_bytes: u64,
    /// What was dropped to stay inside the bound (rows pruned), and what never reached the
    /// disk (plain events past the recorder's rate, the recorder behind, or a write failed).
    pub pruned: Pruned,
    pub dropped: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct Pruned {
    pub events: u64,
    pub signals: u64,
    pub timelines: u64,
    pub frames: u64,
}

/// The filters a client asks for, as `trace`'s flags say them (the netns as an inode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Filters {
    pub port: Option<u16>,
    pub lport: Option<u16>,
    pub rport: Option<u16>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub netns: Option<u32>,
    /// "inet" or "inet6".
    pub family: Option<String>,
}

impl Filters {
    /// Filters narrow the sockets shown within a namespace (its counters count more).
    pub fn narrows_sockets(&self) -> bool {
        self.port.is_some()
            || self.lport.is_some()
            || self.rport.is_some()
            || self.pid.is_some()
            || self.comm.is_some()
            || self.family.is_some()
    }
}

/// One request line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Request {
    pub api: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A snapshot of a window: what `snapshot --duration` would have printed over
    /// [from, to]. `from` absent: an instant snapshot now; `to` absent: up to now, with the
    /// socket listing of now.
    Snapshot {
        from_wall_ns: Option<i64>,
        to_wall_ns: Option<i64>,
        #[serde(default)]
        filters: Filters,
        #[serde(default = "default_close_wait")]
        close_wait_secs: u64,
    },
    /// The daemon's live model (what `top` draws): the snapshot since the daemon started and
    /// every connection it holds.
    Live {
        #[serde(default)]
        filters: Filters,
        #[serde(default = "default_close_wait")]
        close_wait_secs: u64,
        /// Connections returned at most (the most recent first).
        #[serde(default = "default_connections")]
        connections: usize,
    },
    /// One socket's timeline, open or closed: by cookie, or by its two endpoints.
    Timeline {
        cookie: Option<u64>,
        local: Option<String>,
        remote: Option<String>,
        netns: Option<u32>,
    },
    /// The 10-second frames of [from, to].
    Frames {
        from_wall_ns: i64,
        to_wall_ns: Option<i64>,
    },
    /// Events as `trace --json` writes them: the recorded ones from `from` (if given), then
    /// live ones until the client hangs up.
    Subscribe {
        from_wall_ns: Option<i64>,
        #[serde(default)]
        filters: Filters,
    },
    /// Each watched namespace's counters, sysctls and sockstat now, the hooks and the loss
    /// (what `check` judges a command's events against).
    Readings,
}

fn default_close_wait() -> u64 {
    10
}

fn default_connections() -> usize {
    5000
}

/// A response line: `{"ok":true, ...}` or `{"ok":false,"error":"..."}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Response {
    Ok(Reply),
    Err(Failure),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Failure {
    pub ok: bool,
    pub error: String,
}

impl Failure {
    pub fn new(error: impl Into<String>) -> Failure {
        Failure {
            ok: false,
            error: error.into(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Snapshot {
        snapshot: Box<Snapshot>,
        /// Where the window's data came from (the record may start after `from`).
        history: Option<History>,
    },
    Live {
        snapshot: Box<Snapshot>,
        connections: Vec<SocketView>,
        events_seen: u64,
    },
    Timelines {
        /// Matching timelines, the most recent first; `recorded` tells those read from the
        /// record (closed) from those the daemon holds.
        timelines: Vec<SocketView>,
        recorded: Vec<bool>,
        clock_offset_ns: i64,
    },
    Frames {
        frames: Vec<Frame>,
    },
    /// The subscription is on: event lines follow.
    Subscribed {
        /// Recorded events start here (later than asked when the bound pruned older ones).
        from_wall_ns: Option<i64>,
    },
    Readings {
        namespaces: Vec<NsReading>,
        hooks: Vec<HookView>,
        loss: LossView,
        events_seen: u64,
    },
}

/// What a past window's snapshot was made of.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct History {
    pub from_wall_ns: i64,
    pub to_wall_ns: i64,
    /// Full events from here on; signals (retransmits, resets, errors, overflows) from
    /// `signals_from_wall_ns`; before both, only the frames.
    pub events_from_wall_ns: Option<i64>,
    pub signals_from_wall_ns: Option<i64>,
    /// The counters the window's deltas start from were read at this time.
    pub counters_from_wall_ns: Option<i64>,
    pub events: u64,
    /// Events the recorder has pruned so far (0: the record starts where the daemon first
    /// ran with it, nothing was cut).
    #[serde(default)]
    pub events_pruned: u64,
    /// The window's 10-second frames (states over time, per-frame totals).
    pub frames: Vec<Frame>,
}

/// One namespace's readings, as a snapshot takes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NsReading {
    pub inode: u32,
    pub counters: std::collections::BTreeMap<String, u64>,
    pub sysctls: std::collections::BTreeMap<String, String>,
    pub sockstat: SockstatView,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct SockstatView {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem_pages: u64,
}

impl NsReading {
    pub fn of(n: &NsInput) -> NsReading {
        let s = &n.sockstat;
        NsReading {
            inode: n.inode,
            counters: n.counters_now.0.clone(),
            sysctls: n.sysctls.clone(),
            sockstat: SockstatView {
                inuse: s.inuse,
                orphan: s.orphan,
                tw: s.tw,
                alloc: s.alloc,
                mem_pages: s.mem_pages,
            },
        }
    }

    /// Back into a snapshot's input, the window's counters starting at `start`.
    pub fn input(&self, start: &NsReading) -> NsInput {
        let s = &self.sockstat;
        NsInput {
            inode: self.inode,
            counters_now: Counters(self.counters.clone()),
            counters_start: Counters(start.counters.clone()),
            sysctls: self.sysctls.clone(),
            sockstat: Sockstat {
                inuse: s.inuse,
                orphan: s.orphan,
                tw: s.tw,
                alloc: s.alloc,
                mem_pages: s.mem_pages,
            },
            decode_errors: 0,
        }
    }
}

/// Lines of a subscription's stream that are not events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamNote {
    /// The recorded part is over; live events follow.
    Live,
    /// This subscriber's queue was full: `count` events were not sent to it (the daemon
    /// itself lost nothing for that).
    Skipped { count: u64, total: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_str(
            r#"{"api":1,"op":"snapshot","from_wall_ns":5,"filters":{"port":443}}"#,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Snapshot {
                from_wall_ns: Some(5),
                to_wall_ns: None,
                filters: Filters {
                    port: Some(443),
                    ..Filters::default()
                },
                close_wait_secs: 10,
            }
        );
        let r: Request = serde_json::from_str(r#"{"api":1,"op":"readings"}"#).unwrap();
        assert_eq!(r.op, Op::Readings);
        assert!(serde_json::from_str::<Request>(r#"{"api":1,"op":"rm -rf"}"#).is_err());
        let line = serde_json::to_string(&Request {
            api: API_VERSION,
            op: Op::Subscribe {
                from_wall_ns: None,
                filters: Filters::default(),
            },
        })
        .unwrap();
        assert!(line.starts_with(r#"{"api":1,"op":"subscribe""#), "{line}");
    }

    #[test]
    fn responses_tell_success_from_failure() {
        let ok = Response::Ok(Reply {
            ok: true,
            body: Body::Subscribed {
                from_wall_ns: Some(7),
            },
        });
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"ok":true,"kind":"subscribed","from_wall_ns":7}"#);
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), ok);
        let err: Response = serde_json::from_str(r#"{"ok":false,"error":"no"}"#).unwrap();
        assert_eq!(err, Response::Err(Failure::new("no")));
    }
}
