//! The node API: attestation, SVID signing under the "only what you host"
//! rule, the trust bundle, and the registry's node side.

use std::sync::Arc;
use std::time::Duration;

use meshguard_ca_client::registry::convert;
use meshguard_ca_client::registry::proto::{self, node_api_server::NodeApi};
use meshguard_ca_client::svid;
use meshguard_common::spiffe::SpiffeId;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::attest::{AttestError, Evidence};
use crate::authority::{Bundle, IssuedSvid, now_unix};
use crate::csr::CsrKey;
use crate::server::{CaState, Standing, serial_hex};

/// Most SVIDs one request may ask for; a node with more workloads batches.
pub const MAX_BATCH: usize = 1000;
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_LEN: usize = 256;

pub struct NodeService {
    pub state: Arc<CaState>,
}

/// The refusal of a node credential that no longer stands, logged and
/// counted when it was superseded.
fn refusal(st: &CaState, node: &str, s: Standing) -> Status {
    if s == Standing::Removed {
        return Status::permission_denied(format!("node {node} was removed: attest again with a new join token"));
    }
    st.metrics.denied("stale_node_credential");
    tracing::warn!(%node, standing = ?s, "refused a superseded node credential: stolen, or left from an earlier membership");
    Status::permission_denied(format!(
        "this credential of node {node} was superseded (a newer one was issued): attest again with a new join token"
    ))
}

pub fn bundle_to_proto(b: &Bundle) -> proto::Bundle {
    proto::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        jwt_authorities_jwks: b.jwks.clone(),
        sequence: b.sequence,
    }
}

pub fn svid_to_proto(s: &IssuedSvid) -> proto::X509Svid {
    proto::X509Svid {
        spiffe_id: s.spiffe_id.to_string(),
        cert_chain: s.chain.iter().map(|c| c.to_vec()).collect(),
        expires_at: s.expires_at,
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

// === impl NodeService ===

impl NodeService {
    /// The calling node, from the SVID it presented in the TLS handshake
    /// (whose chain the handshake verified against the bundle), if that
    /// credential is its current or previous one.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        self.caller_credential(req).map(|(node, _)| node)
    }

    /// As [`Self::caller`], with the serial of the credential presented.
    fn caller_credential<T>(&self, req: &Request<T>) -> Result<(String, String), Status> {
        let (node, serial) = self.presented(req)?;
        match self.state.standing(&node, &serial) {
            Standing::Current | Standing::Previous => Ok((node, serial)),
            s => Err(refusal(&self.state, &node, s)),
        }
    }

    /// The node named by the presented SVID, and that SVID's serial.
    fn presented<T>(&self, req: &Request<T>) -> Result<(String, String), Status> {
        let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("a node SVID is required: attest first"))?;
        let leaf_der = certs.first().ok_or_else(|| Status::unauthenticated("a node SVID is required: attest first"))?;
        let leaf = svid::check_leaf(leaf_der).map_err(|e| Status::unauthenticated(e.to_string()))?;
        // A long-lived connection must not outlive the certificate it was opened with.
        if leaf.not_after <= now_unix() {
            return Err(Status::unauthenticated("node SVID expired: attest again with a new join token"));
        }
        let st = &self.state;
        let node = match leaf.spiffe_id.node_name() {
            Some(n) if leaf.spiffe_id.is_member_of(st.ca.trust_domain()) => n.to_owned(),
            _ => return Err(Status::permission_denied(format!("{} is not a node identity of this trust domain", leaf.spiffe_id))),
        };
        if !st.is_attested(&node) {
            return Err(Status::permission_denied(format!("node {node} was removed: attest again with a new join token")));
        }
        let serial = serial_hex(leaf_der).map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok((node, serial))
    }

    fn deny(&self, node: &str, id: &str, reason: &'static str, msg: String) -> Status {
        self.state.metrics.denied(reason);
        tracing::warn!(%node, spiffe_id = %id, reason, "refused an SVID request");
        Status::permission_denied(msg)
    }

    /// Checks that `node` may hold `id_str`; returns the parsed ID.
    fn authorize(&self, node: &str, id_str: &str) -> Result<SpiffeId, Status> {
        let st = &self.state;
        let id = SpiffeId::parse(id_str).map_err(|e| {
            st.metrics.denied("bad_request");
            Status::invalid_argument(format!("invalid SPIFFE ID {id_str:?}: {e}"))
        })?;
        if !id.is_member_of(st.ca.trust_domain()) {
            return Err(self.deny(node, id_str, "wrong_trust_domain", format!("{id} is not in trust domain {}", st.ca.trust_domain())));
        }
        if id.workload_parts().is_none() {
            return Err(self.deny(node, id_str, "not_a_workload", format!("{id} is not a workload identity")));
        }
        if !st.registry.hosts(node, &id) {
            return Err(self.deny(node, id_str, "not_hosted", format!("node {node} hosts no workload with identity {id}")));
        }
        Ok(id)
    }

    async fn sign(&self, pairs: Vec<(SpiffeId, CsrKey)>, ttl: Duration, node: String) -> Result<Vec<IssuedSvid>, Status> {
        let ca = self.state.clone();
        tokio::task::spawn_blocking(move || ca.ca.sign_x509(&pairs, ttl, &node)).await.map_err(internal)?.map_err(internal)
    }
}

