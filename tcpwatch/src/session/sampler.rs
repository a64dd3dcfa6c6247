//! The sampler thread and the namespace reads it shares with snapshots: every 250 ms the
//! listeners and counters of each watched namespace (off the ring-draining thread, so a slow
//! read never lets the rings fill), every 2 s a look for new namespaces, and the full reads
//! (every socket with its owner, counters, sysctls) a snapshot needs.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ebpf::{Inventory, Probe, records};
use crate::model::event::Owner;
use crate::model::snapshot::NsInput;
use crate::model::system::{Counters, SockRec, Sockstat};
use crate::settings::Filters;
use crate::source::host::monotonic_ns;
use crate::source::netns::{self, NetnsRef};
use crate::source::{procfd, procnet, sockdiag, sysctl};

/// Listener queues are sampled this often (DESIGN: fast enough to attribute a burst).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Relaxed sampling reads a quiet namespace every this many rounds (once a second).
const SLOW_ROUNDS: u64 = 4;
/// New namespaces are looked for this often.
const NETNS_EVERY: Duration = Duration::from_secs(2);

/// The probe, shared by the reader (loss counters) and the sampler thread (iterator).
pub type SharedProbe = Arc<Mutex<Probe>>;

pub fn lock(p: &SharedProbe) -> std::sync::MutexGuard<'_, Probe> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

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
        /// Found after the session started: the namespace is younger than the session, so
        /// everything its counters and listeners counted happened while it watched.
        late: bool,
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
pub struct NsRead {
    pub socks: Option<Vec<SockRec>>,
    /// When the socket listing began (monotonic ns).
    pub read_at: u64,
    /// Inventory records that did not decode (counted as decode errors).
    pub bad: usize,
    pub counters: Option<Counters>,
    pub sockstat: Option<Sockstat>,
    pub sysctls: BTreeMap<String, String>,
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
pub fn read_namespace(probe: &SharedProbe, ns: &NetnsRef, full: bool) -> std::io::Result<NsRead> {
    netns::run_in(ns, || {
        let read_at = monotonic_ns();
        let (source, one_walk) = {
            let p = lock(probe);
            (p.inventory(), p.sock_diag_one_walk)
        };
        let (socks, bad) = match source {
            Some(Inventory::Iter) => {
                let mut p = lock(probe);
                match p.iterate(!full) {
                    Ok(b) => {
                        let (v, bad) = records::parse(&b);
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

pub fn full_read(
    probe: &SharedProbe,
    ns: NetnsRef,
    owners: &HashMap<u64, Owner>,
    late: bool,
) -> Option<Sampled> {
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
        late,
    })
}

/// Socket inode -> owner: from the `iter/task_file` iterator (one record per socket file,
/// read in the kernel), else from /proc/*/fd (a readlink per descriptor of every process).
pub fn owners_now(probe: &SharedProbe) -> HashMap<u64, Owner> {
    let bytes = probe
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .socket_owners();
    match bytes {
        Some(Ok(b)) => records::parse_owner_records(&b),
        _ => procfd::socket_owners(),
    }
}

/// The sampler thread: every [`SAMPLE_EVERY`] the listeners and counters of each known
/// namespace, every [`NETNS_EVERY`] a look for new namespaces (read in full). Off the reader
/// thread, so a slow read never lets the rings fill.
pub fn run(
    probe: SharedProbe,
    mut known: Vec<NetnsRef>,
    netns_filter: u32,
    stop: Arc<AtomicBool>,
    tx: Sender<Sampled>,
    relaxed: bool,
) {
    let mut last_scan = Instant::now();
    // Relaxed: per namespace, what its drop counters said last time and whether it was
    // quiet (nothing dropped, no listener queue holding anything).
    let mut quiet: HashMap<u32, (u64, bool)> = HashMap::new();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        round += 1;
        // Relaxed, new namespaces are looked for less often (a walk of every process); one
        // found late counts from zero, so nothing it did is missed.
        let scan_every = if relaxed {
            NETNS_EVERY * 2
        } else {
            NETNS_EVERY
        };
        if last_scan.elapsed() >= scan_every {
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
                    if let Some(m) = full_read(&probe, ns, &owners, true)
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
        let all = lock(&probe)
            .all_listeners()
            .and_then(Result::ok)
            .map(|b| records::parse(&b));
        let mut all_bad = all.as_ref().map_or(0, |(_, bad)| *bad);
        let mut by_ns: HashMap<u32, Vec<SockRec>> = HashMap::new();
        let have_all = all.is_some();
        for r in all.map(|(v, _)| v).unwrap_or_default() {
            by_ns.entry(r.netns).or_default().push(r);
        }
        for ns in &known {
            // A quiet namespace is read once a second; the second its counters move or a
            // queue fills, four times again.
            if relaxed
                && !round.is_multiple_of(SLOW_ROUNDS)
                && quiet.get(&ns.inode).is_some_and(|q| q.1)
            {
                continue;
            }
            let read = if have_all {
                let socks = Some(by_ns.remove(&ns.inode).unwrap_or_default());
                // The undecodable records are reported once, with the first namespace read.
                netns::run_in(ns, || {
                    NsRead::around(socks, all_at, std::mem::take(&mut all_bad), false)
                })
            } else {
                read_namespace(&probe, ns, false)
            };
            if relaxed && let Ok(r) = &read {
                let drops = r.counters.as_ref().map_or(0, |c| {
                    [
                        "TcpExt:ListenDrops",
                        "TcpExt:TCPReqQFullDrop",
                        "TcpExt:TCPReqQFullDoCookies",
                    ]
                    .iter()
                    .map(|k| c.get(k))
                    .sum::<u64>()
                });
                let busy = r
                    .socks
                    .as_ref()
                    .is_some_and(|v| v.iter().any(|l| l.accept_queue > 0 || l.syn_queue > 0));
                let was = quiet.get(&ns.inode).map(|q| q.0);
                quiet.insert(ns.inode, (drops, was == Some(drops) && !busy));
            }
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
        quiet.retain(|k, _| !gone.contains(k));
        if let Some(left) = SAMPLE_EVERY.checked_sub(t.elapsed()) {
            std::thread::sleep(left);
        }
    }
}

/// A full read of the watched namespaces: every socket with its owner, counters, sysctls.
pub struct InventoryReader {
    pub(super) probe: SharedProbe,
    pub(super) namespaces: Vec<(NetnsRef, Counters)>,
    pub(super) filters: Filters,
}

impl InventoryReader {
    pub fn read(&self) -> (Vec<SockRec>, Vec<NsInput>) {
        self.read_with(true)
    }

    /// Each namespace's counters when the session started.
    pub fn start_counters(&self) -> impl Iterator<Item = (u32, &Counters)> {
        self.namespaces.iter().map(|(n, c)| (n.inode, c))
    }

    /// The same reader, also reading namespace `inode` when the session has not found it
    /// yet (it looks every 2 s; a client may name one made a moment ago).
    pub fn including(&self, inode: u32) -> InventoryReader {
        let mut r = InventoryReader {
            probe: self.probe.clone(),
            namespaces: self.namespaces.clone(),
            filters: self.filters.clone(),
        };
        if inode != 0
            && !r.namespaces.iter().any(|(n, _)| n.inode == inode)
            && let Some(ns) = netns::list().into_iter().find(|n| n.inode == inode)
        {
            r.namespaces.push((ns, Counters::default()));
        }
        r
    }

    /// The namespaces it reads.
    pub fn namespaces(&self) -> Vec<u32> {
        self.namespaces.iter().map(|(n, _)| n.inode).collect()
    }

    /// A read without the owner walk (the daemon's frames count states only).
    pub fn read_with(&self, owners: bool) -> (Vec<SockRec>, Vec<NsInput>) {
        // The owner walk and the namespace reads are independent: on two threads the read
        // takes the longer of the two instead of their sum.
        let (owners, reads) = std::thread::scope(|sc| {
            let owners = sc.spawn(|| {
                if owners {
                    owners_now(&self.probe)
                } else {
                    HashMap::new()
                }
            });
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
            nss.push(NsInput {
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
