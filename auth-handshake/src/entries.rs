//! The auth entries this node holds: what each rests on, when it ends, and
//! the map the datapath reads. Pure bookkeeping and planning; the agent
//! ([`crate::mutual`]) applies the plan.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshguard_common::cluster::ClusterView;
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::{AuthPair, AuthTable, DatapathError};
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::handshake::{Authenticated, Directory};

/// (local identity, remote identity, remote node), by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub local: SpiffeId,
    pub remote: SpiffeId,
    pub remote_node: String,
}

/// Why an entry was deleted (the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Deletion {
    /// The local workload left this node (or the remote left its node).
    WorkloadLeft,
    /// The remote node is no longer in the cluster view.
    NodeRemoved,
    /// A certificate the proof rested on no longer chains to the bundle.
    AuthorityRetired,
    /// The local SVID's key changed and the proof could not be renewed.
    KeyChanged,
    Expired,
}

impl Deletion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WorkloadLeft => "workload_left",
            Self::NodeRemoved => "node_removed",
            Self::AuthorityRetired => "authority_retired",
            Self::KeyChanged => "key_changed",
            Self::Expired => "expired",
        }
    }
}

/// The datapath's auth map, behind a trait: the pinned map in production,
/// memory in tests.
pub trait AuthMap: Send {
    fn set(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError>;
    fn remove(&mut self, pair: AuthPair) -> Result<(), DatapathError>;
    /// Every pair in the map (to sweep what an earlier run left).
    fn pairs(&self) -> Result<Vec<AuthPair>, DatapathError>;
}

impl AuthMap for AuthTable {
    fn set(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError> {
        AuthTable::set(self, pair, expires)
    }

    fn remove(&mut self, pair: AuthPair) -> Result<(), DatapathError> {
        AuthTable::remove(self, pair)
    }

    fn pairs(&self) -> Result<Vec<AuthPair>, DatapathError> {
        Ok(self.entries()?.into_iter().map(|(p, _)| p).collect())
    }
}

/// An auth map in memory (tests, and nodes run without a datapath).
#[derive(Debug, Clone, Default)]
pub struct MemoryAuthMap(pub Arc<Mutex<BTreeMap<AuthPair, SystemTime>>>);

impl AuthMap for MemoryAuthMap {
    fn set(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError> {
        self.0.lock().insert(pair, expires);
        Ok(())
    }

    fn remove(&mut self, pair: AuthPair) -> Result<(), DatapathError> {
        self.0.lock().remove(&pair);
        Ok(())
    }

    fn pairs(&self) -> Result<Vec<AuthPair>, DatapathError> {
        Ok(self.0.lock().keys().copied().collect())
    }
}

/// One live entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub proof: Authenticated,
    /// The numbers written to the map.
    pub pair: AuthPair,
    /// Unix seconds when it was proved; renewed two thirds of the way to expiry.
    pub proved_at: i64,
}

/// What should happen to the entries now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<(PairKey, Deletion)>,
    /// Re-prove now: near expiry, or the local SVID changed.
    pub renew: Vec<PairKey>,
}

/// Every live entry of this node.
#[derive(Default)]
pub struct Book {
    entries: BTreeMap<PairKey, Entry>,
}

/// Numbers of identities and nodes, from the cluster view.
pub fn numeric(view: &ClusterView, key: &PairKey) -> Option<AuthPair> {
    Some(AuthPair {
        local_identity: *view.identities.get(&key.local)?,
        remote_identity: *view.identities.get(&key.remote)?,
        remote_node: *view.node_ids.get(&key.remote_node)?,
    })
}

pub fn unix_to_system(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}

// === impl PairKey ===

impl PairKey {
    pub fn of(a: &Authenticated) -> Self {
        Self { local: a.local.clone(), remote: a.remote.clone(), remote_node: a.remote_node.clone() }
    }
}

// === impl Book ===

impl Book {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &PairKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &PairKey> {
        self.entries.keys()
    }