#[tonic::async_trait]
impl NodeApi for NodeService {
    async fn attest_node(&self, req: Request<proto::AttestNodeRequest>) -> Result<Response<proto::AttestNodeResponse>, Status> {
        let st = &self.state;
        let Ok(_permit) = st.attestations.clone().try_acquire_owned() else {
            st.metrics.overloaded("attestations_full");
            tracing::warn!("too many node attestations in progress; refused");
            return Err(Status::resource_exhausted("too many node attestations in progress; retry shortly"));
        };
        let r = req.into_inner();
        // Check the CSR first, so a bad one does not burn the token.
        let key = CsrKey::parse(&r.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let evidence = match r.evidence {
            Some(proto::attest_node_request::Evidence::JoinToken(t)) => Evidence::JoinToken(t),
            Some(proto::attest_node_request::Evidence::K8sSaToken(t)) => Evidence::K8sServiceAccountToken(t),
            None => return Err(Status::invalid_argument("attestation evidence is missing: send a join token")),
        };
        let mut result = Err(AttestError::Unsupported);
        for a in &st.attestors {
            result = a.attest(&evidence).await;
            if !matches!(result, Err(AttestError::Unsupported)) {
                break;
            }
        }
        let attested = match result {
            Ok(a) => a,
            Err(e) => {
                let reason = match &e {
                    AttestError::Refused { reason } => *reason,
                    _ => "error",
                };
                st.metrics.attested("any", "refused");
                tracing::warn!(reason, error = %e, "refused a node attestation");
                return Err(match e {
                    AttestError::Malformed { .. } => Status::invalid_argument(e.to_string()),
                    AttestError::Unsupported => Status::unimplemented(e.to_string()),
                    AttestError::Store(_) | AttestError::Review { .. } => Status::unavailable(e.to_string()),
                    AttestError::Refused { .. } => Status::permission_denied(e.to_string()),
                });
            }
        };
        let id = st.ca.trust_domain().node_id(&attested.node_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = st.ca.lifetimes().node_svid;
        let svid = self.sign(vec![(id.clone(), key)], ttl, attested.node_name.clone()).await?.remove(0);
        let serial = serial_hex(svid.chain[0].as_ref()).map_err(internal)?;
        st.record_attestation(&attested.node_name, &id, svid.expires_at, attested.method, &serial).map_err(internal)?;
        st.metrics.attested(attested.method, "ok");
        st.metrics.issued("node", 1);
        tracing::info!(node = %attested.node_name, method = attested.method, spiffe_id = %id, "attested a node");
        Ok(Response::new(proto::AttestNodeResponse { svid: Some(svid_to_proto(&svid)), bundle: Some(bundle_to_proto(&st.ca.bundle())) }))
    }

    async fn renew_node_svid(&self, req: Request<proto::RenewNodeSvidRequest>) -> Result<Response<proto::RenewNodeSvidResponse>, Status> {
        // Only the credential issued last renews: a thief who renews first
        // supersedes it, and the node's own renewal then fails (detected).
        let (node, presented) = self.presented(&req)?;
        let st = &self.state;
        match st.standing(&node, &presented) {
            Standing::Current => {}
            s => return Err(refusal(st, &node, s)),
        }
        let key = CsrKey::parse(&req.get_ref().csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = st.ca.trust_domain().node_id(&node).map_err(internal)?;
        let svid = self.sign(vec![(id.clone(), key)], st.ca.lifetimes().node_svid, node.clone()).await?.remove(0);
        let serial = serial_hex(svid.chain[0].as_ref()).map_err(internal)?;
        if !st.record_renewal(&node, svid.expires_at, &presented, &serial).map_err(internal)? {
            return Err(refusal(st, &node, Standing::Superseded));
        }
        st.metrics.issued("node", 1);
        Ok(Response::new(proto::RenewNodeSvidResponse { svid: Some(svid_to_proto(&svid)) }))
    }

    async fn sign_workload_svids(
        &self,
        req: Request<proto::SignWorkloadSvidsRequest>,
    ) -> Result<Response<proto::SignWorkloadSvidsResponse>, Status> {
        let node = self.caller(&req)?;
        let reqs = req.into_inner().requests;
        if reqs.is_empty() {
            return Err(Status::invalid_argument("no SVIDs requested"));
        }
        if reqs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!("{} SVIDs requested; at most {MAX_BATCH} per call", reqs.len())));
        }
        // Which pods a node hosts is known from the API server only once
        // the mirrors run, and they wait for the numbers: until then the
        // registry's workloads are whatever the store last held (a restored
        // backup's, say), and a node could get SVIDs for pods it no longer hosts.
        if let Some(problem) = self.state.numbers_problem() {
            self.state.metrics.denied("numbers_not_adopted");
            return Err(Status::unavailable(format!("identity-ca cannot issue workload SVIDs yet: {problem}")));
        }
        let ids = reqs.iter().map(|r| self.authorize(&node, &r.spiffe_id)).collect::<Result<Vec<_>, _>>()?;
        let n = ids.len() as u64;
        // Checking a CSR is an ECDSA verification (~50 µs; a full batch,
        // tens of ms): off the async workers, with the signing, so the watch
        // streams and other calls keep moving.
        let st = self.state.clone();
        let ttl = st.ca.lifetimes().svid;
        let svids = tokio::task::spawn_blocking(move || {
            let mut pairs = Vec::with_capacity(reqs.len());
            for (i, (r, id)) in reqs.iter().zip(ids).enumerate() {
                let key = CsrKey::parse(&r.csr).map_err(|e| Status::invalid_argument(format!("request {i} ({}): {e}", r.spiffe_id)))?;
                pairs.push((id, key));
            }
            st.ca.sign_x509(&pairs, ttl, &node).map_err(internal)
        })
        .await
        .map_err(internal)??;
        self.state.metrics.issued("workload", n);
        Ok(Response::new(proto::SignWorkloadSvidsResponse { svids: svids.iter().map(svid_to_proto).collect() }))
    }

