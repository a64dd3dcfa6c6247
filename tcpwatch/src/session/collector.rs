//! The collection pipeline: kernel records → decode → per-CPU merge → owners → timewait
//! machine → filters, plus the sampler's per-namespace samples turned into listener samples and
//! overflow events, the start-up inventory that seeds owners and timewait sockets, and the
//! loss account. Its insides are private: commands see events, samples and figures.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::sampler::{
    self, InventoryReader, Sampled, SharedProbe, full_read, owners_now, read_namespace,
};
use crate::ebpf::reader::RingReader;
use crate::ebpf::{Probe, ProbeConfig, decode};
use crate::model::Loss;
use crate::model::event::{Event, EventKind, Family, OverflowSource, Queue, RstReasons, TcpState};
use crate::model::overflow::{self, Causes, FinalAckLedger, ListenDropBudget, ListenerDelta};
use crate::model::owners::OwnerBook;
use crate::model::reorder::Reorder;
use crate::model::snapshot::{HookView, NsInput};
use crate::model::system::{Counters, SockRec, Sockstat};
use crate::model::timewait::TwMachine;
use crate::settings::Filters;
use crate::source::host::monotonic_ns;
use crate::source::netns::{self, NetnsRef};
use crate::source::procnet;

/// What tcpwatch knows about one network namespace between samples.
struct NsState {
    ns: NetnsRef,
    /// Kernel MIB counters at the last sample, and at start.
    counters: Counters,
    counters_at_start: Counters,
    sockstat: Sockstat,
    /// Listeners at the last sample, by socket address.
    listeners: HashMap<u64, SockRec>,
    /// What trims the listeners' drop deltas to `ListenDrops`.
    listen_drops: ListenDropBudget,
}

/// What one poll yields: events old enough to be final, in time order, and the listener
/// records of the samples taken in since the previous poll.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub listeners: Vec<SockRec>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.listeners.is_empty()
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.listeners.clear();
    }
}

/// Events from the kernel, decoded, merged, owner-resolved and filtered; samples from the
/// sampler thread turned into overflow events; the loss figures.
pub struct Collector {
    probe: SharedProbe,
    reader: RingReader,
    reorder: Reorder,
    owners: OwnerBook,
    endpoints: crate::model::endpoints::EndpointBook,
    timewait: TwMachine,
    filters: Filters,
    loss: Loss,
    /// The loss at the previous `refresh_loss`, for its delta.
    loss_reported: Loss,
    events: u64,
    namespaces: BTreeMap<u32, NsState>,
    /// The start-up inventory of every watched namespace.
    inventory: Vec<SockRec>,
    /// The kernel programs' diagnostics not yet shown.
    diagnostics: Vec<String>,
    /// Final-ACK overflows reported one by one that no listener sample has claimed yet.
    final_acks: FinalAckLedger,
    sampled: Receiver<Sampled>,
    sampled_tx: Option<Sender<Sampled>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    /// See `ProbeConfig::relaxed_sampling`.
    relaxed_sampling: bool,
}

impl Collector {
    pub fn start(cfg: &ProbeConfig, filters: Filters) -> anyhow::Result<Collector> {
        let mut probe = Probe::start(cfg)?;
        let reader = RingReader::new(probe.take_rings()?);
        let reorder = Reorder::new(reader.len());
        let (tx, rx) = channel();
        Ok(Collector {
            probe: Arc::new(Mutex::new(probe)),
            reader,
            reorder,
            owners: OwnerBook::new(),
            endpoints: Default::default(),
            timewait: TwMachine::new(),
            filters,
            loss: Loss::default(),
            loss_reported: Loss::default(),
            events: 0,
            namespaces: BTreeMap::new(),
            inventory: Vec::new(),
            diagnostics: Vec::new(),
            final_acks: FinalAckLedger::default(),
            sampled: rx,
            sampled_tx: Some(tx),
            stop: Arc::new(AtomicBool::new(false)),
            sampler: None,
            relaxed_sampling: cfg.relaxed_sampling,
        })
    }

