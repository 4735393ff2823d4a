//! Numeric identities and node ids for the datapath.
//!
//! The kernel keys its maps by numbers, not SPIFFE IDs. The numbers must be
//! identical on every node and stable across restarts, and must never
//! collide — so they are allocated (not hashed) by the cluster view's source
//! and persisted there. A number, once given, is never reused: a packet or a
//! conntrack entry that outlives its identity cannot be mistaken for a new one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::policy::MeshPolicy;
use crate::spiffe::SpiffeId;

/// The first workload identity; below it the datapath reserves numbers
/// (0 = any, 1 = host, 2 = world).
pub const FIRST_IDENTITY: u32 = 256;
/// The first node id; 0 means "no node" in the datapath.
pub const FIRST_NODE_ID: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Allocations {
    #[serde(default)]
    pub identities: BTreeMap<SpiffeId, u32>,
    #[serde(default)]
    pub nodes: BTreeMap<String, u32>,
    /// The next numbers to hand out: kept, so removal never frees a number.
    #[serde(default = "first_identity")]
    pub next_identity: u32,
    #[serde(default = "first_node_id")]
    pub next_node_id: u32,
}

fn first_identity() -> u32 {
    FIRST_IDENTITY
}

fn first_node_id() -> u32 {
    FIRST_NODE_ID
}

/// What one [`Allocations::allocate_delta`] call added: the new numbers, so a
/// source that persists them record by record writes just these, and can
/// take them back when that write fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub identities: Vec<(SpiffeId, u32)>,
    pub nodes: Vec<(String, u32)>,
    /// The counters before the call (for [`Allocations::undo`]).
    prev_next: (u32, u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("numeric identities are exhausted")]
    Exhausted,
    #[error("allocations are inconsistent: {0}")]
    Corrupt(String),
}

impl Allocations {
    pub fn new() -> Self {
        Self { next_identity: FIRST_IDENTITY, next_node_id: FIRST_NODE_ID, ..Default::default() }
    }

    /// Checks the invariants a hand-edited or damaged file could break.
    pub fn validate(&self) -> Result<(), AllocError> {
        let mut seen = BTreeSet::new();
        for (id, n) in &self.identities {
            if *n < FIRST_IDENTITY || *n >= self.next_identity || !seen.insert(*n) {
                return Err(AllocError::Corrupt(format!("identity {id} has number {n}")));
            }
        }
        let mut seen = BTreeSet::new();
        for (node, n) in &self.nodes {
            if *n < FIRST_NODE_ID || *n >= self.next_node_id || !seen.insert(*n) {
                return Err(AllocError::Corrupt(format!("node {node} has id {n}")));
            }
        }
        Ok(())
    }

    /// Gives a number to everything in `ids` and `nodes` that has none.
    /// Returns whether anything was added.
    pub fn allocate<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a SpiffeId>,
        nodes: impl IntoIterator<Item = &'a String>,
    ) -> Result<bool, AllocError> {
        self.allocate_delta(ids, nodes).map(|d| !d.is_empty())
    }

    /// Gives a number to everything in `ids` and `nodes` that has none, and
    /// returns what it added. All or nothing: on error nothing changes.
    pub fn allocate_delta<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a SpiffeId>,
        nodes: impl IntoIterator<Item = &'a String>,
    ) -> Result<Delta, AllocError> {
        let mut delta = Delta { prev_next: (self.next_identity, self.next_node_id), ..Delta::default() };
        let r = (|| {
            for id in ids {
                if !self.identities.contains_key(id) {
                    let n = self.next_identity;
                    self.next_identity = n.checked_add(1).ok_or(AllocError::Exhausted)?;
                    self.identities.insert(id.clone(), n);
                    delta.identities.push((id.clone(), n));
                }
            }
            for node in nodes {
                if !self.nodes.contains_key(node) {
                    let n = self.next_node_id;
                    self.next_node_id = n.checked_add(1).ok_or(AllocError::Exhausted)?;
                    self.nodes.insert(node.clone(), n);
                    delta.nodes.push((node.clone(), n));
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok(delta),
            Err(e) => {
                self.undo(&delta);
                Err(e)
            }
        }
    }

    /// Takes back the numbers of the latest `delta` (its write failed), so
    /// they were never given out.
    pub fn undo(&mut self, delta: &Delta) {
        for (id, _) in &delta.identities {
            self.identities.remove(id);
        }
        for (node, _) in &delta.nodes {
            self.nodes.remove(node);
        }
        (self.next_identity, self.next_node_id) = delta.prev_next;
    }
}

// === impl Delta ===

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.nodes.is_empty()
    }
}

/// The SPIFFE IDs a policy's peers name explicitly (`spiffeId:`), which need
/// numbers even when no workload has them (yet).
pub fn policy_identities(p: &MeshPolicy) -> impl Iterator<Item = &SpiffeId> + '_ {
    let rules = p.spec.ingress.iter().flatten().chain(p.spec.egress.iter().flatten());
    rules.flat_map(|r| r.from.iter().flatten().chain(r.to.iter().flatten())).filter_map(|peer| peer.spiffe_id.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn numbers_are_stable_and_never_reused() {
        let mut a = Allocations::new();
        let web = id("spiffe://td/ns/shop/sa/web");
        let api = id("spiffe://td/ns/shop/sa/api");
        assert!(a.allocate([&web, &api], [&"node-1".to_owned()]).unwrap());
        let (w, p) = (a.identities[&web], a.identities[&api]);
        assert!(w >= FIRST_IDENTITY && p >= FIRST_IDENTITY && w != p);
        assert!(!a.allocate([&web], []).unwrap(), "nothing new");
        // Removing an identity does not free its number.
        a.identities.remove(&web);
        let db = id("spiffe://td/ns/shop/sa/db");
        a.allocate([&db], []).unwrap();
        assert!(a.identities[&db] > p);
        a.validate().unwrap();
    }

    #[test]
    fn a_delta_says_what_was_added_and_can_be_undone() {
        let mut a = Allocations::new();
        let web = id("spiffe://td/ns/shop/sa/web");
        a.allocate([&web], []).unwrap();
        let before = a.clone();
        let api = id("spiffe://td/ns/shop/sa/api");
        let d = a.allocate_delta([&web, &api, &api], [&"node-1".to_owned()]).unwrap();
        assert_eq!(d.identities, vec![(api.clone(), FIRST_IDENTITY + 1)], "duplicates and known ids are not new");
        assert_eq!(d.nodes, vec![("node-1".to_owned(), FIRST_NODE_ID)]);
        a.undo(&d);
        assert_eq!(a, before);
        // Exhaustion changes nothing.
        let mut full = Allocations { next_identity: u32::MAX, ..Allocations::new() };
        let snapshot = full.clone();
        assert_eq!(full.allocate_delta([&web, &api], []), Err(AllocError::Exhausted));
        assert_eq!(full, snapshot);
    }

    #[test]
    fn damaged_allocations_are_refused() {
        let mut a = Allocations::new();
        a.allocate([&id("spiffe://td/ns/a/sa/a"), &id("spiffe://td/ns/b/sa/b")], []).unwrap();
        let mut dup = a.clone();
        let first = *dup.identities.values().next().unwrap();
        for v in dup.identities.values_mut() {
            *v = first;
        }
        assert!(dup.validate().is_err());
        let mut low = a.clone();
        low.identities.values_mut().for_each(|v| *v = 3);
        assert!(low.validate().is_err());
    }
}
