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

use super::common::{POLL, note, thresholds, watch_options};
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

pub fn run(a: CheckArgs) -> anyhow::Result<i32> {
    let limits = Limits {
        retransmits: a.max_retransmits.clone(),
        no_listen_overflow: a.no_listen_overflow,
        max_resets: a.max_resets,
        max_time_wait: a.max_time_wait,
        close_wait_leak_ns: a.close_wait_leak.map(|s| (s * 1e9) as u64),
        max_syn_sent_ns: a.max_syn_sent_ms.map(|ms| ms * 1_000_000),
    };
    let mut opts = watch_options(
        &a.filters,
        &a.probe,
        thresholds(a.close_wait_leak.map_or(10, |s| s.ceil() as u64)),
        true,
    )?;
    // The namespace's counters count more than the command's sockets.
    opts.sockets_filtered |= !a.any_process;
    let mut json_out = report_file(&a.json)?;
    let mut junit_out = report_file(&a.junit)?;
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
    let mut child = scope
        .spawn(&a.cmd)
        .with_context(|| format!("cannot run `{}`", a.cmd[0]))?;
    warnings.extend(
        scope
            .warning
            .iter()
            .map(|w| format!("{w}: judging by process tree instead")),
    );
    let scope = std::sync::Arc::new(std::sync::Mutex::new(scope));
    session.set_scope(Box::new(CommandScope {
        scope: scope.clone(),
        listeners: HashSet::new(),
    }));

    let mut checker = Checker::new();
    let grace = Duration::from_secs_f64(a.grace);
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    let mut terminated: Option<Instant> = None;
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
                scope
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .signal_all(sig);
            }
        }
        let done = exited.is_some_and(|(_, t)| signalled || t.elapsed() >= grace);
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
    let (status, _) = exited.expect("the loop ends after the command exits");
    let (left_running, scope_text) = {
        let s = scope.lock().unwrap_or_else(|p| p.into_inner());
        (s.remaining(), s.describe())
    };
    let snap = session.snapshot_of_events();
    let (observed, mut assertions) = checker.finish(&limits, now);
    for a in &mut assertions {
        a.governed_by = crate::model::findings::governors_of(&a.findings, &snap.sysctls);
    }
    let loss = session.loss();
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
        duration_s: t_start.elapsed().as_secs_f64(),
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
    drop(session);
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
