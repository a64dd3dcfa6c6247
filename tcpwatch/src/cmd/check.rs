//! `tcpwatch check -- CMD`: runs CMD in a scope of its own (a cgroup, or its process tree),
//! aggregates the events of its sockets only, judges them against the assertions and writes
//! the report; the exit code is the verdict's.
use std::collections::HashSet;
use std::io::{self, BufWriter, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::common::{POLL, daemon_client, daemon_line, note, thresholds, watch_options};
use super::signals;
use crate::cli::CheckArgs;
use crate::model::check::{Checker, CommandExit, Limits, Report, Verdict};
use crate::model::event::{Event, EventKind, TcpState};
use crate::model::system::SockRec;
use crate::session::{Scope, Session};
use crate::source::scope::RunScope;

/// Opens a report file before the command runs, so a bad path fails early (`-` is stdout).
fn report_file(p: &Option<std::path::PathBuf>) -> anyhow::Result<Option<Box<dyn io::Write>>> {
    Ok(match p {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(io::stdout())),
        Some(p) => Some(Box::new(BufWriter::new(
            crate::source::files::create(p)
                .with_context(|| format!("cannot write {}", p.display()))?,
        ))),
    })
}

/// The command's sockets: owned by its scope, or overflows of a listener it opened.
struct CommandScope {
    scope: std::sync::Arc<std::sync::Mutex<RunScope>>,
    /// Listeners the command opened.
    listeners: HashSet<(u32, SocketAddr)>,
}

impl Scope for CommandScope {
    fn event(&mut self, e: &Event) -> bool {
        // Counter-based overflows may be resolved before the listener's LISTEN event left
        // the reorder hold: the listener, once known, vouches for them.
        let ours = matches!(e.kind, EventKind::Overflow { .. })
            && self.listeners.contains(&(e.netns, e.local));
        let scope = &mut *self.scope.lock().unwrap_or_else(|p| p.into_inner());
        if !(ours || scope.owner_in(&e.owner)) {
            return false;
        }
        if matches!(
            e.kind,
            EventKind::State {
                new: TcpState::Listen,
                ..
            } | EventKind::Overflow { .. }
        ) {
            self.listeners.insert((e.netns, e.local));
        }
        true
    }

    fn listener(&mut self, l: &SockRec) -> bool {
        // Samples carry no owner for listeners made after start: the LISTEN event did.
        self.listeners.contains(&(l.netns, l.local))
            || self
                .scope
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .owner_in(&l.owner)
    }
}

fn limits(a: &CheckArgs) -> Limits {
    Limits {
        retransmits: a.max_retransmits.clone(),
        no_listen_overflow: a.no_listen_overflow,
        max_resets: a.max_resets,
        max_time_wait: a.max_time_wait,
        close_wait_leak_ns: a.close_wait_leak.map(|s| (s * 1e9) as u64),
        max_syn_sent_ns: a.max_syn_sent_ms.map(|ms| ms * 1_000_000),
    }
}

pub fn run(a: CheckArgs) -> anyhow::Result<i32> {
    super::common::note_scope(&a.filters);
    if let Some(c) = daemon_client(&a.source)? {
        return through_daemon(&a, c);
    }
    let limits = limits(&a);
    let mut opts = watch_options(
        &a.filters,
        &a.probe,
        thresholds(a.close_wait_leak.map_or(10, |s| s.ceil() as u64)),
        true,
    )?;
    // The namespace's counters count more than the command's sockets.
    opts.sockets_filtered |= !a.any_process;
    let json_out = report_file(&a.json)?;
    let junit_out = report_file(&a.junit)?;
    let stop = signals::install();
    let mut session = Session::start(opts)?;
    let mut warnings: Vec<String> = session
        .collector()
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
    let mut run = Run::start(&a, &mut warnings)?;
    session.set_scope(Box::new(run.command_scope()));

    let mut checker = Checker::new();
    loop {
        let done = run.poll(stop.load(Ordering::SeqCst))?;
        let batch = if done {
            session.finish()
        } else {
            session.step(POLL)
        };
        for e in &batch.events {
            checker.apply(e);
        }
        if done {
            break;
        }
    }
    session.refresh_loss();
    warnings.extend(session.take_diagnostics());
    let now = session.now_ns();
    let ended = run.end();
    let snap = session.snapshot_of_events();
    let loss = session.loss();
    // The session's scope goes with it: the command's cgroup is removed before the report.
    drop(session);
    report(
        &a,
        &limits,
        Outcome {
            checker,
            snap,
            loss,
            now,
            ended,
            warnings,
        },
        json_out,
        junit_out,
    )
}

