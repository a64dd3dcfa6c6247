//! The collection pipeline: kernel records → decode → per-CPU merge → owners → timewait
//! machine → filters, plus the periodic per-namespace sampling (listener queues and drops,
//! kernel counters, sysctls) and the start-up inventory that seeds owners and timewait sockets.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::decode;
use crate::ebpf::reader::RingReader;
use crate::ebpf::{Probe, ProbeConfig};
use crate::model::Loss;
use crate::model::event::{Event, EventKind, Family, OverflowSource, Owner, TcpState};
use crate::model::overflow::{self, Causes, ListenerDelta};
use crate::model::owners::OwnerBook;
use crate::model::reorder::Reorder;
use crate::model::timewait::TwMachine;
use crate::runtime::monotonic_ns;
use crate::settings::Filters;
use crate::source::inventory::{self, SockRec};
use crate::source::netns::{self, NetnsRef};
use crate::source::procnet::{self, Counters, Sockstat};
use crate::source::{procfd, sysctl};

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
}

/// Events from the kernel, decoded, owner-resolved and filtered, plus the loss figures.
pub struct EventSource {
    pub probe: Probe,
    reader: RingReader,
    reorder: Reorder,
    released: Vec<Event>,
    pub owners: OwnerBook,
    pub timewait: TwMachine,
    filters: Filters,
    pub loss: Loss,
    pub events: u64,
    pub namespaces: BTreeMap<u32, NsState>,
    /// The start-up inventory of every watched namespace.
    pub inventory: Vec<SockRec>,
    last_sample: Instant,
    last_netns_scan: Instant,
}

impl EventSource {
    pub fn start(cfg: &ProbeConfig, filters: Filters) -> anyhow::Result<EventSource> {
        let mut probe = Probe::start(cfg)?;
        let reader = RingReader::new(probe.take_rings()?);
        let reorder = Reorder::new(reader.len());
        Ok(EventSource {
            probe,
            reader,
            reorder,
            released: Vec::with_capacity(4096),
            owners: OwnerBook::new(),
            timewait: TwMachine::new(),
            filters,
            loss: Loss::default(),
            events: 0,
            namespaces: BTreeMap::new(),
            inventory: Vec::new(),
            last_sample: Instant::now(),
            last_netns_scan: Instant::now(),
        })
    }

    fn wanted_ns(&self, inode: u32) -> bool {
        self.filters.kernel.netns == 0 || self.filters.kernel.netns == inode
    }

    /// Lists every socket of the watched namespaces, learns the owners of those that existed
    /// before start (from /proc/*/fd), seeds the timewait machine, and reads each namespace's
    /// counters and sysctls.
    pub fn take_inventory(&mut self) {
        let owners = procfd::socket_owners();
        let list: Vec<NetnsRef> = netns::list()
            .into_iter()
            .filter(|n| self.wanted_ns(n.inode))
            .collect();
        for ns in list {
            self.add_namespace(ns, &owners);
        }
        self.last_netns_scan = Instant::now();
    }

    fn add_namespace(&mut self, ns: NetnsRef, owners: &HashMap<u64, Owner>) {
        let has_iter = self.probe.has_inventory();
        let probe = &mut self.probe;
        let res = netns::run_in(&ns, || {
            let socks = if has_iter {
                probe.iterate(false).ok()
            } else {
                None
            };
            (
                socks,
                procnet::read_counters().unwrap_or_default(),
                procnet::read_sockstat().unwrap_or_default(),
                sysctl::read_all(),
            )
        });
        let Ok((socks, counters, sockstat, sysctls)) = res else {
            return;
        };
        let mut listeners = HashMap::new();
        if let Some(bytes) = socks {
            let (mut recs, _bad) = inventory::parse(&bytes);
            for r in &mut recs {
                r.owner = owners.get(&r.ino).copied();
                match r.state {
                    TcpState::Listen => {
                        if let Some(o) = r.owner {
                            self.owners.seed_listener(r.netns, r.local.port(), o);
                            self.probe.seed_listener(r.netns, r.local.port(), &o);
                        }
                        listeners.insert(r.skaddr, *r);
                    }
                    TcpState::TimeWait => self.timewait.seed(r.skaddr, None),
                    _ => {
                        if let Some(o) = r.owner {
                            self.owners.seed_socket(r.cookie, o);
                        }
                    }
                }
            }
            self.inventory.extend(recs);
        }
        self.namespaces.insert(
            ns.inode,
            NsState {
                ns,
                counters_at_start: counters.clone(),
                counters,
                sockstat,
                sysctls,
                listeners,
            },
        );
    }

