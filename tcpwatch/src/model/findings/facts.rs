//! What the families read: the aggregator's history, the snapshot input, the snapshot's
//! views built so far and each namespace's sysctls; and a finding made with the catalogue's
//! governors quoted in its namespace.
use std::collections::BTreeMap;

use super::catalogue::{Finding, FindingId, Gov, Governor, Severity};
use crate::model::aggregate::Aggregator;
use crate::model::event::OwnerView;
use crate::model::snapshot::views::{Input, Snapshot};

/// What the families read: the aggregator's history, the snapshot input, the snapshot's
/// views built so far, and each namespace's sysctls.
pub struct Facts<'a> {
    pub agg: &'a Aggregator,
    pub input: &'a Input<'a>,
    pub snap: &'a Snapshot,
    pub sysctls_of: &'a dyn Fn(u32) -> &'a BTreeMap<String, String>,
}

impl Facts<'_> {
    /// The catalogue's governors of `id`, quoted with their values in `netns`.
    pub fn governors(&self, id: FindingId, netns: u32) -> Vec<Governor> {
        id.entry()
            .governed_by
            .iter()
            .map(|g| match *g {
                Gov::Sysctl(n) => Governor {
                    name: n.to_string(),
                    value: (self.sysctls_of)(netns).get(n).cloned(),
                },
                Gov::Labeled(label, n) => Governor {
                    name: label.to_string(),
                    value: (self.sysctls_of)(netns).get(n).cloned(),
                },
                // Host-wide sysctls exist only in the initial namespace: whichever has them.
                Gov::HostSysctl(n) => Governor {
                    name: n.to_string(),
                    value: std::iter::once(netns)
                        .chain(std::iter::once(self.input.home_netns))
                        .chain(self.input.namespaces.iter().map(|ns| ns.inode))
                        .find_map(|ns| (self.sysctls_of)(ns).get(n).cloned()),
                },
                Gov::Code(what) => Governor {
                    name: what.to_string(),
                    value: None,
                },
            })
            .collect()
    }

    /// A finding of `id` in `netns`, its governors from the catalogue.
    #[allow(clippy::too_many_arguments)]
    pub fn finding(
        &self,
        id: FindingId,
        severity: Severity,
        netns: u32,
        what: String,
        cause: String,
        owner: Option<OwnerView>,
        count: u64,
        examples: Vec<String>,
    ) -> Finding {
        debug_assert!(id.entry().severities.contains(&severity), "{id} {severity}");
        Finding {
            id,
            severity,
            netns,
            what,
            cause,
            governed_by: self.governors(id, netns),
            owner,
            count,
            examples,
        }
    }
}

/// `local -> remote`, as examples are written.
pub fn tuple(local: &std::net::SocketAddr, remote: &std::net::SocketAddr) -> String {
    format!("{local} -> {remote}")
}