/// The command under observation, whichever way it is observed: started in its scope,
/// passed SIGTERM (then SIGKILL after 10 s) when tcpwatch is asked to stop, and given
/// `--grace` after it exits for its last packets.
struct Run {
    child: std::process::Child,
    scope: std::sync::Arc<std::sync::Mutex<RunScope>>,
    exited: Option<(std::process::ExitStatus, Instant)>,
    terminated: Option<Instant>,
    grace: Duration,
    started_unix_s: f64,
    t_start: Instant,
}

/// How the command ended, and what its scope says.
struct Ended {
    status: std::process::ExitStatus,
    started_unix_s: f64,
    duration_s: f64,
    scope_text: String,
    left_running: Vec<u32>,
}

impl Run {
    /// Starts the command; the scope's warnings (no cgroup) go to `warnings`.
    fn start(a: &CheckArgs, warnings: &mut Vec<String>) -> anyhow::Result<Run> {
        let mut scope = if a.any_process {
            RunScope::any()
        } else {
            RunScope::for_command()
        };
        note!("tcpwatch: watching; running {}", a.cmd.join(" "));
        let started_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let t_start = Instant::now();
        let child = scope
            .spawn(&a.cmd)
            .with_context(|| format!("cannot run `{}`", a.cmd[0]))?;
        warnings.extend(
            scope
                .warning
                .iter()
                .map(|w| format!("{w}: judging by process tree instead")),
        );
        Ok(Run {
            child,
            scope: std::sync::Arc::new(std::sync::Mutex::new(scope)),
            exited: None,
            terminated: None,
            grace: Duration::from_secs_f64(a.grace),
            started_unix_s,
            t_start,
        })
    }

    /// Which sockets are the command's.
    fn command_scope(&self) -> CommandScope {
        CommandScope {
            scope: self.scope.clone(),
            listeners: HashSet::new(),
        }
    }

    /// Reaps the command and passes a stop on; true once the run is over: the command
    /// exited and its grace passed, or tcpwatch was stopped after it exited.
    fn poll(&mut self, signalled: bool) -> anyhow::Result<bool> {
        if self.exited.is_none()
            && let Some(st) = self.child.try_wait().context("waiting for the command")?
        {
            self.exited = Some((st, Instant::now()));
        }
        if signalled && self.exited.is_none() {
            // Pass SIGTERM on (a terminal's Ctrl-C already reached the whole process group).
            let sig = match self.terminated {
                None => {
                    self.terminated = Some(Instant::now());
                    Some(libc::SIGTERM)
                }
                Some(t) if t.elapsed() > Duration::from_secs(10) => Some(libc::SIGKILL),
                _ => None,
            };
            if let Some(sig) = sig {
                // SAFETY: signalling our own child, which has not been reaped yet.
                unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
                // And the rest of its tree, which the cgroup knows.
                self.scope
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .signal_all(sig);
            }
        }
        Ok(self
            .exited
            .is_some_and(|(_, t)| signalled || t.elapsed() >= self.grace))
    }

    /// After `poll` said the run is over. The scope itself goes when its last holder does.
    fn end(self) -> Ended {
        let (status, _) = self.exited.expect("the run ends after the command exits");
        let s = self.scope.lock().unwrap_or_else(|p| p.into_inner());
        Ended {
            status,
            started_unix_s: self.started_unix_s,
            duration_s: self.t_start.elapsed().as_secs_f64(),
            scope_text: s.describe(),
            left_running: s.remaining(),
        }
    }
}

/// What a run observed, however it was observed.
struct Outcome {
    checker: Checker,
    snap: crate::model::snapshot::Snapshot,
    loss: crate::model::Loss,
    now: u64,
    ended: Ended,
    warnings: Vec<String>,
}

