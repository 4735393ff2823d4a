//! Prometheus counters of what the CA issued and refused.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// By `kind`: node, workload, server, jwt.
    pub issued: Family<Labels, Counter>,
    /// By `reason`: not_hosted, wrong_trust_domain, not_a_workload, bad_request.
    pub denied: Family<Labels, Counter>,
    /// By `method` and `result`.
    pub attestations: Family<Labels, Counter>,
    /// Work refused to bound the CA's load, by `reason`: handshakes_full,
    /// handshakes_per_address, attestations_full, watches_per_node.
    pub overload: Family<Labels, Counter>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshguard_ca");
        let issued = Family::<Labels, Counter>::default();
        let denied = Family::<Labels, Counter>::default();
        let attestations = Family::<Labels, Counter>::default();
        let overload = Family::<Labels, Counter>::default();
        registry.register("svids_issued", "SVIDs signed, by kind", issued.clone());
        registry.register("authorization_denied", "SVID requests refused by authorization, by reason", denied.clone());
        registry.register("attestations", "Node attestations, by method and result", attestations.clone());
        registry.register("overload_refusals", "Connections and calls refused to bound the CA's load, by reason", overload.clone());
        Self { registry, issued, denied, attestations, overload }
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

/// Serves `/metrics` (any path, really) as plain HTTP/1.1 on `addr`.
pub async fn serve(addr: std::net::SocketAddr, metrics: std::sync::Arc<Metrics>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}
