//! Prometheus metrics of the agent, served on `metricsAddress` by the
//! shared telemetry server: the handshakes' series, and the credential
//! expiry and CA sync gauges operators alert on.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::ca_client::{GrpcCa, now_unix};
use crate::entries::Deletion;
use crate::handshake::{Refusal, Role};
use crate::svids::SvidState;
use meshguard_common::spiffe::TrustDomain;

type Labels = Vec<(String, String)>;

/// Every series the agent keeps.
pub struct Metrics {
    /// By `result` (ok, refused), `reason` (a refusal reason, "" for ok) and
    /// `role` (initiator, responder, local, connection).
    pub handshakes: Family<Labels, Counter>,
    /// Initiator: from sending a request to writing the entry.
    pub handshake_seconds: Histogram,
    pub entries: Gauge,
    pub renewals: Counter,
    pub deletions: Family<Labels, Counter>,
    pub signals: Counter,
    /// Signals dropped because the view never named their identities or
    /// node within `HOLD`.
    pub signals_unresolved: Counter,
    /// From the datapath's auth-required signal to the entry in the map.
    pub signal_to_entry_seconds: Histogram,
    /// First packets held with a signal, by `result`: held, replayed,
    /// expired (no entry in time), overflow (over the bounds), failed.
    pub held_packets: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let handshakes = Family::<Labels, Counter>::default();
        let handshake_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        let entries = Gauge::default();
        let renewals = Counter::default();
        let deletions = Family::<Labels, Counter>::default();
        let signals = Counter::default();
        let signals_unresolved = Counter::default();
        let signal_to_entry_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        let held_packets = Family::<Labels, Counter>::default();
        Arc::new(Self {
            handshakes,
            handshake_seconds,
            entries,
            renewals,
            deletions,
            signals,
            signals_unresolved,
            signal_to_entry_seconds,
            held_packets,
        })
    }

    /// Registers every series (they are shared handles) into `r`.
    pub fn register(&self, r: &mut Registry) {
        let handshakes = self.handshakes.clone();
        let handshake_seconds = self.handshake_seconds.clone();
        let entries = self.entries.clone();
        let renewals = self.renewals.clone();
        let deletions = self.deletions.clone();
        let signals = self.signals.clone();
        let signals_unresolved = self.signals_unresolved.clone();
        let signal_to_entry_seconds = self.signal_to_entry_seconds.clone();
        let held_packets = self.held_packets.clone();
        r.register("meshguard_auth_handshakes", "Identity-pair proofs, by result, refusal reason and role.", handshakes.clone());
        r.register(
            "meshguard_auth_handshake_seconds",
            "Time from asking a peer for a proof to writing the entry.",
            handshake_seconds.clone(),
        );
        r.register("meshguard_auth_entries", "Live entries in the auth map written by this agent.", entries.clone());
        r.register("meshguard_auth_renewals", "Entries proved again before expiry or after a key change.", renewals.clone());
        r.register("meshguard_auth_deletions", "Entries deleted, by reason.", deletions.clone());
        r.register("meshguard_auth_signals", "Auth-required signals read from the datapath.", signals.clone());
        r.register(
            "meshguard_auth_signals_unresolved",
            "Auth-required signals dropped because the cluster view never named their identities or node in time.",
            signals_unresolved.clone(),
        );
        r.register(
            "meshguard_auth_signal_to_entry_seconds",
            "Time from a datapath signal to the entry it asked for.",
            signal_to_entry_seconds.clone(),
        );
        r.register(
            "meshguard_auth_held_packets",
            "Packets the datapath held with an auth-required signal, by what became of them.",
            held_packets,
        );
    }

    /// Everything the agent serves: build info, these series, and the
    /// credential gauges read from `svids` and `ca` at scrape time.
    pub fn registry(&self, svids: watch::Receiver<Arc<SvidState>>, ca: Arc<GrpcCa>) -> Registry {
        let mut r = Registry::default();
        meshguard_common::telemetry::register_build_info(&mut r, "auth-handshake");
        self.register(&mut r);
        r.register_collector(Box::new(Credentials { svids, ca }));
        r
    }

    pub fn ok(&self, role: &str) {
        self.handshakes.get_or_create(&labels(&[("result", "ok"), ("reason", ""), ("role", role)])).inc();
    }

    pub fn refused(&self, reason: Refusal, role: &str) {
        self.handshakes.get_or_create(&labels(&[("result", "refused"), ("reason", reason.as_str()), ("role", role)])).inc();
    }

    pub fn deleted(&self, why: Deletion) {
        self.deletions.get_or_create(&labels(&[("reason", why.as_str())])).inc();
    }

    pub fn held(&self, result: &str, n: u64) {
        self.held_packets.get_or_create(&labels(&[("result", result)])).inc_by(n);
    }

    /// The handshakes' series alone, as text (tests).
    pub fn encode(&self) -> String {
        let mut r = Registry::default();
        self.register(&mut r);
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &r);
        text
    }
}

