//! Prometheus metrics of the handshake agent, served on `metricsAddress`
//! at `/metrics` (and `/healthz`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::entries::Deletion;
use crate::handshake::{Refusal, Role};

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
    registry: Registry,
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
        let mut r = Registry::default();
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
            held_packets.clone(),
        );
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
            registry: r,
        })
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

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
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

/// Serves `/metrics` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, metrics.encode()),
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