    /// Whether `key` has an entry that lives at least `margin` longer.
    pub fn is_fresh(&self, key: &PairKey, now: i64, margin: i64) -> bool {
        self.entries.get(key).is_some_and(|e| e.proof.expires_at > now + margin)
    }

    /// Records a proof and writes it to `map`; returns whether it replaced one.
    pub fn insert(&mut self, proof: Authenticated, pair: AuthPair, now: i64, map: &mut dyn AuthMap) -> Result<bool, DatapathError> {
        let key = PairKey::of(&proof);
        if let Some(old) = self.entries.get(&key)
            && old.pair != pair
        {
            map.remove(old.pair)?;
        }
        map.set(pair, unix_to_system(proof.expires_at))?;
        Ok(self.entries.insert(key, Entry { proof, pair, proved_at: now }).is_some())
    }

    /// Deletes an entry from the book and `map`.
    pub fn remove(&mut self, key: &PairKey, map: &mut dyn AuthMap) -> Result<Option<Entry>, DatapathError> {
        match self.entries.remove(key) {
            Some(e) => {
                map.remove(e.pair)?;
                Ok(Some(e))
            }
            None => Ok(None),
        }
    }

    /// Re-writes every entry into `map` (a map opened after entries were proved).
    pub fn write_all(&self, map: &mut dyn AuthMap) -> Result<(), DatapathError> {
        for e in self.entries.values() {
            map.set(e.pair, unix_to_system(e.proof.expires_at))?;
        }
        Ok(())
    }

    /// Plans deletions and renewals against the current directory and view:
    /// delete what rests on a placement, node or authority that is gone, or
    /// has expired; renew two thirds of the way to expiry, and at once when
    /// this node's workload or node SVID changed (`node_chain`: the one
    /// presented now). `bundle_changed`: re-check every chain.
    pub fn plan(&self, dir: &Directory, view: &ClusterView, node_chain: &Arc<Vec<Vec<u8>>>, now: i64, bundle_changed: bool) -> Plan {
        let mut plan = Plan::default();
        let mut verified: BTreeMap<*const Vec<Vec<u8>>, bool> = BTreeMap::new();
        let when = UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64));
        for (key, e) in &self.entries {
            let reason = if !view.nodes.contains_key(&key.remote_node) && key.remote_node != dir.node {
                Some(Deletion::NodeRemoved)
            } else if !dir.places(&key.local, &dir.node) || !dir.places(&key.remote, &key.remote_node) {
                Some(Deletion::WorkloadLeft)
            } else if e.proof.expires_at <= now {
                Some(Deletion::Expired)
            } else if bundle_changed
                && !e.proof.chains.iter().all(|c| {
                    *verified.entry(Arc::as_ptr(c)).or_insert_with(|| {
                        let ders: Vec<CertificateDer<'_>> = c.iter().map(|d| CertificateDer::from(d.as_slice())).collect();
                        dir.bundle.verify(&ders, when).is_ok()
                    })
                })
            {
                Some(Deletion::AuthorityRetired)
            } else {
                None
            };
            if let Some(r) = reason {
                plan.delete.push((key.clone(), r));
                continue;
            }
            let key_changed = dir.keys.get(&key.local).is_some_and(|k| k.chain != e.proof.chains[0]) || *node_chain != e.proof.chains[2];
            let due = e.proved_at + (e.proof.expires_at - e.proved_at) * 2 / 3;
            if key_changed || now >= due {
                plan.renew.push(key.clone());
            }
        }
        plan
    }

    /// Whether the entry rests on a local SVID other than the one held now.
    pub fn key_changed(&self, key: &PairKey, dir: &Directory) -> bool {
        self.entries.get(key).is_some_and(|e| dir.keys.get(&key.local).is_some_and(|k| k.chain != e.proof.chains[0]))
    }
}
