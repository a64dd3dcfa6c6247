//! tcpwatch: a live TCP connection-state observer on eBPF. The binary is a thin wrapper around
//! [`runtime::main_entry`]; modules follow the data flow: cli → settings → ebpf → decode → model
//! → output.
pub mod cli;
pub mod collect;
pub mod decode;
pub mod ebpf;
pub mod model;
pub mod output;
pub mod runtime;
pub mod settings;
pub mod source;

pub use runtime::main_entry;
