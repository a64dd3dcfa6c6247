//! The commands: each file wires one subcommand from its arguments to a [`Session`] and an
//! output, nothing more. This module dispatches, maps results to the exit-code contract and
//! holds what several commands share.
mod check;
mod doctor;
mod serve;
mod signals;
mod snapshot;
mod top;
mod trace;

use std::time::Duration;

use clap::Parser as _;

use crate::cli::{Cli, Command, FilterArgs, ProbeArgs};
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

pub fn main_entry() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    let res = match cli.command {
        Command::Trace(a) => trace::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Top(a) => top::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Check(a) => check::run(a),
        Command::Serve(a) => serve::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            note!("tcpwatch: {e:#}");
            EXIT_ERROR
        }
    }
}

fn require_privileges() -> anyhow::Result<()> {
    if let Some(msg) = caps::effective().and_then(caps::missing_for_tracing) {
        anyhow::bail!("{msg}");
    }
    Ok(())
}

/// The probe configuration for these arguments, with what this host offers.
fn probe_config(p: &ProbeArgs, filters: &Filters, trace: bool) -> crate::ebpf::ProbeConfig {
    let mut cfg = settings::probe_config(p, filters);
    cfg.trace = trace;
    cfg.sock_diag = crate::source::sockdiag::available();
    cfg.listing_limits = caps::effective().and_then(caps::listing_limits);
    cfg
}

/// How a session that follows events with every signal starts (the common case), once the
/// filters are valid and the privileges there.
fn watch_options(
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
    })
}

/// A session that follows events with every signal.
fn watching(
    filters: &FilterArgs,
    probe: &ProbeArgs,
    thresholds: Thresholds,
    aggregate: bool,
) -> anyhow::Result<Session> {
    Session::start(watch_options(filters, probe, thresholds, aggregate)?)
}

fn thresholds(close_wait_secs: u64) -> Thresholds {
    Thresholds {
        close_wait_secs,
        ..Thresholds::default()
    }
}