pub fn role_str(r: Role) -> &'static str {
    match r {
        Role::Initiator => "initiator",
        Role::Responder => "responder",
    }
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Expiry and sync times, read when scraped.
struct Credentials {
    svids: watch::Receiver<Arc<SvidState>>,
    ca: Arc<GrpcCa>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Collector for Credentials {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let st = self.svids.borrow().clone();
        if let Some(node) = self.ca.node_svid() {
            ConstGauge::new(node.expires_at).encode(enc.encode_descriptor(
                "meshguard_auth_node_svid_expiry_timestamp_seconds",
                "Unix time this node's SVID (its credential towards identity-ca and peers) expires.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        let mut m = enc.encode_descriptor(
            "meshguard_auth_workload_svid_expiry_timestamp_seconds",
            "Unix time each hosted workload identity's X.509-SVID expires.",
            None,
            MetricType::Gauge,
        )?;
        for (id, svid) in &st.svids {
            ConstGauge::new(svid.expires_at).encode(m.encode_family(&labels(&[("spiffe_id", id.as_str())]))?)?;
        }
        let without = missing_svids(&st, self.ca.trust_domain(), now_unix());
        ConstGauge::new(without.len() as i64).encode(enc.encode_descriptor(
            "meshguard_auth_workloads_without_svid",
            "Workloads placed on this node without a valid SVID (none yet, or expired).",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(at) = st.synced_at {
            ConstGauge::new(at).encode(enc.encode_descriptor(
                "meshguard_auth_ca_last_sync_timestamp_seconds",
                "Unix time of the latest successful call to identity-ca (bundle or SVIDs).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// This node's workloads without a valid SVID (none yet, or expired).
fn missing_svids(svids: &SvidState, td: &TrustDomain, now: i64) -> Vec<String> {
    svids
        .workloads
        .iter()
        .filter_map(|w| w.spiffe_id(td).ok())
        .filter(|id| svids.svids.get(id).is_none_or(|s| s.expires_at <= now))
        .map(|id| id.to_string())
        .collect()
}

/// Ready when the node holds an unexpired SVID, identity-ca has answered,
/// and every workload placed here holds a valid SVID.
pub fn readiness(svids: &SvidState, ca: &GrpcCa) -> Result<(), Vec<String>> {
    check_ready(svids, ca.node_svid().map(|s| s.expires_at), ca.trust_domain(), now_unix())
}

fn check_ready(svids: &SvidState, node_expires_at: Option<i64>, td: &TrustDomain, now: i64) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    match node_expires_at {
        None => problems.push("no node SVID: not attested".to_owned()),
        Some(at) if at <= now => problems.push(format!("the node SVID expired at Unix time {at}")),
        Some(_) => {}
    }
    if svids.synced_at.is_none() {
        problems.push("no answer from identity-ca yet".to_owned());
    }
    let missing = missing_svids(svids, td, now);
    if !missing.is_empty() {
        problems.push(format!("{} workload(s) without a valid SVID: {}", missing.len(), missing.join(", ")));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use meshguard_common::cluster::Workload;

    use super::*;

    #[test]
    fn not_ready_says_why_for_each_missing_credential() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let web = Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec![],
            labels: Default::default(),
        };
        let mut st = SvidState { workloads: vec![web], ..Default::default() };
        let why = check_ready(&st, None, &td, 100).unwrap_err();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(
            why[0].contains("not attested") && why[1].contains("identity-ca") && why[2].contains("spiffe://cluster.local/ns/shop/sa/web")
        );
        st.synced_at = Some(100);
        let why = check_ready(&st, Some(100), &td, 100).unwrap_err();
        assert!(why.len() == 2 && why[0].contains("expired"), "{why:?}");
        st.workloads.clear();
        assert_eq!(check_ready(&st, Some(101), &td, 100), Ok(()));
    }
}
