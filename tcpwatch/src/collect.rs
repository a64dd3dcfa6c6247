//! The collection pipeline: kernel records → decode → per-CPU merge → owners → timewait
//! machine → filters, plus the periodic per-namespace sampling (listener queues and drops,
//! kernel counters, sysctls) and the start-up inventory that seeds owners and timewait sockets.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::decode;
use crate::ebpf::reader::RingReader;
use crate::ebpf::{Inventory, Probe, ProbeConfig};
use crate::model::Loss;
use crate::model::event::{Event, EventKind, Family, OverflowSource, Owner, Queue, TcpState};
use crate::model::overflow::{self, Causes, FinalAckLedger, ListenDropBudget, ListenerDelta};
use crate::model::owners::OwnerBook;
use crate::model::reorder::Reorder;
use crate::model::timewait::TwMachine;
use crate::runtime::monotonic_ns;
use crate::settings::Filters;
use crate::source::inventory::{self, SockRec};
use crate::source::netns::{self, NetnsRef};
use crate::source::procnet::{self, Counters, Sockstat};
use crate::source::{procfd, sockdiag, sysctl};

/// Listener queues are sampled this often (DESIGN: fast enough to attribute a burst).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// New namespaces are looked for this often.
const NETNS_EVERY: Duration = Duration::from_secs(2);

/// What tcpwatch knows about one network namespace between samples.
pub struct NsState {
    pub ns: NetnsRef,
    /// Kernel MIB counters at the last sample, and at start.
    pub counters: Counters,
    pub counters_at_start: Counters,
    pub sockstat: Sockstat,
    pub sysctls: BTreeMap<String, String>,
    /// Listeners at the last sample, by socket address.
    pub listeners: HashMap<u64, SockRec>,
    /// What trims the listeners' drop deltas to `ListenDrops`.
    pub listen_drops: ListenDropBudget,
}

/// The probe, shared by the reader (loss counters) and the sampler thread (iterator).
pub type SharedProbe = Arc<Mutex<Probe>>;

/// What the sampler thread read in one namespace.
pub enum Sampled {
    /// A namespace seen for the first time: every socket, counters, sysctls.
    Inventory {
        ns: NetnsRef,
        socks: Vec<SockRec>,
        /// When the socket listing began (monotonic ns).
        read_at: u64,
        /// Records that did not decode.
        bad: usize,
        counters: Counters,
        sockstat: Sockstat,
        sysctls: BTreeMap<String, String>,
    },
    /// A periodic sample: listeners and counters.
    Listeners {
        inode: u32,
        socks: Option<Vec<SockRec>>,
        read_at: u64,
        bad: usize,
        counters: Option<Counters>,
        sockstat: Option<Sockstat>,
    },
    /// The namespace is gone.
    Gone { inode: u32 },
}

/// Sockets, counters, sockstat and sysctls of one namespace, each absent when unreadable.
struct NsRead {
    socks: Option<Vec<SockRec>>,
    /// When the socket listing began (monotonic ns).
    read_at: u64,
    /// Inventory records that did not decode (counted as decode errors).
    bad: usize,
    counters: Option<Counters>,
    sockstat: Option<Sockstat>,
    sysctls: BTreeMap<String, String>,
}

impl NsRead {
    /// A listing of the current namespace completed with its counters, sockstat and, for a
    /// full read, its sysctls (call switched into it).
    fn around(socks: Option<Vec<SockRec>>, read_at: u64, bad: usize, full: bool) -> NsRead {
        NsRead {
            socks,
            read_at,
            bad,
            counters: procnet::read_counters().ok(),
            sockstat: procnet::read_sockstat().ok(),
            sysctls: if full {
                sysctl::read_all()
            } else {
                BTreeMap::new()
            },
        }
    }
}

/// Reads one namespace: its sockets (all, or listeners only), counters, sockstat and, for a
/// full read, its sysctls. Runs on the calling thread, switched into the namespace.
fn read_namespace(probe: &SharedProbe, ns: &NetnsRef, full: bool) -> std::io::Result<NsRead> {
    netns::run_in(ns, || {
        let read_at = monotonic_ns();
        let (source, one_walk) = {
            let p = probe.lock().unwrap_or_else(|e| e.into_inner());
            (p.inventory(), p.sock_diag_one_walk)
        };
        let (socks, bad) = match source {
            Some(Inventory::Iter) => {
                let mut p = probe.lock().unwrap_or_else(|e| e.into_inner());
                match p.iterate(!full) {
                    Ok(b) => {
                        let (v, bad) = inventory::parse(&b);
                        (Some(v), bad)
                    }
                    Err(_) => (None, 0),
                }
            }
            // Not under the probe's lock: the reader needs it for loss counters meanwhile.
            Some(Inventory::SockDiag) => match sockdiag::dump(ns.inode, !full, one_walk) {
                Ok(d) => (Some(d.socks), d.bad),
                Err(_) => (None, 0),
            },
            None => (None, 0),
        };
        NsRead::around(socks, read_at, bad, full)
    })
}

