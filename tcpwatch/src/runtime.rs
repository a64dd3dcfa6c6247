//! Wiring: privileges, probe start-up, the reader loop, output threads, signals and exit codes.
use std::io::{self, BufWriter};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use clap::Parser as _;

use crate::cli::{
    CheckArgs, Cli, Command, DoctorArgs, ServeArgs, SnapshotArgs, TopArgs, TraceArgs,
};
use crate::collect::EventSource;
use crate::ebpf::{Probe, caps};
use crate::model::Loss;
use crate::model::aggregate::{Aggregator, Config as AggConfig, ListenerSample, TwEntry};
use crate::model::event::TcpState;
use crate::model::event::{Event, EventKind};
use crate::model::snapshot::{HookView, Input as SnapInput, Thresholds};
use crate::output::Clock;
use crate::output::trace::TraceWriter;
use crate::settings::{self, Filters};
use crate::source::inventory::SockRec;

/// `eprintln!` that cannot panic: with stderr closed (`2>&-`, a reader that went away) the
/// line is lost, not the run.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Exit codes (DESIGN §4).
pub const EXIT_OK: i32 = 0;
pub const EXIT_ASSERTION: i32 = 1;
pub const EXIT_ERROR: i32 = 2;

pub fn main_entry() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            note!("tcpwatch: {e:#}");
            EXIT_ERROR
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Trace(a) => trace(a),
        Command::Snapshot(a) => snapshot(a),
        Command::Top(a) => top(a),
        Command::Doctor(a) => doctor(a),
        Command::Check(a) => check(a),
        Command::Serve(a) => serve(a),
    }
}

fn require_privileges() -> anyhow::Result<()> {
    if let Some(msg) = caps::effective().and_then(caps::missing_for_tracing) {
        anyhow::bail!("{msg}");
    }
    Ok(())
}

fn doctor(a: DoctorArgs) -> anyhow::Result<i32> {
    require_privileges()?;
    let filters = Filters::default();
    let probe = Probe::start(&settings::probe_config(&a.probe, &filters))?;
    println!("kernel: {}", kernel_release());
    for s in &probe.status {
        println!("{}", s.line());
    }
    // An instant snapshot loads no BPF when sock_diag answers: say whether it will.
    println!(
        "instant snapshot: {}",
        match crate::source::sockdiag::available() {
            Ok(()) => "sock_diag, owners from /proc/*/fd (no BPF loaded)".to_string(),
            Err(e) => format!("the BPF inventory above (sock_diag: {e})"),
        }
    );
    let t: Vec<String> = probe
        .timings
        .iter()
        .map(|(w, d)| format!("{w} {:.0} ms", d.as_secs_f64() * 1e3))
        .collect();
    println!("start-up: {}", t.join(", "));
    Ok(EXIT_OK)
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// SIGINT/SIGTERM set this; every loop checks it.
fn install_stop_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: plain sigset manipulation; the mask is set before any other thread exists so all
    // threads inherit it and only the waiter below receives the signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let s = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
                s.store(true, Ordering::SeqCst);
            })
            .expect("spawning the signal thread");
    }
    stop
}