    /// Samples every namespace's listeners and counters; turns listener drops into overflow
    /// events (appended to `out`). Runs at most every [`SAMPLE_EVERY`].
    pub fn sample(&mut self, out: &mut Vec<Event>) {
        if self.last_sample.elapsed() < SAMPLE_EVERY {
            return;
        }
        self.last_sample = Instant::now();
        if self.last_netns_scan.elapsed() >= NETNS_EVERY {
            self.last_netns_scan = Instant::now();
            let fresh: Vec<NetnsRef> = netns::list()
                .into_iter()
                .filter(|n| self.wanted_ns(n.inode) && !self.namespaces.contains_key(&n.inode))
                .collect();
            if !fresh.is_empty() {
                let owners = procfd::socket_owners();
                for ns in fresh {
                    self.add_namespace(ns, &owners);
                }
            }
        }
        let has_iter = self.probe.has_inventory();
        let now = monotonic_ns();
        let inodes: Vec<u32> = self.namespaces.keys().copied().collect();
        for inode in inodes {
            let ns = self.namespaces[&inode].ns.clone();
            let probe = &mut self.probe;
            let Ok((socks, counters, sockstat)) = netns::run_in(&ns, || {
                let socks = if has_iter {
                    probe.iterate(true).ok()
                } else {
                    None
                };
                (
                    socks,
                    procnet::read_counters().ok(),
                    procnet::read_sockstat().ok(),
                )
            }) else {
                // The namespace is gone.
                self.namespaces.remove(&inode);
                continue;
            };
            let st = self.namespaces.get_mut(&inode).expect("present");
            if let Some(s) = sockstat {
                st.sockstat = s;
            }
            let Some(counters) = counters else { continue };
            let d = counters.delta(&st.counters);
            st.counters = counters;
            let Some(bytes) = socks else { continue };
            let (recs, _) = inventory::parse(&bytes);
            let cur: HashMap<u64, SockRec> = recs.into_iter().map(|r| (r.skaddr, r)).collect();
            let deltas: Vec<ListenerDelta> = cur
                .values()
                .map(|r| ListenerDelta {
                    skaddr: r.skaddr,
                    drops: st
                        .listeners
                        .get(&r.skaddr)
                        .map_or(0, |p| r.drops.saturating_sub(p.drops) as u64),
                    syn_queue: r.syn_queue,
                    accept_max: r.accept_max,
                })
                .collect();
            let causes = Causes {
                listen_overflows: d.get("TcpExt:ListenOverflows"),
                reqq_full_drop: d.get("TcpExt:TCPReqQFullDrop"),
                syncookies_sent: d.get("TcpExt:SyncookiesSent"),
            };
            for inf in overflow::infer(&deltas, causes) {
                let Some(l) = cur.get(&inf.listener) else {
                    continue;
                };
                let (len, max) = match inf.queue {
                    crate::model::event::Queue::Accept => (l.accept_queue, l.accept_max),
                    crate::model::event::Queue::Syn => (l.syn_queue, l.accept_max),
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
                        max: Some(max),
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
            st.listeners = cur;
        }
    }

    pub fn status(&self) -> &[crate::ebpf::SignalStatus] {
        &self.probe.status
    }

    /// Waits up to `timeout`, drains the rings and appends to `out`, in time order, every event
    /// old enough to be final. `flush` releases everything (at shutdown).
    pub fn poll(&mut self, timeout: Duration, flush: bool, out: &mut Vec<Event>) {
        if !timeout.is_zero() {
            self.reader.wait(timeout);
        }
        let cut = monotonic_ns().saturating_sub(crate::model::reorder::HOLD_NS);
        let (reorder, loss) = (&mut self.reorder, &mut self.loss);
        self.reader
            .drain(1 << 16, |ring, bytes| match decode::decode(bytes) {
                Ok(ev) => reorder.push(ring, ev),
                Err(_) => loss.decode_errors += 1,
            });
        self.released.clear();
        if flush {
            self.reorder.release_all(&mut self.released);
        } else {
            self.reorder.release(cut, &mut self.released);
        }
        let start = out.len();
        // In time order: a listener is learned before its children, a closing socket's owner
        // before its timewait socket, a cancel before its follow-up.
        for ev in self.released.iter_mut() {
            self.owners.resolve(ev);
            self.timewait.apply(*ev, out);
        }
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
            .probe
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
        self.loss.kernel_dropped = self.probe.kernel_dropped();
        self.loss.kernel_dropped_by_type =
            crate::model::ByType::from_wire(&self.probe.kernel_dropped_by_kind());
        self.loss.kernel_skipped = self.probe.recursion_misses();
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