    async fn sign_jwt_svid(&self, req: Request<proto::SignJwtSvidRequest>) -> Result<Response<proto::SignJwtSvidResponse>, Status> {
        let node = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.authorize(&node, &r.spiffe_id)?;
        if r.audience.is_empty() || r.audience.len() > MAX_AUDIENCES {
            return Err(Status::invalid_argument(format!("give 1 to {MAX_AUDIENCES} audiences")));
        }
        if r.audience.iter().any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN) {
            return Err(Status::invalid_argument(format!("each audience must be 1 to {MAX_AUDIENCE_LEN} bytes")));
        }
        let max = self.state.ca.lifetimes().jwt_svid;
        let ttl = if r.ttl_seconds <= 0 { max } else { Duration::from_secs(r.ttl_seconds as u64).min(max) };
        let (token, expires_at) = self.state.ca.sign_jwt(&id, &r.audience, ttl).map_err(internal)?;
        self.state.metrics.issued("jwt", 1);
        Ok(Response::new(proto::SignJwtSvidResponse { token, expires_at }))
    }

    async fn get_bundle(&self, req: Request<proto::GetBundleRequest>) -> Result<Response<proto::Bundle>, Status> {
        self.caller(&req)?;
        Ok(Response::new(bundle_to_proto(&self.state.ca.bundle())))
    }

    async fn publish_node(&self, req: Request<proto::PublishNodeRequest>) -> Result<Response<proto::PublishNodeResponse>, Status> {
        let node = self.caller(&req)?;
        // On Kubernetes a node's record is the MeshNode object the admission
        // policy let its own agent write (mirrored into the registry); a
        // record published here would go around that policy.
        if self.state.on_kubernetes() {
            self.state.metrics.denied("publish_on_kubernetes");
            tracing::warn!(%node, "refused a node record published to the CA: on Kubernetes it is the node's MeshNode object");
            return Err(Status::failed_precondition(
                "on Kubernetes nodes publish MeshNode objects: the agent's cluster source must be the API server, not identity-ca",
            ));
        }
        let rec = req.into_inner().node.ok_or_else(|| Status::invalid_argument("node record is missing"))?;
        let rec = convert::node_from_proto(rec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if rec.name != node {
            return Err(self.deny(
                &node,
                &rec.name,
                "other_node",
                format!("node {node} may publish only its own record, not {}", rec.name),
            ));
        }
        let name = rec.name.clone();
        match self.state.registry.put_node(rec) {
            Ok(()) => Ok(Response::new(proto::PublishNodeResponse {})),
            Err(e @ crate::registry::RegistryError::Conflict { .. }) => {
                self.state.metrics.denied("conflicting_node_record");
                tracing::warn!(%node, record = %name, error = %e, "refused a node record that takes another node's range or key");
                Err(Status::already_exists(format!("node {node}'s record refused: {e}")))
            }
            Err(e) => Err(internal(e)),
        }
    }

    type WatchClusterStream = ReceiverStream<Result<proto::ClusterEvent, Status>>;

    async fn watch_cluster(&self, req: Request<proto::WatchClusterRequest>) -> Result<Response<Self::WatchClusterStream>, Status> {
        let (node, serial) = self.caller_credential(&req)?;
        let st = self.state.clone();
        // On Kubernetes the numbers are served only once they agree with
        // the MeshIdentity objects the nodes enforce: auth-handshake writes
        // the auth map by them. The caller retries.
        if let Some(why) = st.numbers_problem() {
            return Err(Status::unavailable(why));
        }
        let Some(slot) = st.watch_slot(&node) else {
            st.metrics.overloaded("watches_per_node");
            tracing::warn!(%node, "too many open watch streams for this node; refused");
            return Err(Status::resource_exhausted(format!(
                "node {node} already holds {} watch streams",
                crate::server::MAX_WATCHES_PER_NODE
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut shutdown = st.shutdown_rx();
        tokio::spawn(async move {
            // The place is held as long as the stream is.
            let _slot = slot;
            let (snap, mut events) = st.registry.watch();
            if tx.send(Ok(snap)).await.is_err() {
                return;
            }
            // The stream lives only as long as the credential it was opened
            // with stands: removal or a re-join ends it within a second.
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                    _ = check.tick() => {
                        match st.standing(&node, &serial) {
                            Standing::Current | Standing::Previous => continue,
                            s => {
                                let _ = tx.send(Err(refusal(&st, &node, s))).await;
                            }
                        }
                        tracing::info!(%node, "watch stream ended: its credential no longer stands");
                        return;
                    }
                };
                let msg = match ev {
                    Ok(ev) => (*ev).clone(),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Too far behind: start the watcher over from a snapshot.
                        let (snap, fresh) = st.registry.watch();
                        events = fresh;
                        snap
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