/// The verdict, the report files, the text on stderr; the exit code.
fn report(
    a: &CheckArgs,
    limits: &Limits,
    o: Outcome,
    mut json_out: Option<Box<dyn io::Write>>,
    mut junit_out: Option<Box<dyn io::Write>>,
) -> anyhow::Result<i32> {
    let Outcome {
        checker,
        snap,
        loss,
        now,
        ended:
            Ended {
                status,
                started_unix_s,
                duration_s,
                scope_text,
                left_running,
            },
        warnings,
    } = o;
    let (observed, mut assertions) = checker.finish(limits, now);
    for a in &mut assertions {
        a.governed_by = crate::model::findings::governors_of(&a.findings, &snap.sysctls);
    }
    let verdict = Verdict::decide(&assertions, &loss, a.allow_loss, status.success());
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
        duration_s,
        grace_s: a.grace,
        scope: scope_text,
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

/// Lines of a subscription, read on a thread (a quiet daemon never holds the loop).
fn subscription(
    path: &std::path::Path,
    filters: &crate::model::api::Filters,
) -> anyhow::Result<std::sync::mpsc::Receiver<Vec<u8>>> {
    use crate::model::api::{Body, Op};
    let mut c = crate::source::daemon::Client::connect(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    match c.request(
        Op::Subscribe {
            from_wall_ns: None,
            filters: filters.clone(),
        },
        Duration::from_secs(30),
    )? {
        Body::Subscribed { .. } => {}
        _ => anyhow::bail!("the daemon answered something else than a subscription"),
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1 << 16);
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        while let Ok(Some(())) = c.next_line(&mut buf, None) {
            if tx.send(std::mem::take(&mut buf)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn readings(
    c: &mut crate::source::daemon::Client,
) -> anyhow::Result<(
    Vec<crate::model::api::NsReading>,
    Vec<crate::model::snapshot::HookView>,
    crate::model::snapshot::LossView,
)> {
    match c.request(crate::model::api::Op::Readings, Duration::from_secs(30))? {
        crate::model::api::Body::Readings {
            namespaces,
            hooks,
            loss,
            ..
        } => Ok((namespaces, hooks, loss)),
        _ => anyhow::bail!("the daemon answered something else than readings"),
    }
}

/// The run observed through the daemon: its event stream, judged here for the command's
/// scope; its readings before and after give the counters' deltas; its loss during the run
/// and what this client skipped count as lost.
fn through_daemon(a: &CheckArgs, mut c: crate::source::daemon::Client) -> anyhow::Result<i32> {
    use crate::model::Loss;
    use crate::session::{Analysis, Context, Reading};
    let limits = limits(a);
    let filters = crate::settings::api_filters(&a.filters)?;
    let json_out = report_file(&a.json)?;
    let junit_out = report_file(&a.junit)?;
    let stop = signals::install();
    note!("tcpwatch: {}", daemon_line(&c));
    let (ns_start, _, loss_start) = readings(&mut c)?;
    let rx = subscription(&c.path, &filters)?;
    let mut warnings: Vec<String> = Vec::new();
    let start_mono = crate::source::host::monotonic_ns();
    let mut run = Run::start(a, &mut warnings)?;
    let mut cs = run.command_scope();
    let thresholds = thresholds(a.close_wait_leak.map_or(10, |s| s.ceil() as u64));
    let mut analysis = Analysis::new(
        Context {
            host: c.hello.host.clone(),
            kernel: c.hello.kernel.clone(),
            home_netns: crate::settings::own_netns(),
            thresholds,
            sockets_filtered: a.filters.narrows_sockets() || !a.any_process,
            reasons: crate::model::event::RstReasons::new(c.hello.reasons.clone()),
        },
        Some(start_mono),
    );
    let mut checker = Checker::new();
    let mut skipped = 0u64;
    loop {
        let done = run.poll(stop.load(Ordering::SeqCst))?;
        let deadline = Instant::now() + POLL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(_) => anyhow::bail!(
                    "the daemon at {} went away during the run: the verdict would be a guess",
                    c.path.display()
                ),
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match v["type"].as_str() {
                Some("skipped") => skipped += v["count"].as_u64().unwrap_or(0),
                Some("live" | "loss") => {}
                _ => {
                    if let Some(e) = crate::source::replay::event_from_json(&v)
                        && cs.event(&e)
                    {
                        checker.apply(&e);
                        analysis.apply(std::slice::from_ref(&e));
                    }
                }
            }
        }
        analysis.tick(crate::source::host::monotonic_ns());
        if done {
            break;
        }
    }
    let now = crate::source::host::monotonic_ns();
    let ended = run.end();
    let (ns_end, hooks, loss_end) = readings(&mut c)?;
    let namespaces = ns_end
        .iter()
        .map(|n| match ns_start.iter().find(|s| s.inode == n.inode) {
            Some(s) => n.input(s),
            None => n.input(n),
        })
        .collect();
    // Lost during the run: the daemon's, and what this client was not sent.
    let loss = Loss {
        kernel_dropped: loss_end
            .kernel_dropped
            .saturating_sub(loss_start.kernel_dropped),
        kernel_skipped: loss_end
            .kernel_skipped
            .saturating_sub(loss_start.kernel_skipped),
        channel_dropped: loss_end
            .channel_dropped
            .saturating_sub(loss_start.channel_dropped)
            + skipped,
        decode_errors: loss_end
            .decode_errors
            .saturating_sub(loss_start.decode_errors),
        ..Loss::default()
    };
    if skipped > 0 {
        warnings.push(format!(
            "{skipped} events were skipped: this check did not keep up with the daemon"
        ));
    }
    let snap = analysis.snapshot(
        now,
        Reading {
            inventory: None,
            namespaces,
            loss,
            hooks,
        },
    );
    // The command's cgroup is removed before the report.
    drop(cs);
    report(
        a,
        &limits,
        Outcome {
            checker,
            snap,
            loss,
            now,
            ended,
            warnings,
        },
        json_out,
        junit_out,
    )
}