pub fn clock() -> Clock {
    let now = |id| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid clock ids and a valid out pointer.
        unsafe { libc::clock_gettime(id, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    let offset_ns = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    // SAFETY: localtime_r with valid pointers.
    let utc_offset_s = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm.tm_gmtoff
    };
    Clock {
        offset_ns,
        utc_offset_s,
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

enum Msg {
    Events(Vec<Event>),
    Loss {
        ts_ns: u64,
        delta: Loss,
        total: Loss,
    },
}

/// Batches (one per 20 ms poll) between the ring reader and the writer.
const TRACE_QUEUE_BATCHES: usize = 8;

fn trace(a: TraceArgs) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    require_privileges()?;
    let stop = install_stop_signals();
    let mut src = EventSource::start(&settings::probe_config(&a.probe, &filters), filters)?;
    for s in src.status() {
        note!("tcpwatch: {}", s.line());
    }
    src.take_inventory();
    note!("tcpwatch: tracing; Ctrl-C to stop");

    // A stalled stdout must back up into the kernel ring, where every lost record is counted,
    // not into this process's memory: a few polls' worth of events wait here, no more.
    let (tx, rx) = sync_channel::<Msg>(TRACE_QUEUE_BATCHES);
    let json = a.json;
    let wstop = stop.clone();
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || write_trace(rx, json, &wstop))
        .expect("spawning the writer thread");

    let mut prev = Loss::default();
    let mut last_loss_check = Instant::now();
    let mut batch = Vec::with_capacity(4096);
    let poll = Duration::from_millis(20);
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        src.poll(
            if stopping { Duration::ZERO } else { poll },
            stopping,
            &mut batch,
        );
        if stopping {
            src.final_sample(&mut batch);
        }
        if !batch.is_empty()
            && !send(
                &tx,
                Msg::Events(std::mem::replace(&mut batch, Vec::with_capacity(4096))),
                &stop,
            )
        {
            break;
        }
        if stopping || last_loss_check.elapsed() >= Duration::from_secs(1) {
            last_loss_check = Instant::now();
            let delta = src.refresh_loss(&mut prev);
            if delta.total() > 0 {
                note!(
                    "tcpwatch: lost {} events ({}); {} so far",
                    delta.total(),
                    delta.breakdown(),
                    src.loss.total()
                );
                if !send(
                    &tx,
                    Msg::Loss {
                        ts_ns: monotonic_ns(),
                        delta,
                        total: src.loss,
                    },
                    &stop,
                ) {
                    break;
                }
            }
        }
        if stopping {
            break;
        }
    }
    drop(tx);
    // A writer blocked on a stdout nobody reads would hold the exit for ever: give it a
    // moment to flush, then leave without it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !writer.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let res = if writer.is_finished() {
        writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")))
    } else {
        note!("tcpwatch: stdout is not being read; exiting without the queued output");
        Ok(())
    };
    note!("tcpwatch: {} events, {} lost", src.events, src.loss.total());
    if let Some(line) = src.cost_line() {
        note!("tcpwatch: kernel cost: {line}");
    }
    res.map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(EXIT_OK)
}

