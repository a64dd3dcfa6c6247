//! `tcpwatch serve`: the daemon with its API socket and record off, Prometheus on `--listen`
//! (what it always was; existing units keep working).
use super::common::{thresholds, watch_options};
use super::signals;
use crate::cli::ServeArgs;
use crate::daemon::{self, Config};

pub fn run(a: ServeArgs) -> anyhow::Result<i32> {
    // Signals first: every thread (and the runtime's) inherits the blocked mask.
    let stop = signals::install();
    let listener = std::net::TcpListener::bind(a.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?;
    listener.set_nonblocking(true)?;
    let mut opts = watch_options(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    opts.retention_ns = Some(a.retention_secs * 1_000_000_000);
    daemon::run(
        Config {
            session: opts,
            socket: None,
            metrics: Some(listener),
            metrics_addr: Some(a.listen),
            state_dir: None,
            max_listeners: a.max_listeners as usize,
            group: None,
        },
        stop,
    )
}
