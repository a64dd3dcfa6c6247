//! The snapshot every output renders: the kernel's socket inventory (exact, like `ss`), the
//! aggregator's history, counters and sysctls per namespace, and the findings. `views` holds
//! its types (the JSON contract), `build` composes it.
mod build;
#[cfg(test)]
mod tests;
pub mod views;

pub use build::{build, socket_view};
pub use views::*;
