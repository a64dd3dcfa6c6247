//! What tcpwatch serves to others while it runs: the HTTP endpoint (Prometheus metrics,
//! health). Everything here is built to face clients that misbehave: bounded connections,
//! timeouts, no body ever read.
pub mod api;
pub mod http;
