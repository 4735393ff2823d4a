//! Prometheus counters of what the CA issued and refused, and the expiry of
//! its authorities, served by the shared telemetry server.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::authority::{Authority, AuthorityState};

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Arc<Registry>,
    /// By `kind`: node, workload, server, jwt.
    pub issued: Family<Labels, Counter>,
    /// By `reason`: not_hosted, wrong_trust_domain, not_a_workload, bad_request,
    /// stale_node_credential, conflicting_node_record, other_node; on
    /// Kubernetes also invalid_pod, invalid_policy, invalid_mesh_node and
    /// publish_on_kubernetes.
    pub denied: Family<Labels, Counter>,
    /// By `method` and `result`.
    pub attestations: Family<Labels, Counter>,
    /// Work refused to bound the CA's load, by `reason`: handshakes_full,
    /// handshakes_per_address, attestations_full, watches_per_node.
    pub overload: Family<Labels, Counter>,
    /// Unix time each authority's certificate expires, by `authority` and
    /// `state` (prepared, active, previous): what operators alert on.
    pub authority_expiry: Family<Labels, Gauge>,
    /// MeshIdentity objects found with a meaning other than the registry's
    /// allocation (never overwritten): the agents and the CA disagree on a number.
    pub k8s_identity_conflicts: Counter,
    /// The label sets `authority_expiry` holds now.
    authority_series: std::sync::Mutex<Vec<Labels>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        meshguard_common::telemetry::register_build_info(&mut root, "identity-ca");
        let registry = root.sub_registry_with_prefix("meshguard_ca");
        let issued = Family::<Labels, Counter>::default();
        let denied = Family::<Labels, Counter>::default();
        let attestations = Family::<Labels, Counter>::default();
        let overload = Family::<Labels, Counter>::default();
        let authority_expiry = Family::<Labels, Gauge>::default();
        let k8s_identity_conflicts = Counter::default();
        registry.register("svids_issued", "SVIDs signed, by kind", issued.clone());
        registry.register("authorization_denied", "SVID requests refused by authorization, by reason", denied.clone());
        registry.register("attestations", "Node attestations, by method and result", attestations.clone());
        registry.register("overload_refusals", "Connections and calls refused to bound the CA's load, by reason", overload.clone());
        registry.register(
            "authority_expiry_timestamp_seconds",
            "Unix time each signing authority's certificate expires, by authority and state",
            authority_expiry.clone(),
        );
        registry.register(
            "k8s_identity_conflicts",
            "MeshIdentity objects whose meaning differs from the number's allocation in the registry (never overwritten)",
            k8s_identity_conflicts.clone(),
        );
        Self {
            registry: Arc::new(root),
            issued,
            denied,
            attestations,
            overload,
            authority_expiry,
            k8s_identity_conflicts,
            authority_series: std::sync::Mutex::default(),
        }
    }

    /// The registry the telemetry server encodes.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Mirrors the authority set; call after anything changes it. Series
    /// are set before stale ones go, so a scrape never sees none.
    pub fn observe_authorities(&self, list: &[Arc<Authority>]) {
        // Held throughout: one update at a time.
        let mut seen = self.authority_series.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = Vec::new();
        for a in list {
            let state = match a.state {
                AuthorityState::Prepared => "prepared",
                AuthorityState::Active => "active",
                AuthorityState::Previous => "previous",
            };
            let l = labels(&[("authority", &a.id), ("state", state)]);
            self.authority_expiry.get_or_create(&l).set(a.not_after);
            current.push(l);
        }
        for old in seen.iter().filter(|l| !current.contains(l)) {
            self.authority_expiry.remove(old);
        }
        *seen = current;
    }

    pub fn issued(&self, kind: &str, n: u64) {
        self.issued.get_or_create(&labels(&[("kind", kind)])).inc_by(n);
    }

    pub fn denied(&self, reason: &str) {
        self.denied.get_or_create(&labels(&[("reason", reason)])).inc();
    }

    pub fn attested(&self, method: &str, result: &str) {
        self.attestations.get_or_create(&labels(&[("method", method), ("result", result)])).inc();
    }

    pub fn overloaded(&self, reason: &str) {
        self.overload.get_or_create(&labels(&[("reason", reason)])).inc();
    }

    pub fn denied_count(&self, reason: &str) -> u64 {
        self.denied.get_or_create(&labels(&[("reason", reason)])).get()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
