//! The commands: each file wires one subcommand from its arguments to a [`Session`] and an
//! output, nothing more. This module dispatches, maps results to the exit-code contract and
//! holds what several commands share.
mod check;
mod common;
mod daemon;
mod doctor;
mod serve;
mod signals;
mod snapshot;
mod top;
mod trace;

use clap::Parser as _;

use crate::cli::{Cli, Command};
use common::note;
pub use common::{EXIT_ASSERTION, EXIT_ERROR, EXIT_OK};

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
        Command::Daemon(a) => daemon::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            note!("tcpwatch: {e:#}");
            EXIT_ERROR
        }
    }
}
