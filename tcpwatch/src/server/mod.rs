//! What tcpwatch serves to others while it runs: the HTTP endpoint (Prometheus metrics,
//! health) and the daemon's API socket. Everything here is built to face clients that misbehave: bounded connections,
//! timeouts, no body ever read.
pub mod api;
pub mod http;

/// An `accept` error that leaves the listener fine (out of descriptors or memory, a client
/// that gave up while queued): wait a little and go on.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
        )
    )
}
