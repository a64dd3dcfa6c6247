//! `tcpwatch top`: the interactive view. `App` is plain state fed with snapshots and event
//! lines; key handling changes only that state (tested without drawing); `draw` renders it.
pub mod draw;
pub mod term;

use std::collections::{BTreeMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::model::snapshot::{Snapshot, SocketView};

/// How many state samples the sparklines keep (one per refresh).
pub const HISTORY: usize = 120;
/// Frames (10 s each) a daemon's history shows: the last hour.
pub const HISTORY_FRAMES: usize = 360;
/// Event log lines kept.
pub const LOG_LINES: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Overview,
    Connections,
    Events,
}

/// What the detail view shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    Socket(u64),
    Listener { netns: u32, addr: String, port: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Recent,
    State,
    Age,
    Retransmits,
    Owner,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Recent => Sort::State,
            Sort::State => Sort::Age,
            Sort::Age => Sort::Retransmits,
            Sort::Retransmits => Sort::Owner,
            Sort::Owner => Sort::Recent,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sort::Recent => "recent",
            Sort::State => "state",
            Sort::Age => "time in state",
            Sort::Retransmits => "retransmits",
            Sort::Owner => "owner",
        }
    }
}

pub struct App {
    /// Where the data comes from: the host, or a replayed file.
    pub source: String,
    pub snap: Snapshot,
    /// Every timeline the aggregator holds (most recent first), for the connections table.
    pub conns: Vec<SocketView>,
    /// State counts over time, oldest first.
    pub history: VecDeque<BTreeMap<crate::model::snapshot::Name, u64>>,
    pub events: VecDeque<String>,
    pub events_per_s: f64,
    pub view: View,
    pub detail: Option<Detail>,
    pub selected: usize,
    pub filter: String,
    pub editing_filter: bool,
    pub sort: Sort,
    pub paused: bool,
    pub help: bool,
    pub quit: bool,
    /// Turns monotonic event times into wall-clock times (none for a replay).
    pub clock: Option<crate::model::time::Clock>,
    /// A daemon's record behind the view: it can step back in time.
    pub can_travel: bool,
    /// The time the view shows (Unix ns), `None` for now; keys move it, the loop that feeds
    /// the app follows.
    pub at: Option<i64>,
    /// What the loop should show now, when the keys changed it (taken by the loop).
    pub travel: Option<Option<i64>>,
}

/// How far `[`/`]` and `{`/`}` step.
pub const STEP_NS: i64 = 60_000_000_000;
pub const BIG_STEP_NS: i64 = 600_000_000_000;

impl App {
    pub fn new(source: impl Into<String>) -> App {
        App {
            source: source.into(),
            snap: Snapshot::default(),
            conns: Vec::new(),
            history: VecDeque::new(),
            events: VecDeque::new(),
            events_per_s: 0.0,
            view: View::Overview,
            detail: None,
            selected: 0,
            filter: String::new(),
            editing_filter: false,
            sort: Sort::Recent,
            paused: false,
            help: false,
            quit: false,
            clock: None,
            can_travel: false,
            at: None,
            travel: None,
        }
    }

    /// Moves the view by `delta_ns` from what it shows (now when live); reaching now again
    /// goes back to live.
    pub fn step(&mut self, delta_ns: i64, now_wall_ns: i64) {
        if !self.can_travel {
            return;
        }
        let from = self.at.unwrap_or(now_wall_ns);
        let to = from.saturating_add(delta_ns);
        self.at = (to < now_wall_ns - 1_000_000_000).then_some(to);
        self.travel = Some(self.at);
    }

    /// State counts over time (a daemon's frames, oldest first) instead of the per-refresh
    /// samples.
    pub fn set_history(&mut self, h: Vec<BTreeMap<crate::model::snapshot::Name, u64>>) {
        self.history = h.into();
        while self.history.len() > HISTORY_FRAMES {
            self.history.pop_front();
        }
    }

