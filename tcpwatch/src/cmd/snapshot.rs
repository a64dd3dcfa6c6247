//! `tcpwatch snapshot`: one report. Instant (a socket listing, no BPF where sock_diag answers,
//! so no privileges, as `ss`), or after watching events for `--duration`.
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::common::{
    EXIT_OK, POLL, daemon_client, daemon_line, note, probe_config, require_privileges, thresholds,
};
use super::signals;
use crate::cli::SnapshotArgs;
use crate::session::{Options, Session};
use crate::settings::{self, Filters};
use crate::source::caps;

pub fn run(a: SnapshotArgs) -> anyhow::Result<i32> {
    super::common::note_scope(&a.filters);
    if let Some(c) = daemon_client(&a.source)? {
        return through_daemon(&a, c);
    }
    if a.since.is_some() {
        return Err(super::common::since_needs_daemon(&a.source));
    }
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
    let mut snap = session.snapshot(Duration::ZERO);
    snap.stamp_wall(&session.clock());
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

/// The same report, made by the daemon: instant, over `--duration` from now, or over the
/// past `--since` window from its record.
fn through_daemon(a: &SnapshotArgs, mut c: crate::source::daemon::Client) -> anyhow::Result<i32> {
    use crate::model::api::{Body, Op};
    use crate::source::host::wall_ns;
    note!("tcpwatch: {}", daemon_line(&c));
    let filters = settings::api_filters(&a.filters)?;
    let from = if let Some(d) = a.since {
        Some(wall_ns() - d as i64)
    } else if a.duration > 0.0 {
        let stop = signals::install();
        let start = wall_ns();
        note!(
            "tcpwatch: watching for {:.1} s; Ctrl-C to stop early",
            a.duration
        );
        let end = Instant::now() + Duration::from_secs_f64(a.duration);
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(start)
    } else {
        None
    };
    let body = c.request(
        Op::Snapshot {
            from_wall_ns: from,
            to_wall_ns: None,
            filters,
            close_wait_secs: a.close_wait_secs,
        },
        Duration::from_secs(600),
    )?;
    let Body::Snapshot {
        mut snapshot,
        history,
    } = body
    else {
        anyhow::bail!("the daemon answered something else than a snapshot");
    };
    let clock = crate::source::host::wall_clock();
    snapshot.stamp_wall(&clock);
    if let (Some(h), Some(asked)) = (&history, a.since.and(from)) {
        match h.events_from_wall_ns {
            Some(e) if e > asked && h.events_pruned == 0 => note!(
                "tcpwatch: the record starts at {}: nothing was recorded before",
                clock.hms_of_wall(e)
            ),
            Some(e) if e > asked => note!(
                "tcpwatch: the record's full events start at {} (older ones were pruned to stay inside --history-mib); signals and frames reach further",
                clock.hms_of_wall(e)
            ),
            None => note!("tcpwatch: the record holds no events yet"),
            _ => {}
        }
    }
    let out = io::stdout().lock();
    let res = match (&history, a.json) {
        (Some(h), true) => crate::output::snapshot::write_json_with_history(out, &snapshot, h),
        (None, true) => crate::output::snapshot::write_json(out, &snapshot),
        (h, false) => {
            let mut out = out;
            crate::output::snapshot::write_text(&mut out, &snapshot).and_then(|_| match h {
                Some(h) => crate::output::history::write_text(&mut out, h, &clock),
                None => Ok(()),
            })
        }
    };
    match res {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing output: {e}"))
        }
        _ => Ok(EXIT_OK),
    }
}
