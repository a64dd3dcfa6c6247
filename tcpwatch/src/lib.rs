//! tcpwatch: a live TCP connection-state observer on eBPF. Layers, bottom up: `model` (pure
//! data and judgement), `source` and `ebpf` (read the system into model types), `output`
//! (render model types), `settings` (validated command line), `session` (one observation:
//! collector + analysis), `cmd` (one thin file per subcommand). See docs/architecture.md.
pub mod cli;
pub mod cmd;
pub mod daemon;
pub mod ebpf;
pub mod model;
pub mod output;
pub mod recorder;
pub mod server;
pub mod session;
pub mod settings;
pub mod source;
#[cfg(test)]
mod testkit;

pub use cmd::main_entry;
