//! `tcpwatch snapshot`: one report. Instant (a socket listing, no BPF where sock_diag answers,
//! so no privileges, as `ss`), or after watching events for `--duration`.
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::common::{EXIT_OK, POLL, note, probe_config, require_privileges, thresholds};
use super::signals;
use crate::cli::SnapshotArgs;
use crate::session::{Options, Session};
use crate::settings::{self, Filters};
use crate::source::caps;

pub fn run(a: SnapshotArgs) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    let watch = a.duration > 0.0;
    let cfg = probe_config(&a.probe, &filters, watch);
    // An instant snapshot over sock_diag needs no BPF, so no privileges, as `ss` does: it
    // then lists what this user can see, and says so.
    if crate::ebpf::needs_bpf(&cfg) {
        require_privileges()?;
    } else if filters.kernel.netns != 0
        && filters.kernel.netns != settings::own_netns()
        && !caps::can_enter_namespaces()
    {
        anyhow::bail!(
            "reading another network namespace needs root or CAP_SYS_ADMIN; run it with sudo"
        );
    }
    let stop = signals::install();
    let mut session = Session::start(Options {
        probe: cfg,
        filters,
        thresholds: thresholds(a.close_wait_secs),
        sockets_filtered: a.filters.narrows_sockets(),
        watch,
        aggregate: true,
        retention_ns: None,
    })?;
    for s in session.collector().status() {
        if s.signal == "privileges" {
            note!("tcpwatch: {}", s.note.as_deref().unwrap_or("limited"));
        }
    }
    if watch {
        note!(
            "tcpwatch: watching for {:.1} s; Ctrl-C to stop early",
            a.duration
        );
        let end = Instant::now() + Duration::from_secs_f64(a.duration);
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            session.step(POLL);
        }
        session.finish();
        session.refresh_loss();
        for d in session.take_diagnostics() {
            note!("tcpwatch: {d}");
        }
        // As `trace` and `serve` end: the report has the loss too, this line is for whoever
        // only watches stderr (scripts, the benchmark).
        let loss = session.loss();
        note!(
            "tcpwatch: {} events, {} lost",
            session.events_seen(),
            loss.total()
        );
        if loss.total() > 0 {
            note!("tcpwatch: lost: {}", loss.breakdown());
        }
    }
    let snap = session.snapshot(Duration::ZERO);
    let out = io::stdout().lock();
    let res = if a.json {
        crate::output::snapshot::write_json(out, &snap)
    } else {
        crate::output::snapshot::write_text(out, &snap)
    };
    match res {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing output: {e}"))
        }
        _ => Ok(EXIT_OK),
    }
}
