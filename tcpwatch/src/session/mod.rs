//! One observation session: the probe and collection pipeline ([`Collector`]), the aggregated
//! model ([`Analysis`]), the clock and the loss account, and the one poll → aggregate →
//! snapshot loop every command runs. Commands are thin layers over this.
pub mod analysis;
pub mod collector;
pub mod sampler;

use std::time::{Duration, Instant};

pub use analysis::{Analysis, Context, Reading};
pub use collector::{Batch, Collector};

use crate::ebpf::ProbeConfig;
use crate::model::Loss;
use crate::model::event::Event;
use crate::model::snapshot::{NsInput, Snapshot, SocketView, Thresholds};
use crate::model::system::SockRec;
use crate::model::time::Clock;
use crate::settings::Filters;
use crate::source::host;

/// How a session is started.
pub struct Options {
    pub probe: ProbeConfig,
    pub filters: Filters,
    pub thresholds: Thresholds,
    /// Filters narrow the sockets shown within a namespace.
    pub sockets_filtered: bool,
    /// Follow events (inventory at start, sampler thread). Without it: an instant snapshot.
    pub watch: bool,
    /// Feed the aggregator (everything but `trace`, which only streams).
    pub aggregate: bool,
    /// How long closed sockets and listeners stay in the model (`None`: a minute).
    pub retention_ns: Option<u64>,
}

/// Which events and listener samples of a step count (for `check`: the command's own).
pub trait Scope {
    fn event(&mut self, e: &Event) -> bool;
    fn listener(&mut self, l: &SockRec) -> bool;
}

pub struct Session {
    collector: Collector,
    analysis: Analysis,
    clock: Clock,
    aggregate: bool,
    batch: Batch,
    scope: Option<Box<dyn Scope>>,
    /// The last full listing and when it was read.
    listing: Option<(Instant, Vec<SockRec>, Vec<NsInput>)>,
}

impl Session {
    pub fn start(opts: Options) -> anyhow::Result<Session> {
        let Options {
            probe,
            filters,
            thresholds,
            sockets_filtered,
            watch,
            aggregate,
            retention_ns,
        } = opts;
        let mut collector = Collector::start(&probe, filters)?;
        if watch {
            collector.take_inventory();
        } else {
            collector.discover();
        }
        let ctx = Context {
            host: host::hostname(),
            kernel: host::kernel_release(),
            home_netns: crate::settings::own_netns(),
            thresholds,
            sockets_filtered,
            reasons: collector.rst_reasons(),
        };
        let mut analysis = Analysis::new(ctx, watch.then(host::monotonic_ns));
        if let Some(r) = retention_ns {
            analysis.set_retention(r);
        }
        analysis.seed(&collector.take_startup_inventory());
        Ok(Session {
            collector,
            analysis,
            clock: host::wall_clock(),
            aggregate,
            batch: Batch::default(),
            scope: None,
            listing: None,
        })
    }

    /// Only events and listener samples `scope` keeps are aggregated and returned by `step`.
    pub fn set_scope(&mut self, scope: Box<dyn Scope>) {
        self.scope = Some(scope);
    }

    pub fn collector(&self) -> &Collector {
        &self.collector
    }

    pub fn analysis(&self) -> &Analysis {
        &self.analysis
    }

    /// For the threaded modes (`serve`): the ring reader takes the collector, another thread
    /// the analysis.
    pub fn into_parts(self) -> (Collector, Analysis) {
        (self.collector, self.analysis)
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn now_ns(&self) -> u64 {
        host::monotonic_ns()
    }

    /// Waits up to `timeout` for events, collects them, aggregates what is in scope and
    /// returns it.
    pub fn step(&mut self, timeout: Duration) -> &Batch {
        self.batch.clear();
        self.collector.poll(timeout, false, &mut self.batch);
        self.absorb()
    }

    /// The last step: one more sample of every namespace and everything still held back.
    pub fn finish(&mut self) -> &Batch {
        self.batch.clear();
        self.collector.finish(&mut self.batch);
        self.absorb()
    }

    fn absorb(&mut self) -> &Batch {
        if let Some(scope) = self.scope.as_mut() {
            self.batch.events.retain(|e| scope.event(e));
            self.batch.listeners.retain(|l| scope.listener(l));
        }
        if self.aggregate {
            let now = host::monotonic_ns();
            self.analysis.apply(&self.batch.events);
            self.analysis.observe(&self.batch.listeners, now);
            self.analysis.tick(now);
        }
        &self.batch
    }

    /// The events of the last step, moved out (to another thread) instead of copied.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::replace(&mut self.batch.events, Vec::with_capacity(4096))
    }

    /// Loss since the previous call (the collector keeps the total).
    pub fn refresh_loss(&mut self) -> Loss {
        self.collector.refresh_loss()
    }

    /// The kernel programs' diagnostics read since the previous call.
    pub fn take_diagnostics(&mut self) -> Vec<String> {
        self.collector.take_diagnostics()
    }

    pub fn loss(&self) -> Loss {
        self.collector.loss()
    }

    pub fn events_seen(&self) -> u64 {
        self.collector.events_seen()
    }

    /// The snapshot now, over a socket listing no older than `max_age` (read again when it
    /// is).
    pub fn snapshot(&mut self, max_age: Duration) -> Snapshot {
        let stale = self
            .listing
            .as_ref()
            .is_none_or(|(t, _, _)| t.elapsed() > max_age || max_age.is_zero());
        if stale {
            let (socks, namespaces) = self.collector.fresh_inventory();
            self.listing = Some((Instant::now(), socks, namespaces));
        }
        let (_, socks, namespaces) = self.listing.as_ref().expect("read above");
        self.analysis.snapshot(
            host::monotonic_ns(),
            Reading {
                inventory: Some(socks),
                namespaces: namespaces.clone(),
                loss: self.collector.loss(),
                hooks: self.collector.hooks(),
            },
        )
    }

    /// The snapshot of the aggregated events alone, with each namespace's counters and
    /// sysctls but no socket listing (a `check` run judges what its command did).
    pub fn snapshot_of_events(&mut self) -> Snapshot {
        let (_, namespaces) = self.collector.fresh_inventory();
        self.analysis.snapshot(
            host::monotonic_ns(),
            Reading {
                inventory: None,
                namespaces,
                loss: self.collector.loss(),
                hooks: self.collector.hooks(),
            },
        )
    }

    pub fn connections(&self) -> Vec<SocketView> {
        self.analysis.connections(host::monotonic_ns())
    }
}