    fn probe(&self) -> std::sync::MutexGuard<'_, Probe> {
        sampler::lock(&self.probe)
    }

    /// Events delivered so far.
    pub fn events_seen(&self) -> u64 {
        self.events
    }

    /// Everything lost so far (refreshed by `refresh_loss`).
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// Batches a consumer could not take in time, dropped and counted.
    pub fn count_channel_drop(&mut self, events: u64) {
        self.loss.channel_dropped += events;
    }

    /// The start-up inventory (empty after `discover`), filtered like the events: taken
    /// once, to seed the analysis, and not kept.
    pub fn take_startup_inventory(&mut self) -> Vec<SockRec> {
        std::mem::take(&mut self.inventory)
    }

    pub fn rst_reasons(&self) -> RstReasons {
        self.probe().rst_reasons.clone()
    }

    /// Which hook serves each signal, as the snapshot shows it.
    pub fn hooks(&self) -> Vec<HookView> {
        self.status()
            .iter()
            .map(|s| HookView {
                signal: s.signal.to_string(),
                hook: s.hook.clone(),
                note: s.note.clone(),
            })
            .collect()
    }

    /// How long each start-up phase took.
    pub fn timings(&self) -> Vec<(&'static str, Duration)> {
        self.probe().timings.clone()
    }

    fn wanted_ns(&self, inode: u32) -> bool {
        self.filters.kernel.netns == 0 || self.filters.kernel.netns == inode
    }

    /// Lists every socket of the watched namespaces (learning the owners of those that existed
    /// before start from /proc/*/fd, seeding the timewait machine), reads each namespace's
    /// counters and sysctls, then starts the sampler thread.
    pub fn take_inventory(&mut self) {
        let owners = owners_now(&self.probe);
        let list: Vec<NetnsRef> = netns::list()
            .into_iter()
            .filter(|n| self.wanted_ns(n.inode))
            .collect();
        let mut none = Batch::default();
        for ns in list.clone() {
            if let Some(m) = full_read(&self.probe, ns, &owners, false) {
                self.apply_sampled(m, &mut none);
            }
        }
        let (probe, stop) = (self.probe.clone(), self.stop.clone());
        let tx = self.sampled_tx.take().expect("inventory taken once");
        let filter = self.filters.kernel.netns;
        let relaxed = self.relaxed_sampling;
        self.sampler = Some(
            std::thread::Builder::new()
                .name("sampler".into())
                .spawn(move || sampler::run(probe, list, filter, stop, tx, relaxed))
                .expect("spawning the sampler thread"),
        );
    }

    /// Finds the watched namespaces without reading their sockets (an instant snapshot reads
    /// them once, with `fresh_inventory`).
    pub fn discover(&mut self) {
        let list: Vec<NetnsRef> = netns::list()
            .into_iter()
            .filter(|n| self.wanted_ns(n.inode))
            .collect();
        for ns in list {
            let counters = netns::run_in(&ns, procnet::read_counters)
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            self.namespaces.insert(
                ns.inode,
                NsState {
                    ns,
                    counters_at_start: counters.clone(),
                    counters,
                    sockstat: Sockstat::default(),
                    listeners: HashMap::new(),
                    listen_drops: ListenDropBudget::default(),
                },
            );
        }
    }

    /// A fresh full read of every watched namespace (for a snapshot): every socket with its
    /// owner, and each namespace's counters, sysctls and sockstat.
    pub fn fresh_inventory(&self) -> (Vec<SockRec>, Vec<NsInput>) {
        self.inventory_reader().read()
    }

    /// What a full inventory read needs, to run it on another thread (`serve`, so the rings
    /// keep draining meanwhile).
    pub fn inventory_reader(&self) -> InventoryReader {
        InventoryReader {
            probe: self.probe.clone(),
            namespaces: self
                .namespaces
                .values()
                .map(|n| (n.ns.clone(), n.counters_at_start.clone()))
                .collect(),
            filters: self.filters.clone(),
        }
    }

    /// The end: one last sample of every namespace, on this thread, so drops since the
    /// sampler's last round are reported too; then every event still held back. The rings are
    /// drained after those reads, so every final-ACK overflow a read counted is in the ledger
    /// when its sample is applied.
    pub fn finish(&mut self, out: &mut Batch) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        let start = out.events.len();
        let list: Vec<NetnsRef> = self.namespaces.values().map(|n| n.ns.clone()).collect();
        let reads: Vec<_> = list
            .into_iter()
            .filter_map(|ns| {
                read_namespace(&self.probe, &ns, false)
                    .ok()
                    .map(|r| (ns.inode, r))
            })
            .collect();
        self.drain();
        // Samples the thread queued before it stopped are older than the reads above.
        while let Ok(m) = self.sampled.try_recv() {
            self.apply_sampled(m, out);
        }
        for (inode, r) in reads {
            self.loss.decode_errors += r.bad as u64;
            self.sample(inode, r.socks, r.read_at, r.counters, r.sockstat, out);
        }
        self.release(true, start, out);
    }

    fn apply_sampled(&mut self, m: Sampled, out: &mut Batch) {
        match m {
            Sampled::Inventory {
                ns,
                socks,
                read_at,
                bad,
                counters,
                sockstat,
                late,
                ..
            } => {
                self.loss.decode_errors += bad as u64;
                let mut listeners = HashMap::new();
                for r in &socks {
                    match r.state {
                        TcpState::Listen => {
                            if let Some(o) = r.owner {
                                self.owners
                                    .seed_listener(r.netns, r.local.port(), r.cookie, o);
                                self.probe().seed_listener(r.netns, r.local.port(), &o);
                            }
                            // Its drop counter starts here: overflows before are in it
                            // (in a namespace born since start, every one is news: the
                            // next sample reports them, as drops of a new listener).
                            if !late {
                                self.final_acks.claim(r.skaddr, read_at);
                                listeners.insert(r.skaddr, *r);
                            }
                        }
                        TcpState::TimeWait => self.timewait.seed(
                            r.skaddr,
                            crate::model::timewait::Origin {
                                cookie: r.cookie,
                                netns: r.netns,
                                family: r.family,
                                local: r.local,
                                remote: r.remote,
                                substate: r.substate,
                            },
                            None,
                        ),
                        _ => {
                            if let Some(o) = r.owner {
                                self.owners.seed_socket(r.cookie, o);
                            }
                        }
                    }
                }
                // The timewait machine and the owner book above see everything (events are
                // filtered on output); what seeds the model is filtered like the events are.
                // Only the start's inventory seeds the model (taken once); later ones would
                // pile up here in a long run.
                if !late {
                    let filters = &self.filters;
                    self.inventory
                        .extend(socks.into_iter().filter(|r| filters.accepts_sock(r)));
                }
                // A namespace born since start counted everything while watched: its
                // counters start from zero.
                let counters = if late { Counters::default() } else { counters };
                self.namespaces.insert(
                    ns.inode,
                    NsState {
                        ns,
                        counters_at_start: counters.clone(),
                        counters,
                        sockstat,
                        listeners,
                        listen_drops: ListenDropBudget::default(),
                    },
                );
            }
            Sampled::Gone { inode } => {
                self.namespaces.remove(&inode);
                self.timewait
                    .forget_netns(inode, monotonic_ns(), &mut out.events);
            }
            Sampled::Listeners {
                inode,
                socks,
                read_at,
                bad,
                counters,
                sockstat,
            } => {
                self.final_acks.prune(read_at);
                self.loss.decode_errors += bad as u64;
                self.sample(inode, socks, read_at, counters, sockstat, out)
            }
        }
    }

    /// Turns one namespace sample into overflow events: per-listener drop deltas split by
    /// the namespace's counter deltas.
    fn sample(
        &mut self,
        inode: u32,
        socks: Option<Vec<SockRec>>,
        read_at: u64,
        counters: Option<Counters>,
        sockstat: Option<Sockstat>,
        out: &mut Batch,
    ) {
        let now = monotonic_ns();
        let final_acks = &mut self.final_acks;
        let Some(st) = self.namespaces.get_mut(&inode) else {
            return;
        };
        if let Some(s) = sockstat {
            st.sockstat = s;
        }
        let Some(counters) = counters else { return };
        let d = counters.delta(&st.counters);
        st.counters = counters;
        let has_ld = st.counters.0.contains_key("TcpExt:ListenDrops");
        let Some(recs) = socks else {
            st.listen_drops.skip(d.get("TcpExt:ListenDrops"));
            return;
        };
        let cur: HashMap<u64, SockRec> = recs.into_iter().map(|r| (r.skaddr, r)).collect();
        let mut deltas: Vec<ListenerDelta> = cur
            .values()
            .map(|r| ListenerDelta {
                skaddr: r.skaddr,
                // A listener missing from the previous sample (or the inventory) was created
                // since: every drop it has counted happened in this window.
                // The kernel reuses socket memory at once: the same address with another
                // cookie is another listener.
                drops: st
                    .listeners
                    .get(&r.skaddr)
                    .filter(|p| p.cookie == r.cookie)
                    .map_or(r.drops as u64, |p| r.drops.saturating_sub(p.drops) as u64),
                final_ack_seen: final_acks.claim(r.skaddr, read_at),
                syn_queue: r.syn_queue,
                accept_max: r.accept_max,
            })
            .collect();
        if has_ld {
            st.listen_drops
                .trim(&mut deltas, d.get("TcpExt:ListenDrops"));
        }
        let causes = Causes {
            listen_overflows: d.get("TcpExt:ListenOverflows"),
            reqq_full_drop: d.get("TcpExt:TCPReqQFullDrop"),
            syncookies_sent: d.get("TcpExt:SyncookiesSent"),
        };
        for inf in overflow::infer(&deltas, causes) {
            let Some(l) = cur.get(&inf.listener) else {
                continue;
            };
            let len = match inf.queue {
                Queue::Accept => l.accept_queue,
                Queue::Syn => l.syn_queue,
            };
            let mut ev = Event {
                ts_ns: now,
                cookie: l.cookie,
                skaddr: l.skaddr,
                netns: l.netns,
                family: l.family,
                local: l.local,
                remote: unspecified(l.family),
                owner: None,
                softirq: false,
                kind: EventKind::Overflow {
                    queue: inf.queue,
                    len: Some(len),
                    max: Some(l.accept_max),
                    count: inf.count,
                    source: OverflowSource::Counters,
                    action: inf.action,
                },
            };
            self.owners.resolve(&mut ev);
            if self.filters.kernel_accepts(&ev) && self.filters.accepts(&ev) {
                out.events.push(ev);
            }
        }
        let filters = &self.filters;
        out.listeners.extend(
            cur.values()
                .copied()
                .filter(|l| filters.accepts_sock_tuple(l)),
        );
        st.listeners = cur;
    }

    /// Cuts the reader's current wait short (from another thread).
    pub fn waker(&self) -> crate::ebpf::reader::Waker {
        self.reader.waker()
    }

    pub fn status(&self) -> Vec<crate::ebpf::SignalStatus> {
        self.probe().status.clone()
    }

    /// Waits up to `timeout`, drains the rings and appends to `out`, in time order, every event
    /// old enough to be final. `flush` releases everything (at shutdown).
    pub fn poll(&mut self, timeout: Duration, flush: bool, out: &mut Batch) {
        if !timeout.is_zero() {
            self.reader.wait(timeout);
        }
        let start = out.events.len();
        // The rings are drained after the samples are taken in: every final-ACK overflow that
        // happened before a sample's socket read is then in the ledger when the sample is
        // applied, however recently it happened.
        let samples: Vec<Sampled> = self.sampled.try_iter().collect();
        self.drain();
        for m in samples {
            self.apply_sampled(m, out);
        }
        self.release(flush, start, out);
    }

    /// Everything the rings hold, decoded into the reorder buffer (final-ACK overflows also
    /// into the ledger the samples claim them from).
    fn drain(&mut self) {
        let (reorder, loss, final_acks) = (&mut self.reorder, &mut self.loss, &mut self.final_acks);
        self.reader
            .drain(1 << 16, |ring, bytes| match decode::decode(bytes) {
                Ok(ev) => {
                    if let EventKind::Overflow {
                        source: OverflowSource::Packet,
                        count,
                        ..
                    } = ev.kind
                    {
                        final_acks.record(ev.skaddr, ev.ts_ns, count);
                    }
                    reorder.push(ring, ev)
                }
                Err(_) => loss.decode_errors += 1,
            });
    }

    /// Releases, in time order, every event old enough to be final (all with `flush`) through
    /// owner resolution, the timewait machine and the userspace filters into `out`, whose
    /// events from `start` on are this round's.
    fn release(&mut self, flush: bool, start: usize, out: &mut Batch) {
        let cut = monotonic_ns().saturating_sub(crate::model::reorder::HOLD_NS);
        // In time order: a listener is learned before its children, a closing socket's owner
        // before its timewait socket, a cancel before its follow-up.
        let (owners, endpoints, timewait) =
            (&mut self.owners, &mut self.endpoints, &mut self.timewait);
        self.reorder
            .release_with(if flush { u64::MAX } else { cut }, |mut ev| {
                owners.resolve(&mut ev);
                endpoints.apply(&mut ev);
                timewait.apply(ev, &mut out.events);
            });
        if flush {
            self.timewait.flush(&mut out.events);
        } else {
            self.timewait.resolve_due(cut, &mut out.events);
        }
        if self.filters.userspace() {
            let mut i = 0;
            out.events.retain(|ev| {
                i += 1;
                i <= start || self.filters.accepts(ev)
            });
        }
        self.events += (out.events.len() - start) as u64;
    }

    /// Per-program kernel time per run, when `kernel.bpf_stats_enabled` collected it.
    pub fn cost_line(&self) -> Option<String> {
        let parts: Vec<String> = self
            .probe()
            .program_stats()
            .into_iter()
            .filter(|p| p.run_ns > 0 && p.runs > 0)
            .map(|p| {
                format!(
                    "{} {:.1} ns x {} (skipped {})",
                    p.name,
                    p.run_ns as f64 / p.runs as f64,
                    p.runs,
                    p.recursion_misses
                )
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// The kernel programs' diagnostics since the previous call (read with the loss).
    pub fn take_diagnostics(&mut self) -> Vec<String> {
        std::mem::take(&mut self.diagnostics)
    }

    /// Refreshes the kernel-side loss counters (and takes in the programs' diagnostics);
    /// returns the loss since the previous call.
    pub fn refresh_loss(&mut self) -> Loss {
        let (dropped, by_kind, skipped, (diag, more)) = {
            let mut p = self.probe();
            (
                p.kernel_dropped(),
                p.kernel_dropped_by_kind(),
                p.recursion_misses(),
                p.diagnostics(),
            )
        };
        self.diagnostics.extend(diag);
        if more > 0 {
            self.diagnostics
                .push(format!("{more} more kernel-side diagnostics not kept"));
        }
        self.loss.kernel_dropped = dropped;
        self.loss.kernel_dropped_by_type = crate::model::ByType::from_wire(&by_kind);
        self.loss.kernel_skipped = skipped;
        let prev = self.loss_reported;
        self.loss_reported = self.loss;
        self.loss.minus(&prev)
    }
}

fn unspecified(f: Family) -> std::net::SocketAddr {
    match f {
        Family::Inet => "0.0.0.0:0".parse().expect("literal"),
        Family::Inet6 => "[::]:0".parse().expect("literal"),
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
    }
}