fn full_read(probe: &SharedProbe, ns: NetnsRef, owners: &HashMap<u64, Owner>) -> Option<Sampled> {
    let r = read_namespace(probe, &ns, true).ok()?;
    let mut socks = r.socks.unwrap_or_default();
    for s in &mut socks {
        s.owner = owners.get(&s.ino).copied();
    }
    Some(Sampled::Inventory {
        ns,
        socks,
        read_at: r.read_at,
        bad: r.bad,
        counters: r.counters.unwrap_or_default(),
        sockstat: r.sockstat.unwrap_or_default(),
        sysctls: r.sysctls,
    })
}

/// Socket inode -> owner: from the `iter/task_file` iterator (one record per socket file,
/// read in the kernel), else from /proc/*/fd (a readlink per descriptor of every process).
fn owners_now(probe: &SharedProbe) -> HashMap<u64, Owner> {
    let bytes = probe
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .socket_owners();
    match bytes {
        Some(Ok(b)) => procfd::parse_owner_records(&b),
        _ => procfd::socket_owners(),
    }
}

/// The sampler thread: every [`SAMPLE_EVERY`] the listeners and counters of each known
/// namespace, every [`NETNS_EVERY`] a look for new namespaces (read in full). Off the reader
/// thread, so a slow read never lets the rings fill.
fn sampler(
    probe: SharedProbe,
    mut known: Vec<NetnsRef>,
    netns_filter: u32,
    stop: Arc<AtomicBool>,
    tx: Sender<Sampled>,
) {
    let mut last_scan = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if last_scan.elapsed() >= NETNS_EVERY {
            last_scan = Instant::now();
            let fresh: Vec<NetnsRef> = netns::list()
                .into_iter()
                .filter(|n| {
                    (netns_filter == 0 || n.inode == netns_filter)
                        && !known.iter().any(|k| k.inode == n.inode)
                })
                .collect();
            if !fresh.is_empty() {
                let owners = owners_now(&probe);
                for ns in fresh {
                    known.push(ns.clone());
                    if let Some(m) = full_read(&probe, ns, &owners)
                        && tx.send(m).is_err()
                    {
                        return;
                    }
                }
            }
        }
        let mut gone = Vec::new();
        // Every namespace's listeners in one read where the kernel lists them apart from the
        // socket hash; else each namespace's own listeners-only walk.
        let all_at = monotonic_ns();
        let all = probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all_listeners()
            .and_then(Result::ok)
            .map(|b| inventory::parse(&b));
        let mut all_bad = all.as_ref().map_or(0, |(_, bad)| *bad);
        let mut by_ns: HashMap<u32, Vec<SockRec>> = HashMap::new();
        let have_all = all.is_some();
        for r in all.map(|(v, _)| v).unwrap_or_default() {
            by_ns.entry(r.netns).or_default().push(r);
        }
        for ns in &known {
            let read = if have_all {
                let socks = Some(by_ns.remove(&ns.inode).unwrap_or_default());
                // The undecodable records are reported once, with the first namespace read.
                netns::run_in(ns, || {
                    NsRead::around(socks, all_at, std::mem::take(&mut all_bad), false)
                })
            } else {
                read_namespace(&probe, ns, false)
            };
            let m = match read {
                Ok(r) => Sampled::Listeners {
                    inode: ns.inode,
                    socks: r.socks,
                    read_at: r.read_at,
                    bad: r.bad,
                    counters: r.counters,
                    sockstat: r.sockstat,
                },
                Err(_) => {
                    gone.push(ns.inode);
                    Sampled::Gone { inode: ns.inode }
                }
            };
            if tx.send(m).is_err() {
                return;
            }
        }
        known.retain(|k| !gone.contains(&k.inode));
        if let Some(left) = SAMPLE_EVERY.checked_sub(t.elapsed()) {
            std::thread::sleep(left);
        }
    }
}