    /// New data; ignored while paused (the event log keeps its lines).
    pub fn update(&mut self, snap: Snapshot, conns: Vec<SocketView>, events_per_s: f64) {
        if self.paused {
            return;
        }
        self.history.push_back(snap.states.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.snap = snap;
        self.conns = conns;
        self.events_per_s = events_per_s;
        let n = self.rows_len();
        if self.selected >= n {
            self.selected = n.saturating_sub(1);
        }
    }

    pub fn log(&mut self, line: String) {
        if self.paused {
            return;
        }
        self.events.push_back(line);
        while self.events.len() > LOG_LINES {
            self.events.pop_front();
        }
    }

    /// Connections after the filter, in the chosen order.
    pub fn visible_conns(&self) -> Vec<&SocketView> {
        let mut v: Vec<&SocketView> = self
            .conns
            .iter()
            .filter(|c| matches_filter(c, &self.filter))
            .collect();
        match self.sort {
            Sort::Recent => {}
            Sort::State => v.sort_by(|a, b| a.state.cmp(&b.state)),
            Sort::Age => v.sort_by_key(|c| std::cmp::Reverse(c.state_for_ns)),
            Sort::Retransmits => {
                v.sort_by_key(|c| std::cmp::Reverse(c.retransmits.values().sum::<u32>()))
            }
            Sort::Owner => v.sort_by_key(|c| c.owner.as_ref().map(|o| (o.comm.clone(), o.pid))),
        }
        v
    }

    fn rows_len(&self) -> usize {
        match self.view {
            View::Overview => self.snap.listeners.len(),
            View::Connections => self.visible_conns().len(),
            View::Events => self.events.len(),
        }
    }

    /// Applies one key press.
    pub fn key(&mut self, k: KeyEvent) {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        if self.editing_filter {
            match k.code {
                KeyCode::Enter | KeyCode::Esc => self.editing_filter = false,
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => {
                    self.filter.push(c);
                    self.selected = 0;
                }
                _ => {}
            }
            return;
        }
        if self.help {
            // Any key closes the help.
            self.help = false;
            return;
        }
        match k.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('p') => self.paused = !self.paused,
            // Esc steps back: out of a detail view first, then drops the row filter.
            KeyCode::Esc if self.detail.is_some() => self.detail = None,
            KeyCode::Esc => self.filter.clear(),
            KeyCode::Tab => self.switch(match self.view {
                View::Overview => View::Connections,
                View::Connections => View::Events,
                View::Events => View::Overview,
            }),
            KeyCode::Char('1') => self.switch(View::Overview),
            KeyCode::Char('2') => self.switch(View::Connections),
            KeyCode::Char('3') => self.switch(View::Events),
            KeyCode::Char('/') => {
                self.switch(View::Connections);
                self.editing_filter = true;
            }
            KeyCode::Char('s') if self.view == View::Connections => {
                self.sort = self.sort.next();
                self.selected = 0;
            }
            KeyCode::Down | KeyCode::Char('j') => {
                let n = self.rows_len();
                if self.selected + 1 < n {
                    self.selected += 1;
                }
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => {
                self.selected = (self.selected + 10).min(self.rows_len().saturating_sub(1))
            }
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(10),
            KeyCode::Home | KeyCode::Char('g') => self.selected = 0,
            KeyCode::End | KeyCode::Char('G') => self.selected = self.rows_len().saturating_sub(1),
            KeyCode::Enter => self.open(),
            KeyCode::Char('[') => self.step(-STEP_NS, wall_now()),
            KeyCode::Char(']') => self.step(STEP_NS, wall_now()),
            KeyCode::Char('{') => self.step(-BIG_STEP_NS, wall_now()),
            KeyCode::Char('}') => self.step(BIG_STEP_NS, wall_now()),
            KeyCode::Char('l') if self.at.is_some() => {
                self.at = None;
                self.travel = Some(None);
            }
            _ => {}
        }
    }

    fn switch(&mut self, v: View) {
        if self.view != v {
            self.view = v;
            self.selected = 0;
        }
        self.detail = None;
    }

    fn open(&mut self) {
        self.detail = match self.view {
            View::Overview => self
                .snap
                .listeners
                .get(self.selected)
                .map(|l| Detail::Listener {
                    netns: l.netns,
                    addr: l.addr.clone(),
                    port: l.port,
                }),
            View::Connections => self
                .visible_conns()
                .get(self.selected)
                .map(|c| Detail::Socket(c.cookie)),
            View::Events => None,
        };
    }
}

/// The wall clock, for the keys that step through time (the app is otherwise fed its time).
fn wall_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Whether a connection matches the filter: space-separated terms, all of which must match;
/// `state:`, `port:`, `pid:`, `comm:` prefixes select a field, bare words match anywhere.
pub fn matches_filter(c: &SocketView, filter: &str) -> bool {
    filter.split_whitespace().all(|term| {
        let t = term.to_ascii_lowercase();
        let (field, v) = t.split_once(':').unwrap_or(("", t.as_str()));
        let state = c.state.as_deref().unwrap_or("").to_ascii_lowercase();
        let comm = c
            .owner
            .as_ref()
            .map(|o| o.comm.to_ascii_lowercase())
            .unwrap_or_default();
        let pid = c
            .owner
            .as_ref()
            .map(|o| o.pid.to_string())
            .unwrap_or_default();
        let port_of = |a: &str| a.rsplit(':').next().unwrap_or("").to_string();
        match field {
            "state" => state.replace('-', "_").contains(&v.replace('-', "_")),
            "port" => port_of(&c.local) == v || port_of(&c.remote) == v,
            "pid" => pid == v,
            "comm" => comm.contains(v),
            _ => {
                let hay =
                    format!("{state} {} {} {pid} {comm}", c.local, c.remote).to_ascii_lowercase();
                hay.contains(&t)
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::snapshot::{ListenerView, OverflowsView, QueueView};
    use crate::testkit;

    pub(crate) fn k(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn app() -> App {
        let mut a = App::new("test");
        let mut s = Snapshot::default();
        s.listeners.push(ListenerView {
            netns: 1,
            addr: "0.0.0.0".into(),
            port: 80,
            cookie: 1,
            owner: None,
            accept_queue: QueueView::default(),
            syn_queue: QueueView::default(),
            drops: 0,
            overflows: OverflowsView::default(),
            synack_retransmits: 0,
        });
        let conns = vec![
            testkit::conn(1, "ESTABLISHED", "10.0.0.1:40000", "curl", 10),
            testkit::conn(2, "CLOSE_WAIT", "10.0.0.1:8080", "nginx", 20),
            testkit::conn(3, "TIME_WAIT", "10.0.0.1:40001", "curl", 10),
        ];
        a.update(s, conns, 5.0);
        a
    }

    #[test]
    fn views_selection_and_detail() {
        let mut a = app();
        a.key(k(KeyCode::Enter));
        assert_eq!(
            a.detail,
            Some(Detail::Listener {
                netns: 1,
                addr: "0.0.0.0".into(),
                port: 80
            })
        );
        a.key(k(KeyCode::Esc));
        assert_eq!(a.detail, None);
        a.key(k(KeyCode::Tab));
        assert_eq!(a.view, View::Connections);
        a.key(k(KeyCode::Char('j')));
        a.key(k(KeyCode::Down));
        a.key(k(KeyCode::Down));
        assert_eq!(a.selected, 2, "stops at the last row");
        a.key(k(KeyCode::Char('k')));
        a.key(k(KeyCode::Enter));
        assert_eq!(a.detail, Some(Detail::Socket(2)));
        a.key(k(KeyCode::Char('3')));
        assert_eq!((a.view, a.detail.clone()), (View::Events, None));
    }

    #[test]
    fn filter_editing_and_terms() {
        let mut a = app();
        a.key(k(KeyCode::Char('/')));
        assert!(a.editing_filter);
        for c in "comm:curl".chars() {
            a.key(k(KeyCode::Char(c)));
        }
        a.key(k(KeyCode::Char('q')));
        assert!(!a.quit, "q is text while editing");
        a.key(k(KeyCode::Backspace));
        a.key(k(KeyCode::Enter));
        assert_eq!(a.filter, "comm:curl");
        assert_eq!(a.visible_conns().len(), 2);
        a.filter = "state:close-wait".into();
        assert_eq!(a.visible_conns()[0].cookie, 2);
        a.filter = "port:40001".into();
        assert_eq!(a.visible_conns().len(), 1);
        a.filter = "pid:10 established".into();
        assert_eq!(a.visible_conns().len(), 1);
        a.key(k(KeyCode::Esc));
        assert!(a.filter.is_empty(), "Esc clears the filter");
    }

    #[test]
    fn sort_pause_help_quit() {
        let mut a = app();
        a.key(k(KeyCode::Char('2')));
        a.key(k(KeyCode::Char('s')));
        assert_eq!(a.sort, Sort::State);
        assert_eq!(a.visible_conns()[0].state.as_deref(), Some("CLOSE_WAIT"));
        a.key(k(KeyCode::Char('s')));
        assert_eq!(a.visible_conns()[0].cookie, 3, "longest in state first");
        a.key(k(KeyCode::Char('p')));
        assert!(a.paused);
        a.update(Snapshot::default(), vec![], 0.0);
        assert_eq!(a.conns.len(), 3, "paused: no new data");
        a.key(k(KeyCode::Char('?')));
        assert!(a.help);
        a.key(k(KeyCode::Char('x')));
        assert!(!a.help && !a.quit);
        a.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(a.quit);
    }

    #[test]
    fn selection_is_clamped_when_rows_vanish() {
        let mut a = app();
        a.key(k(KeyCode::Char('2')));
        a.key(k(KeyCode::End));
        assert_eq!(a.selected, 2);
        a.update(
            Snapshot::default(),
            vec![testkit::conn(1, "ESTABLISHED", "10.0.0.1:1", "x", 1)],
            0.0,
        );
        assert_eq!(a.selected, 0);
    }
}
