//! What the commands share: the exit-code contract, the poll interval, stderr notes that
//! cannot panic, the privilege check, and how a session that watches events is started.
use std::time::Duration;

use crate::cli::{FilterArgs, ProbeArgs, SourceArgs};
use crate::model::snapshot::Thresholds;
use crate::session::{Options, Session};
use crate::settings::{self, Filters};
use crate::source::caps;

/// `eprintln!` that cannot panic: with stderr closed (`2>&-`, a reader that went away) the
/// line is lost, not the run.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
pub(crate) use note;

/// Exit codes (DESIGN §4).
pub const EXIT_OK: i32 = 0;
pub const EXIT_ASSERTION: i32 = 1;
pub const EXIT_ERROR: i32 = 2;

/// How often a loop polls the rings (the kernel never wakes the reader).
pub const POLL: Duration = Duration::from_millis(20);

pub fn require_privileges() -> anyhow::Result<()> {
    if let Some(msg) = caps::effective().and_then(caps::missing_for_tracing) {
        anyhow::bail!("{msg}");
    }
    Ok(())
}

/// The probe configuration for these arguments, with what this host offers.
pub fn probe_config(p: &ProbeArgs, filters: &Filters, trace: bool) -> crate::ebpf::ProbeConfig {
    let mut cfg = settings::probe_config(p, filters);
    cfg.trace = trace;
    cfg.sock_diag = crate::source::sockdiag::available();
    cfg.listing_limits = caps::effective().and_then(if trace {
        caps::tracing_limits
    } else {
        caps::listing_limits
    });
    cfg
}

/// How a session that follows events with every signal starts (the common case), once the
/// filters are valid and the privileges there.
pub fn watch_options(
    filters: &FilterArgs,
    probe: &ProbeArgs,
    thresholds: Thresholds,
    aggregate: bool,
) -> anyhow::Result<Options> {
    let f = Filters::from_args(filters)?;
    require_privileges()?;
    Ok(Options {
        probe: probe_config(probe, &f, true),
        filters: f,
        thresholds,
        sockets_filtered: filters.narrows_sockets(),
        watch: true,
        aggregate,
        retention_ns: None,
    })
}

/// A session that follows events with every signal.
pub fn watching(
    filters: &FilterArgs,
    probe: &ProbeArgs,
    thresholds: Thresholds,
    aggregate: bool,
) -> anyhow::Result<Session> {
    Session::start(watch_options(filters, probe, thresholds, aggregate)?)
}

pub fn thresholds(close_wait_secs: u64) -> Thresholds {
    Thresholds {
        close_wait_secs,
        ..Thresholds::default()
    }
}

/// Says on stderr when the default scope is tcpwatch's own network namespace.
pub fn note_scope(f: &FilterArgs) {
    if let Some(n) = crate::settings::scope_note(f) {
        note!("tcpwatch: {n}");
    }
}

/// The error of `--since` without a daemon to read the record from.
pub fn since_needs_daemon(src: &SourceArgs) -> anyhow::Error {
    let (path, _) = crate::source::daemon::locate(src.daemon.as_deref());
    anyhow::anyhow!(
        "--since reads a daemon's record, and no daemon runs at {} (start one: tcpwatch daemon)",
        path.display()
    )
}

/// The daemon this command uses: `None` for `--standalone`, or when none runs where nobody
/// named one (then the command loads its own probes, as before there were daemons).
pub fn daemon_client(src: &SourceArgs) -> anyhow::Result<Option<crate::source::daemon::Client>> {
    use crate::source::daemon::{self, Client, Unreachable};
    if src.standalone {
        return Ok(None);
    }
    let (path, named) = daemon::locate(src.daemon.as_deref());
    match Client::connect(&path) {
        Ok(c) => Ok(Some(c)),
        Err(Unreachable::Absent(_)) if !named => Ok(None),
        Err(e) => anyhow::bail!("{e}"),
    }
}

/// What a client says about the daemon it uses.
pub fn daemon_line(c: &crate::source::daemon::Client) -> String {
    let clock = crate::source::host::wall_clock();
    let since = clock.hms_of_wall(c.hello.started_wall_ns);
    format!(
        "using the daemon at {} (pid {}, running since {since})",
        c.path.display(),
        c.hello.pid
    )
}