/// Queues `m` for the writer, waiting while the queue is full (the kernel ring absorbs and
/// counts meanwhile); false once the writer is gone, or when a stop is asked for and the
/// queue is still full, so Ctrl-C works with a stalled stdout.
fn send(tx: &SyncSender<Msg>, mut m: Msg, stop: &AtomicBool) -> bool {
    let mut give_up: Option<Instant> = None;
    loop {
        match tx.try_send(m) {
            Ok(()) => return true,
            Err(std::sync::mpsc::TrySendError::Full(back)) => {
                if stop.load(Ordering::SeqCst) {
                    let at =
                        *give_up.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                    if Instant::now() >= at {
                        return false;
                    }
                }
                m = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Formats off the reader thread. A closed stdout is a normal way to stop (`| head`).
fn write_trace(rx: Receiver<Msg>, json: bool, stop: &AtomicBool) -> io::Result<()> {
    let out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut w = TraceWriter::new(out, json, clock(), settings::own_netns());
    let res = (|| {
        for m in rx {
            match m {
                Msg::Events(v) => {
                    for e in &v {
                        w.event(e)?;
                    }
                }
                Msg::Loss {
                    ts_ns,
                    delta,
                    total,
                } => w.loss(ts_ns, &delta, &total)?,
            }
            w.flush()?;
        }
        w.flush()
    })();
    match res {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            stop.store(true, Ordering::SeqCst);
            Ok(())
        }
        other => other,
    }
}

/// Feeds the aggregator with the inventory's timewait sockets (their age is unknown).
pub fn seed_aggregator(agg: &mut Aggregator, inv: &[SockRec]) {
    for r in inv.iter().filter(|r| r.state == TcpState::TimeWait) {
        agg.seed_timewait(
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

pub fn hook_views(src: &EventSource) -> Vec<HookView> {
    src.status()
        .iter()
        .map(|s| HookView {
            signal: s.signal.to_string(),
            hook: s.hook.clone(),
            note: s.note.clone(),
        })
        .collect()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn snapshot(a: SnapshotArgs) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    let mut cfg = settings::probe_config(&a.probe, &filters);
    cfg.trace = a.duration > 0.0;
    // An instant snapshot over sock_diag needs no BPF, so no privileges, as `ss` does: it
    // then lists what this user can see, and says so.
    if crate::ebpf::needs_bpf(&cfg) {
        require_privileges()?;
    } else if filters.kernel.netns != 0
        && filters.kernel.netns != settings::own_netns()
        && !crate::ebpf::caps::can_enter_namespaces()
    {
        anyhow::bail!(
            "reading another network namespace needs root or CAP_SYS_ADMIN; run it with sudo"
        );
    }
    let stop = install_stop_signals();
    let mut src = EventSource::start(&cfg, filters)?;
    for s in src.status() {
        if s.signal == "privileges" {
            note!("tcpwatch: {}", s.note.as_deref().unwrap_or("limited"));
        }
    }
    if a.duration > 0.0 {
        src.take_inventory();
    } else {
        src.discover();
    }
    let mut agg = Aggregator::new(AggConfig::default());
    seed_aggregator(&mut agg, &src.inventory);
    let t0 = monotonic_ns();
    if a.duration > 0.0 {
        note!(
            "tcpwatch: watching for {:.1} s; Ctrl-C to stop early",
            a.duration
        );
        let end = Instant::now() + Duration::from_secs_f64(a.duration);
        let mut batch = Vec::with_capacity(4096);
        loop {
            let stopping = stop.load(Ordering::SeqCst) || Instant::now() >= end;
            src.poll(
                if stopping {
                    Duration::ZERO
                } else {
                    Duration::from_millis(20)
                },
                stopping,
                &mut batch,
            );
            if stopping {
                src.final_sample(&mut batch);
            }
            feed(&mut agg, &mut src, &mut batch);
            if stopping {
                break;
            }
        }
        let mut prev = Loss::default();
        src.refresh_loss(&mut prev);
        // As `trace` and `serve` end: the report has the loss too, this line is for whoever
        // only watches stderr (scripts, the benchmark).
        note!("tcpwatch: {} events, {} lost", src.events, src.loss.total());
        if src.loss.total() > 0 {
            note!("tcpwatch: lost: {}", src.loss.breakdown());
        }
    }
    let now = monotonic_ns();
    let (inventory, namespaces) = src.fresh_inventory();
    let input = SnapInput {
        now_ns: now,
        window_ns: if a.duration > 0.0 { now - t0 } else { 0 },
        host: hostname(),
        kernel: kernel_release(),
        hooks: hook_views(&src),
        inventory: Some(&inventory),
        namespaces,
        loss: src.loss,
        home_netns: settings::own_netns(),
        thresholds: Thresholds {
            close_wait_secs: a.close_wait_secs,
            ..Thresholds::default()
        },
        sockets_filtered: a.filters.narrows_sockets(),
    };
    let snap = crate::model::snapshot::build(&agg, &input);
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

/// Opens a report file before the command runs, so a bad path fails early (`-` is stdout).
fn report_file(p: &Option<std::path::PathBuf>) -> anyhow::Result<Option<Box<dyn io::Write>>> {
    use anyhow::Context as _;
    Ok(match p {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(io::stdout())),
        Some(p) => Some(Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
        ))),
    })
}

fn check(a: CheckArgs) -> anyhow::Result<i32> {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

    use anyhow::Context as _;

    use crate::model::check::{Checker, CommandExit, Limits, Report, Verdict};
    use crate::source::scope::RunScope;

    let filters = Filters::from_args(&a.filters)?;
    let limits = Limits {
        retransmits: a.max_retransmits.clone(),
        no_listen_overflow: a.no_listen_overflow,
        max_resets: a.max_resets,
        max_time_wait: a.max_time_wait,
        close_wait_leak_ns: a.close_wait_leak.map(|s| (s * 1e9) as u64),
        max_syn_sent_ns: a.max_syn_sent_ms.map(|ms| ms * 1_000_000),
    };
    require_privileges()?;
    let mut json_out = report_file(&a.json)?;
    let mut junit_out = report_file(&a.junit)?;
    let stop = install_stop_signals();
    let mut src = EventSource::start(&settings::probe_config(&a.probe, &filters), filters)?;
    let mut warnings: Vec<String> = src
        .status()
        .iter()
        .filter(|s| s.hook.is_none())
        .map(|s| {
            format!(
                "{} unavailable on this kernel: {}",
                s.signal,
                s.note.as_deref().unwrap_or("no hook")
            )
        })
        .collect();
    src.take_inventory();
    let mut scope = if a.any_process {
        RunScope::any()
    } else {
        RunScope::for_command()
    };
    let join = scope.join_path();
    let mut cmd = std::process::Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    // SAFETY: only async-signal-safe calls between fork and exec: sigprocmask, open, write, close.
    unsafe {
        cmd.pre_exec(move || {
            // tcpwatch blocks these for its signal thread; the command must get them.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if let Some(p) = &join {
                // A failure here shows in RunScope::adopt, which falls back to the pid tree.
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    note!("tcpwatch: watching; running {}", a.cmd.join(" "));
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let t_start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", a.cmd[0]))?;
    scope.adopt(child.id());
    warnings.extend(
        scope
            .warning
            .iter()
            .map(|w| format!("{w}: judging by process tree instead")),
    );

    let mut checker = Checker::new();
    let mut agg = Aggregator::new(AggConfig::default());
    let grace = Duration::from_secs_f64(a.grace);
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    let mut terminated: Option<Instant> = None;
    let mut batch = Vec::with_capacity(4096);
    let mut our_listeners = std::collections::HashSet::new();
    let t0 = monotonic_ns();
    loop {
        if exited.is_none()
            && let Some(st) = child.try_wait().context("waiting for the command")?
        {
            exited = Some((st, Instant::now()));
        }
        let signalled = stop.load(Ordering::SeqCst);
        if signalled && exited.is_none() {
            // Pass SIGTERM on (a terminal's Ctrl-C already reached the whole process group).
            let sig = match terminated {
                None => {
                    terminated = Some(Instant::now());
                    Some(libc::SIGTERM)
                }
                Some(t) if t.elapsed() > Duration::from_secs(10) => Some(libc::SIGKILL),
                _ => None,
            };
            if let Some(sig) = sig {
                // SAFETY: signalling our own child, which has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, sig) };
                // And the rest of its tree, which the cgroup knows.
                scope.signal_all(sig);
            }
        }
        let done = exited.is_some_and(|(_, t)| signalled || t.elapsed() >= grace);
        src.poll(
            if done {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            },
            done,
            &mut batch,
        );
        if done {
            src.final_sample(&mut batch);
        }
        for e in batch.drain(..) {
            // Counter-based overflows may be resolved before the listener's LISTEN event
            // left the reorder hold: the listener, once known, vouches for them.
            let ours = matches!(e.kind, EventKind::Overflow { .. })
                && our_listeners.contains(&(e.netns, e.local));
            if ours || scope.owner_in(&e.owner) {
                if matches!(
                    e.kind,
                    EventKind::State {
                        new: TcpState::Listen,
                        ..
                    } | EventKind::Overflow { .. }
                ) {
                    our_listeners.insert((e.netns, e.local));
                }
                checker.apply(&e);
                agg.apply(&e);
            }
        }
        let now = monotonic_ns();
        for l in std::mem::take(&mut src.listener_samples) {
            // Samples carry no owner for listeners made after start: the LISTEN event did.
            if our_listeners.contains(&(l.netns, l.local)) || scope.owner_in(&l.owner) {
                agg.observe_listener(&listener_sample(&l), now);
            }
        }
        agg.tick(now);
        if done {
            break;
        }
    }
    let mut prev = Loss::default();
    src.refresh_loss(&mut prev);
    let now = monotonic_ns();
    let (status, _) = exited.expect("the loop ends after the command exits");
    let left_running = scope.remaining();
    let (_, namespaces) = src.fresh_inventory();
    let snap = crate::model::snapshot::build(
        &agg,
        &SnapInput {
            now_ns: now,
            window_ns: now - t0,
            host: hostname(),
            kernel: kernel_release(),
            hooks: hook_views(&src),
            inventory: None,
            namespaces,
            loss: src.loss,
            home_netns: settings::own_netns(),
            thresholds: Thresholds {
                close_wait_secs: a.close_wait_leak.map_or(10, |s| s.ceil() as u64),
                ..Thresholds::default()
            },
            sockets_filtered: !a.any_process || a.filters.narrows_sockets(),
        },
    );
    let (observed, assertions) = checker.finish(&limits, now);
    let verdict = Verdict::decide(&assertions, &src.loss, a.allow_loss, status.success());
    let report = Report {
        version: 1,
        verdict,
        exit_code: verdict.exit_code(),
        command: a.cmd.clone(),
        command_exit: CommandExit {
            code: status.code(),
            signal: status.signal(),
            success: status.success(),
        },
        started_unix_s,
        duration_s: t_start.elapsed().as_secs_f64(),
        grace_s: a.grace,
        scope: scope.describe(),
        host: snap.host.clone(),
        kernel: snap.kernel.clone(),
        hooks: snap.hooks.clone(),
        assertions,
        observed,
        findings: snap.findings.clone(),
        loss: snap.loss.clone(),
        allow_loss: a.allow_loss,
        left_running,
        warnings,
    };
    drop(scope);
    // The report files first: a closed stderr must not cost them.
    if let Some(w) = json_out.as_mut() {
        crate::output::check::write_json(&mut *w, &report)
            .and_then(|_| w.flush())
            .context("writing the JSON report")?;
    }
    if let Some(w) = junit_out.as_mut() {
        crate::output::check::write_junit(&mut *w, &report)
            .and_then(|_| w.flush())
            .context("writing the JUnit report")?;
    }
    let _ = crate::output::check::write_text(io::stderr().lock(), &report);
    Ok(report.exit_code)
}

/// What the reader thread of `serve` sends up.
enum Up {
    Batch(Vec<Event>, Vec<SockRec>),
    /// Answer to a state request: what a snapshot needs from the source.
    State {
        inventory: crate::collect::InventoryReader,
        hooks: Vec<HookView>,
        loss: Loss,
        events: u64,
    },
    /// A scrape waiting for the exposition.
    Want(SyncSender<String>),
}

/// Events queued between `serve`'s reader and main thread at most (about 130 MB).
const SERVE_QUEUE_EVENTS: usize = 1 << 20;

/// `serve`: a reader thread drains the rings and never waits for anything else; the main
/// thread keeps the aggregator and, when scraped, reads the inventory, builds the snapshot
/// and renders it (at most once a second, cached), so a scrape never stalls event reading.
/// Batches the main thread cannot take in time are dropped and counted, never silent.
fn serve(a: ServeArgs) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    require_privileges()?;
    // Signals first: tiny_http starts threads, which must inherit the blocked mask.
    let stop = install_stop_signals();
    let server = Arc::new(
        tiny_http::Server::http(a.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?,
    );
    let mut src = EventSource::start(&settings::probe_config(&a.probe, &filters), filters)?;
    for s in src.status() {
        note!("tcpwatch: {}", s.line());
    }
    src.take_inventory();
    let mut agg = Aggregator::new(AggConfig::default());
    seed_aggregator(&mut agg, &src.inventory);
    // Bounded by events queued (SERVE_QUEUE_EVENTS), not by batches; beyond that batches are
    // dropped and counted.
    let (up_tx, up_rx) = sync_channel::<Up>(4096);
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http = {
        let server = server.clone();
        let want_tx = up_tx.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || http_loop(&server, &want_tx))
            .expect("spawning the HTTP thread")
    };
    let (state_tx, state_rx) = sync_channel::<()>(4);
    let waker = src.waker();
    let rstop = stop.clone();
    let rqueued = queued.clone();
    let reader = std::thread::Builder::new()
        .name("reader".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(4096);
            let mut prev_loss = Loss::default();
            let mut last_loss = Instant::now();
            while !rstop.load(Ordering::SeqCst) {
                src.poll(Duration::from_millis(20), false, &mut batch);
                let samples = std::mem::take(&mut src.listener_samples);
                if !batch.is_empty() || !samples.is_empty() {
                    let b = std::mem::replace(&mut batch, Vec::with_capacity(4096));
                    let n = b.len();
                    if rqueued.load(Ordering::Relaxed) + n > SERVE_QUEUE_EVENTS {
                        src.loss.channel_dropped += n as u64;
                    } else {
                        rqueued.fetch_add(n, Ordering::Relaxed);
                        match up_tx.try_send(Up::Batch(b, samples)) {
                            Ok(()) => {}
                            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                                rqueued.fetch_sub(n, Ordering::Relaxed);
                                src.loss.channel_dropped += n as u64;
                            }
                            Err(_) => break,
                        }
                    }
                }
                if last_loss.elapsed() >= Duration::from_secs(1) {
                    last_loss = Instant::now();
                    let d = src.refresh_loss(&mut prev_loss);
                    if d.total() > 0 {
                        note!(
                            "tcpwatch: lost {} events; {} so far",
                            d.total(),
                            src.loss.total()
                        );
                    }
                }
                if state_rx.try_recv().is_ok() {
                    src.refresh_loss(&mut prev_loss);
                    let st = Up::State {
                        inventory: src.inventory_reader(),
                        hooks: hook_views(&src),
                        loss: src.loss,
                        events: src.events,
                    };
                    if up_tx.send(st).is_err() {
                        break;
                    }
                }
            }
            note!("tcpwatch: {} events, {} lost", src.events, src.loss.total());
        })
        .expect("spawning the reader thread");
    note!(
        "tcpwatch: serving http://{}/metrics; Ctrl-C to stop",
        a.listen
    );
    let t0 = monotonic_ns();
    let home = settings::own_netns();
    let (host, kernel) = (hostname(), kernel_release());
    let mut cache: Option<(Instant, String)> = None;
    let mut build_seconds = 0.0;
    let apply = |agg: &mut Aggregator, evs: Vec<Event>, samples: Vec<SockRec>| {
        queued.fetch_sub(evs.len(), Ordering::Relaxed);
        for e in &evs {
            agg.apply(e);
        }
        let now = monotonic_ns();
        for l in samples {
            agg.observe_listener(&listener_sample(&l), now);
        }
        agg.tick(now);
    };
    let mut wants: Vec<SyncSender<String>> = Vec::new();
    // Set when serving cannot go on: the process then exits non-zero (a supervisor restarts it).
    let mut failed: Option<&str> = None;
    'main: while !stop.load(Ordering::SeqCst) {
        if reader.is_finished() {
            failed = Some("the reader thread ended");
            break;
        }
        match up_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Up::Batch(evs, samples)) => apply(&mut agg, evs, samples),
            Ok(Up::Want(reply)) => wants.push(reply),
            Ok(Up::State { .. }) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        for reply in std::mem::take(&mut wants) {
            if cache
                .as_ref()
                .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1))
            {
                let t = Instant::now();
                if state_tx.send(()).is_err() {
                    failed = Some("the reader thread ended");
                    break 'main;
                }
                // Not up to a whole poll interval later.
                waker.wake();
                // Events that arrive meanwhile still go into the aggregator first.
                let (inv, hooks, loss, events) = loop {
                    match up_rx.recv_timeout(Duration::from_secs(5)) {
                        Ok(Up::Batch(evs, samples)) => apply(&mut agg, evs, samples),
                        Ok(Up::Want(r)) => wants.push(r),
                        Ok(Up::State {
                            inventory,
                            hooks,
                            loss,
                            events,
                        }) => break (inventory, hooks, loss, events),
                        Err(_) => {
                            failed = Some("the reader thread did not answer within 5 s");
                            break 'main;
                        }
                    }
                };
                let (inventory, namespaces) = inv.read();
                let now = monotonic_ns();
                let snap = crate::model::snapshot::build(
                    &agg,
                    &SnapInput {
                        now_ns: now,
                        window_ns: now - t0,
                        host: host.clone(),
                        kernel: kernel.clone(),
                        hooks,
                        inventory: Some(&inventory),
                        namespaces,
                        loss,
                        home_netns: home,
                        thresholds: Thresholds {
                            close_wait_secs: a.close_wait_secs,
                            ..Thresholds::default()
                        },
                        sockets_filtered: a.filters.narrows_sockets(),
                    },
                );
                let text = crate::output::prometheus::render(
                    &snap,
                    &crate::output::prometheus::Extras {
                        events,
                        build_seconds,
                        max_listeners: a.max_listeners as usize,
                    },
                );
                agg.reset_listener_peaks();
                build_seconds = t.elapsed().as_secs_f64();
                cache = Some((Instant::now(), text));
            }
            if let Some((_, text)) = &cache {
                let _ = reply.send(text.clone());
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    drop(up_rx);
    let panicked = reader.join().is_err();
    server.unblock();
    let _ = http.join();
    match (failed, panicked) {
        (_, true) => anyhow::bail!("the reader thread panicked; metrics stopped"),
        (Some(why), _) => anyhow::bail!("{why}; metrics stopped"),
        _ => Ok(EXIT_OK),
    }
}

fn http_loop(server: &tiny_http::Server, want: &SyncSender<Up>) {
    use tiny_http::{Header, Response};
    let header =
        |v: &str| Header::from_bytes(&b"Content-Type"[..], v.as_bytes()).expect("static header");
    for rq in server.incoming_requests() {
        let path = rq.url().split('?').next().unwrap_or("").to_string();
        let res = match (rq.method(), path.as_str()) {
            (tiny_http::Method::Get, "/metrics") => {
                let (tx, rx) = sync_channel(1);
                if want.send(Up::Want(tx)).is_err() {
                    break;
                }
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(body) => rq.respond(
                        Response::from_string(body)
                            .with_header(header("text/plain; version=0.0.4; charset=utf-8")),
                    ),
                    Err(_) => rq.respond(
                        Response::from_string("metrics not ready\n").with_status_code(503),
                    ),
                }
            }
            (tiny_http::Method::Get, "/healthz") => rq.respond(Response::from_string("ok\n")),
            (tiny_http::Method::Get, "/") => rq.respond(
                Response::from_string("tcpwatch: metrics at /metrics, health at /healthz\n")
                    .with_header(header("text/plain; charset=utf-8")),
            ),
            _ => rq.respond(Response::from_string("not found\n").with_status_code(404)),
        };
        let _ = res;
    }
}

/// A sampled listener record as the aggregator takes it.
fn listener_sample(l: &SockRec) -> ListenerSample {
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

/// Moves a batch of events and listener samples into the aggregator.
pub fn feed(agg: &mut Aggregator, src: &mut EventSource, batch: &mut Vec<Event>) {
    for e in batch.drain(..) {
        agg.apply(&e);
    }
    let now = monotonic_ns();
    for l in src.listener_samples.drain(..) {
        agg.observe_listener(&listener_sample(&l), now);
    }
    agg.tick(now);
}

/// Timelines for the connections table: every one the aggregator keeps, most recent first.
pub fn conn_views(agg: &Aggregator, now: u64) -> Vec<crate::model::snapshot::SocketView> {
    let mut v: Vec<&crate::model::aggregate::Timeline> = agg.sockets().collect();
    v.sort_by_key(|t| std::cmp::Reverse(t.last_ns));
    v.into_iter()
        .take(5000)
        .map(|t| crate::model::snapshot::socket_view(t, now))
        .collect()
}

fn top(a: TopArgs) -> anyhow::Result<i32> {
    use std::io::IsTerminal as _;
    if !io::stdout().is_terminal() {
        if a.replay.is_some() {
            anyhow::bail!("--replay needs a terminal");
        }
        note!(
            "tcpwatch: stdout is not a terminal: printing a snapshot instead of the interactive view"
        );
        return snapshot(SnapshotArgs {
            json: false,
            duration: 0.0,
            close_wait_secs: a.close_wait_secs,
            filters: a.filters,
            probe: a.probe,
        });
    }
    match &a.replay {
        Some(p) => top_replay(&a, p),
        None => top_live(&a),
    }
}

struct Screen {
    term: ratatui::DefaultTerminal,
}

impl Screen {
    fn new() -> anyhow::Result<Screen> {
        Ok(Screen {
            term: ratatui::try_init()
                .map_err(|e| anyhow::anyhow!("starting the terminal UI: {e}"))?,
        })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Reads keys until `deadline`; returns false when the user quits.
fn ui_wait(app: &mut crate::output::tui::App, deadline: Instant) -> anyhow::Result<bool> {
    use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !event::poll(left)? {
            return Ok(!app.quit);
        }
        if let TermEvent::Key(k) = event::read()?
            && k.kind != KeyEventKind::Release
        {
            app.key(k);
            if app.quit {
                return Ok(false);
            }
            // Redraw right away after a key.
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(true);
        }
    }
}

fn text_line(clock: &crate::output::Clock, home: u32, e: &Event) -> String {
    let mut w = TraceWriter::new(Vec::new(), false, *clock, home);
    let _ = w.event(e);
    String::from_utf8_lossy(&w.into_inner())
        .trim_end()
        .to_string()
}

fn top_live(a: &TopArgs) -> anyhow::Result<i32> {
    let filters = Filters::from_args(&a.filters)?;
    require_privileges()?;
    let stop = install_stop_signals();
    let cfg = settings::probe_config(&a.probe, &filters);
    let mut src = EventSource::start(&cfg, filters)?;
    src.take_inventory();
    let mut agg = Aggregator::new(AggConfig::default());
    seed_aggregator(&mut agg, &src.inventory);
    let mut record = match &a.record {
        Some(p) => Some(TraceWriter::new(
            BufWriter::new(
                std::fs::File::create(p)
                    .map_err(|e| anyhow::anyhow!("--record {}: {e}", p.display()))?,
            ),
            true,
            clock(),
            0,
        )),
        None => None,
    };
    let clk = clock();
    let home = settings::own_netns();
    let mut app = crate::output::tui::App::new(format!("host {}", hostname()));
    let mut screen = Screen::new()?;
    let t0 = monotonic_ns();
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    let mut inventory: Vec<SockRec> = Vec::new();
    let mut namespaces = Vec::new();
    let mut last_inv: Option<Instant> = None;
    let mut batch = Vec::with_capacity(4096);
    let mut prev_loss = Loss::default();
    let (mut rate_t, mut rate_n) = (Instant::now(), src.events);
    loop {
        let tick = Instant::now() + refresh;
        // Drain events until the next screen refresh.
        while Instant::now() < tick && !stop.load(Ordering::SeqCst) {
            src.poll(Duration::from_millis(20), false, &mut batch);
            for e in &batch {
                if let Some(w) = record.as_mut() {
                    w.event(e)?;
                }
                app.log(text_line(&clk, home, e));
            }
            if let Some(w) = record.as_mut() {
                w.flush()?;
            }
            feed(&mut agg, &mut src, &mut batch);
            if !ui_wait(&mut app, Instant::now())? {
                return Ok(EXIT_OK);
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        src.refresh_loss(&mut prev_loss);
        if last_inv.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            (inventory, namespaces) = src.fresh_inventory();
            last_inv = Some(Instant::now());
        }
        let now = monotonic_ns();
        let input = SnapInput {
            now_ns: now,
            window_ns: now - t0,
            host: hostname(),
            kernel: kernel_release(),
            hooks: hook_views(&src),
            inventory: Some(&inventory),
            namespaces: namespaces.clone(),
            loss: src.loss,
            home_netns: home,
            thresholds: Thresholds {
                close_wait_secs: a.close_wait_secs,
                ..Thresholds::default()
            },
            sockets_filtered: a.filters.narrows_sockets(),
        };
        let snap = crate::model::snapshot::build(&agg, &input);
        let el = rate_t.elapsed().as_secs_f64();
        let rate = (src.events - rate_n) as f64 / el.max(1e-3);
        (rate_t, rate_n) = (Instant::now(), src.events);
        app.update(snap, conn_views(&agg, now), rate);
        screen
            .term
            .draw(|f| crate::output::tui::draw::draw(f, &app))?;
    }
    Ok(EXIT_OK)
}

fn top_replay(a: &TopArgs, path: &std::path::Path) -> anyhow::Result<i32> {
    let f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("--replay {}: {e}", path.display()))?;
    let (events, skipped) = crate::source::replay::read(io::BufReader::new(f))
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let filters = Filters::from_args(&a.filters)?;
    let events: Vec<Event> = events
        .into_iter()
        .filter(|e| filters.kernel_accepts(e) && filters.accepts(e))
        .collect();
    let clk = crate::output::Clock {
        offset_ns: 0,
        utc_offset_s: 0,
    };
    let mut app = crate::output::tui::App::new(format!(
        "replay {} ({} events, {skipped} other lines)",
        path.display(),
        events.len()
    ));
    let mut agg = Aggregator::new(AggConfig::default());
    let mut screen = Screen::new()?;
    let first = events.first().map_or(0, |e| e.ts_ns);
    let wall0 = Instant::now();
    let mut i = 0;
    let refresh = Duration::from_millis(1000 / a.refresh as u64);
    loop {
        // Everything up to the replay clock (all at once at speed 0).
        let replay_now = if a.speed <= 0.0 {
            u64::MAX
        } else {
            first + (wall0.elapsed().as_nanos() as f64 * a.speed) as u64
        };
        let before = i;
        while i < events.len() && events[i].ts_ns <= replay_now {
            agg.apply(&events[i]);
            app.log(text_line(&clk, 0, &events[i]));
            i += 1;
        }
        let now = if i > 0 { events[i - 1].ts_ns } else { first };
        agg.tick(now);
        if i != before || app.snap.version == 0 {
            let input = SnapInput {
                now_ns: now,
                window_ns: now - first,
                host: String::new(),
                kernel: "(replay)".into(),
                hooks: Vec::new(),
                inventory: None,
                namespaces: Vec::new(),
                loss: Loss::default(),
                home_netns: 0,
                thresholds: Thresholds {
                    close_wait_secs: a.close_wait_secs,
                    ..Thresholds::default()
                },
                sockets_filtered: a.filters.narrows_sockets(),
            };
            let snap = crate::model::snapshot::build(&agg, &input);
            app.update(
                snap,
                conn_views(&agg, now),
                (i - before) as f64 / refresh.as_secs_f64(),
            );
        }
        screen
            .term
            .draw(|f| crate::output::tui::draw::draw(f, &app))?;
        if !ui_wait(&mut app, Instant::now() + refresh)? {
            return Ok(EXIT_OK);
        }
    }
}
