//! `tcpwatch daemon`: the always-on mode, from its flags to `daemon::run`.
use std::path::PathBuf;

use super::common::{thresholds, watch_options};
use super::signals;
use crate::cli::DaemonArgs;
use crate::daemon::{self, Config, access};

fn off(s: &str) -> bool {
    s.eq_ignore_ascii_case("off")
}

pub fn run(a: DaemonArgs) -> anyhow::Result<i32> {
    let stop = signals::install();
    let (metrics, metrics_addr) = if off(&a.metrics) {
        (None, None)
    } else {
        let addr: std::net::SocketAddr = a
            .metrics
            .parse()
            .map_err(|_| anyhow::anyhow!("--metrics {}: expected ADDR:PORT or off", a.metrics))?;
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("--metrics {addr}: cannot listen: {e}"))?;
        l.set_nonblocking(true)?;
        (Some(l), Some(addr))
    };
    let socket = (!off(&a.socket)).then(|| PathBuf::from(&a.socket));
    let state_dir =
        (!off(&a.state_dir)).then(|| (PathBuf::from(&a.state_dir), a.history_mib << 20));
    if socket.is_none() && metrics.is_none() {
        anyhow::bail!(
            "--socket off and --metrics off leave nobody to serve: use `tcpwatch trace` or keep one"
        );
    }
    let group = match &a.socket_group {
        None => access::group(),
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => crate::source::host::group_id(g)
                .ok_or_else(|| anyhow::anyhow!("--socket-group {g}: no such group"))?,
        }),
    };
    let mut opts = watch_options(&a.filters, &a.probe, thresholds(a.close_wait_secs), true)?;
    opts.retention_ns = Some(a.retention_secs * 1_000_000_000);
    daemon::run(
        Config {
            session: opts,
            socket,
            metrics,
            metrics_addr,
            state_dir,
            max_listeners: a.max_listeners as usize,
            group,
        },
        stop,
    )
}