/// Events from the kernel, decoded, merged, owner-resolved and filtered; samples from the
/// sampler thread turned into overflow events; the loss figures.
pub struct EventSource {
    probe: SharedProbe,
    reader: RingReader,
    reorder: Reorder,
    pub owners: OwnerBook,
    pub timewait: TwMachine,
    filters: Filters,
    pub loss: Loss,
    pub events: u64,
    pub namespaces: BTreeMap<u32, NsState>,
    /// The start-up inventory of every watched namespace.
    pub inventory: Vec<SockRec>,
    /// Listener records from the samples since the last `take_listener_samples`.
    pub listener_samples: Vec<SockRec>,
    /// Final-ACK overflows reported one by one that no listener sample has claimed yet.
    final_acks: FinalAckLedger,
    sampled: Receiver<Sampled>,
    sampled_tx: Option<Sender<Sampled>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl EventSource {
    pub fn start(cfg: &ProbeConfig, filters: Filters) -> anyhow::Result<EventSource> {
        let mut probe = Probe::start(cfg)?;
        let reader = RingReader::new(probe.take_rings()?);
        let reorder = Reorder::new(reader.len());
        let (tx, rx) = channel();
        Ok(EventSource {
            probe: Arc::new(Mutex::new(probe)),
            reader,
            reorder,
            owners: OwnerBook::new(),
            timewait: TwMachine::new(),
            filters,
            loss: Loss::default(),
            events: 0,
            namespaces: BTreeMap::new(),
            inventory: Vec::new(),
            listener_samples: Vec::new(),
            final_acks: FinalAckLedger::default(),
            sampled: rx,
            sampled_tx: Some(tx),
            stop: Arc::new(AtomicBool::new(false)),
            sampler: None,
        })
    }

    pub fn probe(&self) -> MutexGuard<'_, Probe> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut none = Vec::new();
        for ns in list.clone() {
            if let Some(m) = full_read(&self.probe, ns, &owners) {
                self.apply_sampled(m, &mut none);
            }
        }
        let (probe, stop) = (self.probe.clone(), self.stop.clone());
        let tx = self.sampled_tx.take().expect("inventory taken once");
        let filter = self.filters.kernel.netns;
        self.sampler = Some(
            std::thread::Builder::new()
                .name("sampler".into())
                .spawn(move || sampler(probe, list, filter, stop, tx))
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
                    sysctls: BTreeMap::new(),
                    listeners: HashMap::new(),
                    listen_drops: ListenDropBudget::default(),
                },
            );
        }
    }

    /// A fresh full read of every watched namespace (for a snapshot): every socket with its
    /// owner, and each namespace's counters, sysctls and sockstat.
    pub fn fresh_inventory(&mut self) -> (Vec<SockRec>, Vec<crate::model::snapshot::NsInput>) {
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

    /// One last sample of every namespace, on this thread, so drops since the sampler's
    /// last round are reported too (at shutdown).
    pub fn final_sample(&mut self, out: &mut Vec<Event>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        while let Ok(m) = self.sampled.try_recv() {
            self.apply_sampled(m, out);
        }
        let list: Vec<NetnsRef> = self.namespaces.values().map(|n| n.ns.clone()).collect();
        for ns in list {
            if let Ok(r) = read_namespace(&self.probe, &ns, false) {
                self.loss.decode_errors += r.bad as u64;
                self.sample(ns.inode, r.socks, r.read_at, r.counters, r.sockstat, out);
            }
        }
    }

    fn apply_sampled(&mut self, m: Sampled, out: &mut Vec<Event>) {
        match m {
            Sampled::Inventory {
                ns,
                socks,
                read_at,
                bad,
                counters,
                sockstat,
                sysctls,
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
                            // Its drop counter starts here: overflows before are in it.
                            self.final_acks.claim(r.skaddr, read_at);
                            listeners.insert(r.skaddr, *r);
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
                let filters = &self.filters;
                self.inventory
                    .extend(socks.into_iter().filter(|r| filters.accepts_sock(r)));
                self.namespaces.insert(
                    ns.inode,
                    NsState {
                        ns,
                        counters_at_start: counters.clone(),
                        counters,
                        sockstat,
                        sysctls,
                        listeners,
                        listen_drops: ListenDropBudget::default(),
                    },
                );
            }
            Sampled::Gone { inode } => {
                self.namespaces.remove(&inode);
                self.timewait.forget_netns(inode, monotonic_ns(), out);
            }
            Sampled::Listeners {
                inode,
                socks,
                read_at,
                bad,
                counters,
                sockstat,
            } => {
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
        out: &mut Vec<Event>,
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
                self.events += 1;
                out.push(ev);
            }
        }
        let filters = &self.filters;
        self.listener_samples.extend(
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
    pub fn poll(&mut self, timeout: Duration, flush: bool, out: &mut Vec<Event>) {
        if !timeout.is_zero() {
            self.reader.wait(timeout);
        }
        let start = out.len();
        // The rings are drained after the samples are taken in: every final-ACK overflow that
        // happened before a sample's socket read is then in the ledger when the sample is
        // applied, however recently it happened.
        let samples: Vec<Sampled> = self.sampled.try_iter().collect();
        let cut = monotonic_ns().saturating_sub(crate::model::reorder::HOLD_NS);
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
        for m in samples {
            self.apply_sampled(m, out);
        }
        // In time order: a listener is learned before its children, a closing socket's owner
        // before its timewait socket, a cancel before its follow-up.
        let (owners, timewait) = (&mut self.owners, &mut self.timewait);
        self.reorder
            .release_with(if flush { u64::MAX } else { cut }, |mut ev| {
                owners.resolve(&mut ev);
                timewait.apply(ev, out);
            });
        if flush {
            self.timewait.flush(out);
        } else {
            self.timewait.resolve_due(cut, out);
        }
        if self.filters.userspace() {
            let mut i = 0;
            out.retain(|ev| {
                i += 1;
                i <= start || self.filters.accepts(ev)
            });
        }
        self.events += (out.len() - start) as u64;
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

    /// Refreshes the kernel-side loss counter; returns the loss since the previous call.
    pub fn refresh_loss(&mut self, prev: &mut Loss) -> Loss {
        let (dropped, by_kind, skipped) = {
            let p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
            (
                p.kernel_dropped(),
                p.kernel_dropped_by_kind(),
                p.recursion_misses(),
            )
        };
        self.loss.kernel_dropped = dropped;
        self.loss.kernel_dropped_by_type = crate::model::ByType::from_wire(&by_kind);
        self.loss.kernel_skipped = skipped;
        let delta = Loss {
            kernel_dropped: self.loss.kernel_dropped - prev.kernel_dropped,
            kernel_dropped_by_type: self
                .loss
                .kernel_dropped_by_type
                .minus(&prev.kernel_dropped_by_type),
            kernel_skipped: self.loss.kernel_skipped.saturating_sub(prev.kernel_skipped),
            channel_dropped: self.loss.channel_dropped - prev.channel_dropped,
            decode_errors: self.loss.decode_errors - prev.decode_errors,
        };
        *prev = self.loss;
        delta
    }
}

fn unspecified(f: Family) -> std::net::SocketAddr {
    match f {
        Family::Inet => "0.0.0.0:0".parse().expect("literal"),
        Family::Inet6 => "[::]:0".parse().expect("literal"),
    }
}

impl Drop for EventSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
    }
}

/// A full read of the watched namespaces: every socket with its owner, counters, sysctls.
pub struct InventoryReader {
    probe: SharedProbe,
    namespaces: Vec<(NetnsRef, Counters)>,
    filters: Filters,
}

impl InventoryReader {
    pub fn read(&self) -> (Vec<SockRec>, Vec<crate::model::snapshot::NsInput>) {
        // The owner walk and the namespace reads are independent: on two threads the read
        // takes the longer of the two instead of their sum.
        let (owners, reads) = std::thread::scope(|sc| {
            let owners = sc.spawn(|| owners_now(&self.probe));
            let reads: Vec<_> = self
                .namespaces
                .iter()
                .filter_map(|(ns, start)| {
                    read_namespace(&self.probe, ns, true)
                        .ok()
                        .map(|r| (ns.inode, start, r))
                })
                .collect();
            (owners.join().unwrap_or_default(), reads)
        });
        let mut socks = Vec::new();
        let mut nss = Vec::new();
        for (inode, start, r) in reads {
            let mut s = r.socks.unwrap_or_default();
            for rec in &mut s {
                rec.owner = owners.get(&rec.ino).copied();
            }
            socks.extend(s.into_iter().filter(|rec| self.filters.accepts_sock(rec)));
            nss.push(crate::model::snapshot::NsInput {
                inode,
                counters_now: r.counters.unwrap_or_default(),
                counters_start: start.clone(),
                sysctls: r.sysctls,
                sockstat: r.sockstat.unwrap_or_default(),
                decode_errors: r.bad as u64,
            });
        }
        (socks, nss)
    }
}
