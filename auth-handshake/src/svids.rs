//! Keeps the SVIDs of this node's workloads: follows the cluster view, asks
//! the CA for an SVID per identity hosted here, renews each at half-life,
//! refreshes the trust bundle, and publishes the result for the Workload API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meshguard_common::cluster::{ClusterView, Workload};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::ca_client::{CaBundle, CaClient, Svid, now_unix};

/// Most SVIDs asked for in one call (the CA's limit).
pub const BATCH: usize = 1000;

/// What the Workload API serves from.
#[derive(Clone, Default)]
pub struct SvidState {
    /// This node's workloads.
    pub workloads: Vec<Workload>,
    pub svids: BTreeMap<SpiffeId, Svid>,
    pub bundle: CaBundle,
    /// The latest successful call to identity-ca (bundle or SVIDs), Unix seconds.
    pub synced_at: Option<i64>,
}

impl SvidState {
    /// The SVID for `w`, if it has been issued.
    pub fn svid_for(&self, w: &Workload, td: &TrustDomain) -> Option<&Svid> {
        self.svids.get(&w.spiffe_id(td).ok()?)
    }
}

fn renew_at(s: &Svid) -> i64 {
    s.issued_at + (s.expires_at - s.issued_at) / 2
}

/// Runs until `tx` has no receivers.
pub async fn run(
    ca: Arc<dyn CaClient>,
    node: String,
    td: TrustDomain,
    mut view_rx: watch::Receiver<Arc<ClusterView>>,
    bundle_refresh: Duration,
    on_bundle: impl Fn(&CaBundle) + Send + 'static,
    tx: watch::Sender<Arc<SvidState>>,
) {
    let mut next_bundle = tokio::time::Instant::now();
    // After a failed CA call: jittered, growing pauses (meshguard_common::retry).
    let mut backoff = meshguard_common::retry::Backoff::default();
    loop {
        if tx.is_closed() {
            return;
        }
        let view = view_rx.borrow_and_update().clone();
        let mut st = (**tx.borrow()).clone();
        let mut failed = false;

        if tokio::time::Instant::now() >= next_bundle {
            match ca.bundle().await {
                Ok(b) => {
                    st.synced_at = Some(now_unix());
                    if b != st.bundle {
                        on_bundle(&b);
                        st.bundle = b;
                    }
                    next_bundle = tokio::time::Instant::now() + bundle_refresh;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot refresh the trust bundle");
                    failed = true;
                }
            }
        }

        st.workloads = view.workloads.values().filter(|w| w.node == node).cloned().collect();
        let wanted: BTreeSet<SpiffeId> = st.workloads.iter().filter_map(|w| w.spiffe_id(&td).ok()).collect();
        st.svids.retain(|id, _| wanted.contains(id));
        let now = now_unix();
        let need: Vec<SpiffeId> = wanted.iter().filter(|id| st.svids.get(*id).is_none_or(|s| now >= renew_at(s))).cloned().collect();
        for chunk in need.chunks(BATCH) {
            match ca.sign_workloads(chunk).await {
                Ok(svids) => {
                    st.synced_at = Some(now_unix());
                    for s in svids {
                        tracing::info!(spiffe_id = %s.spiffe_id, expires_at = s.expires_at, "workload SVID issued");
                        st.svids.insert(s.spiffe_id.clone(), s);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, count = chunk.len(), "cannot get workload SVIDs");
                    failed = true;
                }
            }
        }
        tx.send_replace(Arc::new(st));

        let snapshot = tx.borrow().clone();
        let next_renew = snapshot.svids.values().map(renew_at).min();
        let mut wait = next_bundle.saturating_duration_since(tokio::time::Instant::now());
        if let Some(at) = next_renew {
            wait = wait.min(Duration::from_secs((at - now_unix()).max(0) as u64));
        }
        if failed {
            wait = wait.min(backoff.next_delay());
        } else {
            backoff.reset();
        }
        tokio::select! {
            r = view_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
        }
    }
}
