//! The aggregated side of a session: the aggregator fed with events and listener samples, and
//! the one place a snapshot's input is put together from it and what the collector read.
use crate::model::Loss;
use crate::model::aggregate::{Aggregator, Config as AggConfig, ListenerSample, TwEntry};
use crate::model::event::{Event, RstReasons, TcpState};
use crate::model::snapshot::{self, HookView, Input, NsInput, Snapshot, SocketView, Thresholds};
use crate::model::system::SockRec;

/// What every snapshot of one session shares.
#[derive(Clone, Debug)]
pub struct Context {
    pub host: String,
    pub kernel: String,
    /// tcpwatch's own network namespace.
    pub home_netns: u32,
    pub thresholds: Thresholds,
    /// Filters narrow the sockets shown within a namespace (its counters count more).
    pub sockets_filtered: bool,
    pub reasons: RstReasons,
}

/// What the collector read for one snapshot.
pub struct Reading<'a> {
    /// The socket listing taken now; `None` without one (a replay, a check run).
    pub inventory: Option<&'a [SockRec]>,
    pub namespaces: Vec<NsInput>,
    pub loss: Loss,
    pub hooks: Vec<HookView>,
}

impl Reading<'_> {
    /// Nothing read: a replay, or a check run that lists no sockets.
    pub fn none(loss: Loss, hooks: Vec<HookView>) -> Reading<'static> {
        Reading {
            inventory: None,
            namespaces: Vec::new(),
            loss,
            hooks,
        }
    }
}

pub struct Analysis {
    agg: Aggregator,
    ctx: Context,
    /// When events began to be watched (CLOCK_MONOTONIC ns); `None` for an instant snapshot.
    since_ns: Option<u64>,
}

/// A sampled listener record as the aggregator takes it.
pub fn listener_sample(l: &SockRec) -> ListenerSample {
    ListenerSample {
        netns: l.netns,
        local: l.local,
        cookie: l.cookie,
        owner: l.owner,
        accept_now: l.accept_queue,
        accept_max: l.accept_max,
        syn_now: l.syn_queue,
        drops: l.drops as u64,
    }
}

impl Analysis {
    pub fn new(ctx: Context, since_ns: Option<u64>) -> Analysis {
        Analysis {
            agg: Aggregator::new(AggConfig::default()),
            ctx,
            since_ns,
        }
    }

    /// Closed timelines and listeners are kept this long instead of the default minute.
    pub fn set_retention(&mut self, ns: u64) {
        self.agg.cfg.retention_ns = ns;
    }

    /// Timelines leaving the model are kept for `take_retired` (the daemon records them).
    pub fn keep_retired(&mut self) {
        self.agg.cfg.keep_retired = true;
    }

    /// The closed timelines that left the model since the previous call, as views at `now_ns`,
    /// each with when it ended (monotonic ns).
    pub fn take_retired(&mut self, now_ns: u64) -> Vec<(SocketView, u64)> {
        self.agg
            .take_retired()
            .iter()
            .map(|t| {
                (
                    snapshot::socket_view(t, now_ns),
                    t.ended_ns().unwrap_or(t.last_ns),
                )
            })
            .collect()
    }

    /// Reset-reason names learned later (a replay reads them as it goes).
    pub fn set_reasons(&mut self, reasons: RstReasons) {
        self.ctx.reasons = reasons;
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn aggregator(&self) -> &Aggregator {
        &self.agg
    }

    /// Feeds the aggregator the inventory's timewait sockets (their age is unknown).
    pub fn seed(&mut self, inventory: &[SockRec]) {
        for r in inventory.iter().filter(|r| r.state == TcpState::TimeWait) {
            self.agg.seed_timewait(
                r.skaddr,
                TwEntry {
                    netns: r.netns,
                    local: r.local,
                    remote: r.remote,
                    enter_ns: None,
                    substate: r.substate,
                    owner: r.owner,
                },
            );
        }
    }

    pub fn apply(&mut self, events: &[Event]) {
        for e in events {
            self.agg.apply(e);
        }
    }

    pub fn observe(&mut self, listeners: &[SockRec], now_ns: u64) {
        for l in listeners {
            self.agg.observe_listener(&listener_sample(l), now_ns);
        }
    }

    /// Listener samples made elsewhere (the record's frames).
    pub fn aggregator_observe(&mut self, samples: &[ListenerSample], now_ns: u64) {
        for s in samples {
            self.agg.observe_listener(s, now_ns);
        }
    }

    pub fn tick(&mut self, now_ns: u64) {
        self.agg.tick(now_ns);
    }

    /// Peaks restart (after a scrape, which reports the peak since the previous one).
    pub fn reset_peaks(&mut self) {
        self.agg.reset_listener_peaks();
    }

    /// The snapshot at `now_ns` of what was aggregated and what the collector just read.
    pub fn snapshot(&self, now_ns: u64, r: Reading<'_>) -> Snapshot {
        let input = Input {
            now_ns,
            window_ns: self.since_ns.map_or(0, |t| now_ns.saturating_sub(t)),
            host: self.ctx.host.clone(),
            kernel: self.ctx.kernel.clone(),
            hooks: r.hooks,
            inventory: r.inventory,
            namespaces: r.namespaces,
            loss: r.loss,
            home_netns: self.ctx.home_netns,
            thresholds: self.ctx.thresholds,
            sockets_filtered: self.ctx.sockets_filtered,
            reasons: self.ctx.reasons.clone(),
        };
        snapshot::build(&self.agg, &input)
    }

    /// Timelines for the connections table: every one the aggregator keeps, most recent first.
    pub fn connections(&self, now_ns: u64) -> Vec<SocketView> {
        let mut v: Vec<_> = self.agg.sockets().collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.last_ns));
        v.into_iter()
            .take(5000)
            .map(|t| snapshot::socket_view(t, now_ns))
            .collect()
    }
}
