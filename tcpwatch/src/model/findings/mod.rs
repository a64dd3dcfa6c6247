//! The findings catalogue: every finding tcpwatch reports, once — its id, severity, family
//! and governors in `catalogue`, its wording and the facts it needs in its family's module
//! (queues, lifecycle, retransmits, resets, resources). Snapshot, check, top and serve all
//! render findings made here.
pub mod catalogue;
pub mod facts;
mod lifecycle;
mod queues;
mod resets;
mod resources;
mod retransmits;
#[cfg(test)]
mod tests;

pub use catalogue::{
    CATALOGUE, Entry, Family, Finding, FindingId, Gov, Governor, Severity, governors_of,
    markdown_table,
};
use facts::Facts;

/// Every finding the facts support, in catalogue order within each family.
pub fn find(f: &Facts<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    lifecycle::close_wait_leak(f, &mut out);
    lifecycle::orphaned_fin_wait2(f, &mut out);
    retransmits::syn_sent_stuck(f, &mut out);
    queues::listeners(f, &mut out);
    resources::ephemeral_ports(f, &mut out);
    resources::time_wait_buckets(f, &mut out);
    retransmits::storms(f, &mut out);
    resets::by_cause(f, &mut out);
    resources::events_lost(f, &mut out);
    out
}
