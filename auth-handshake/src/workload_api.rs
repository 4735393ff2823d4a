//! The SPIFFE Workload API (upstream workload.proto) on a unix socket.
//!
//! Every call must carry the `workload.spiffe.io: true` metadata (the
//! standard's guard against SSRF-style proxying). The caller is identified
//! by the socket's peer credentials: its pid goes through the
//! [`CallerResolver`] to one of this node's workloads, and it gets that
//! workload's identity and nothing else.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use meshguard_common::cluster::Workload;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::ca_client::{CaClient, now_unix};
use crate::caller::CallerResolver;
use crate::peer_process::CallerInfo;
use crate::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use crate::proto::*;
use crate::svids::SvidState;

pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct WorkloadApi {
    pub trust_domain: TrustDomain,
    pub state: watch::Receiver<Arc<SvidState>>,
    pub resolver: Arc<dyn CallerResolver>,
    pub ca: Arc<dyn CaClient>,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.iter().flatten().copied().collect()
}

// === impl WorkloadApi ===

impl WorkloadApi {
    /// The calling workload, or PermissionDenied.
    fn caller<T>(&self, req: &Request<T>) -> Result<Workload, Status> {
        let peer = &req
            .extensions()
            .get::<CallerInfo>()
            .ok_or_else(|| Status::permission_denied("no identity issued: caller credentials unknown"))?
            .0;
        let st = self.state.borrow().clone();
        let Some(w) = self.resolver.resolve(peer.pid, &st.workloads) else {
            tracing::info!(pid = peer.pid, "workload API caller is not a workload of this node");
            return Err(Status::permission_denied("no identity issued"));
        };
        // Checked after resolving: the process that opened the connection
        // was still running, so its pid still named it when it was read.
        if !peer.alive() {
            tracing::warn!(pid = peer.pid, workload = %w.key(), "workload API connection outlived the process that opened it; refused");
            return Err(Status::permission_denied("no identity issued: the process that opened this connection has exited"));
        }
        Ok(w)
    }

    fn td_id(&self) -> String {
        self.trust_domain.id_string()
    }

    /// Streams `make(state)` whenever it changes, until the client goes away
    /// or `make` says the caller is gone.
    fn stream<T, F>(&self, make: F) -> Stream_<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&SvidState) -> Option<Result<T, Status>> + Send + 'static,
    {
        let mut rx = self.state.clone();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<T> = None;
            loop {
                let st = rx.borrow_and_update().clone();
                match make(&st) {
                    Some(Ok(msg)) if last.as_ref() != Some(&msg) => {
                        last = Some(msg.clone());
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {} // unchanged: nothing to send
                    Some(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    None => {} // nothing to send yet (SVID being fetched)
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(out))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream_<X509svidResponse>;

    async fn fetch_x509svid(&self, req: Request<X509svidRequest>) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let w = self.caller(&req)?;
        let key = w.key();
        let td = self.trust_domain.clone();
        tracing::debug!(workload = %key, "FetchX509SVID");
        Ok(Response::new(self.stream(move |st| {
            let Some(w) = st.workloads.iter().find(|x| x.key() == key) else {
                return Some(Err(Status::permission_denied("no identity issued: the workload is gone")));
            };
            let s = st.svid_for(w, &td)?;
            Some(Ok(X509svidResponse {
                svids: vec![X509svid {
                    spiffe_id: s.spiffe_id.to_string(),
                    x509_svid: concat(&s.chain),
                    x509_svid_key: s.key_pkcs8.to_vec(),
                    bundle: concat(&st.bundle.x509_authorities),
                    hint: String::new(),
                }],
                crl: Vec::new(),
                federated_bundles: HashMap::new(),
            }))
        })))
    }

    type FetchX509BundlesStream = Stream_<X509BundlesResponse>;

    async fn fetch_x509_bundles(&self, req: Request<X509BundlesRequest>) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        self.caller(&req)?;
        let td = self.td_id();
        Ok(Response::new(self.stream(move |st| {
            if st.bundle.x509_authorities.is_empty() {
                return None;
            }
            Some(Ok(X509BundlesResponse { crl: Vec::new(), bundles: [(td.clone(), concat(&st.bundle.x509_authorities))].into() }))
        })))
    }

    async fn fetch_jwtsvid(&self, req: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        let w = self.caller(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let id = w.spiffe_id(&self.trust_domain).map_err(|e| Status::internal(e.to_string()))?;
        if !r.spiffe_id.is_empty() && SpiffeId::parse(&r.spiffe_id).ok().as_ref() != Some(&id) {
            return Err(Status::permission_denied("no identity issued for the requested SPIFFE ID"));
        }
        let (token, _exp) = self.ca.sign_jwt(&id, &r.audience).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(JwtsvidResponse { svids: vec![Jwtsvid { spiffe_id: id.to_string(), svid: token, hint: String::new() }] }))
    }

    type FetchJWTBundlesStream = Stream_<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(&self, req: Request<JwtBundlesRequest>) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        self.caller(&req)?;
        let td = self.td_id();
        Ok(Response::new(self.stream(move |st| {
            if st.bundle.jwks.is_empty() {
                return None;
            }
            Some(Ok(JwtBundlesResponse { bundles: [(td.clone(), st.bundle.jwks.clone())].into() }))
        })))
    }

    async fn validate_jwtsvid(&self, req: Request<ValidateJwtsvidRequest>) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        self.caller(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let jwks = self.state.borrow().bundle.jwks.clone();
        let (id, claims) = crate::jwt::validate(&r.svid, &r.audience, &self.trust_domain, &jwks, now_unix())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse { spiffe_id: id.to_string(), claims: Some(to_struct(claims)) }))
    }
}

fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect() }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.into_iter().map(to_value).collect() }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
