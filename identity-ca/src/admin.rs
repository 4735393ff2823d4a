//! The admin API on the local unix socket: join tokens, listings, CA
//! rotation, and (standalone mode) workloads and policies (on Kubernetes
//! those are the API server's). The socket is 0600 in a 0700 directory, and
//! every call's peer credentials are checked: root or the CA's own user only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshguard_ca_client::registry::convert;
use meshguard_ca_client::registry::proto::{self, admin_api_client::AdminApiClient, admin_api_server::AdminApi};
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::validate_segment;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::authority::{Authority, AuthorityState, CaError};
use crate::node_api::bundle_to_proto;
use crate::registry::RegistryError;
use crate::server::CaState;

/// On Kubernetes the registry mirrors workloads and policies from the API
/// server: an admin write of them would be undone by the next relist, or
/// (a workload) give a node SVIDs no pod justifies.
const WORKLOADS_ON_KUBERNETES: &str =
    "on Kubernetes workloads are the API server's pods, which identity-ca mirrors: create or delete the pod instead";
const POLICIES_ON_KUBERNETES: &str =
    "on Kubernetes policies are MeshPolicy objects, which identity-ca mirrors: kubectl apply or kubectl delete meshpolicy instead";

pub struct AdminService {
    pub state: Arc<CaState>,
}

/// Refuses callers that are neither root nor `own_uid`.
pub fn check_peer(req: &Request<()>, own_uid: u32) -> Result<(), Status> {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| Status::permission_denied("admin API: caller credentials unknown"))?;
    if cred.uid() == 0 || cred.uid() == own_uid {
        Ok(())
    } else {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused an admin call");
        Err(Status::permission_denied("admin API is for root only"))
    }
}

/// A client for the admin socket at `path`.
pub async fn connect(path: &Path) -> Result<AdminApiClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://identity-ca.admin")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(AdminApiClient::new(channel)
        .max_decoding_message_size(meshguard_ca_client::registry::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(meshguard_ca_client::registry::MAX_MESSAGE_BYTES))
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::AlreadyPrepared { .. }
        | CaError::NothingPrepared
        | CaError::PreviousStillPresent { .. }
        | CaError::NothingToRetire
        | CaError::StillInUse { .. } => Status::failed_precondition(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

fn reg_status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        RegistryError::NotFound { .. } => Status::not_found(e.to_string()),
        RegistryError::Store(_) => Status::internal(e.to_string()),
        RegistryError::Alloc(_) => Status::resource_exhausted(e.to_string()),
        RegistryError::Conflict { .. } => Status::already_exists(e.to_string()),
        RegistryError::Disagree { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn authority_info(a: &Authority) -> proto::AuthorityInfo {
    proto::AuthorityInfo {
        id: a.id.clone(),
        state: match a.state {
            AuthorityState::Prepared => "prepared",
            AuthorityState::Active => "active",
            AuthorityState::Previous => "previous",
        }
        .into(),
        not_before: a.not_before,
        not_after: a.not_after,
        cert_der: a.cert_der.to_vec(),
    }
}

fn refused_on_kubernetes(st: &CaState, why: &'static str) -> Result<(), Status> {
    if st.on_kubernetes() { Err(Status::failed_precondition(why)) } else { Ok(()) }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn create_join_token(
        &self,
        req: Request<proto::CreateJoinTokenRequest>,
    ) -> Result<Response<proto::CreateJoinTokenResponse>, Status> {
        let r = req.into_inner();
        validate_segment(&r.node_name).map_err(|e| Status::invalid_argument(format!("node name {:?}: {e}", r.node_name)))?;
        let ttl = if r.ttl_seconds <= 0 { self.state.config.join_token_ttl } else { Duration::from_secs(r.ttl_seconds as u64) };
        let st = self.state.clone();
        let node = r.node_name.clone();
        let (token, expires_at) =
            blocking(move || st.tokens.create(&r.node_name, ttl).map_err(|e| Status::internal(e.to_string()))).await?;
        tracing::info!(%node, expires_at, "created a join token");
        Ok(Response::new(proto::CreateJoinTokenResponse { token, expires_at }))
    }

    async fn list_nodes(&self, _req: Request<proto::ListNodesRequest>) -> Result<Response<proto::ListNodesResponse>, Status> {
        let attested = self.state.attested_nodes();
        let view = self.state.registry.view();
        let mut names: Vec<&String> = attested.keys().chain(view.nodes.keys()).collect();
        names.sort();
        names.dedup();
        let nodes = names
            .into_iter()
            .map(|n| {
                let a = attested.get(n);
                proto::NodeInfo {
                    name: n.clone(),
                    spiffe_id: a.map(|a| a.spiffe_id.clone()).unwrap_or_default(),
                    attested_at: a.map(|a| a.attested_at).unwrap_or(0),
                    svid_expires_at: a.map(|a| a.svid_expires_at).unwrap_or(0),
                    record: view.nodes.get(n).map(convert::node_to_proto),
                    node_id: view.node_ids.get(n).copied().unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(proto::ListNodesResponse { nodes }))
    }

    async fn list_identities(
        &self,
        _req: Request<proto::ListIdentitiesRequest>,
    ) -> Result<Response<proto::ListIdentitiesResponse>, Status> {
        let td = self.state.ca.trust_domain().clone();
        let mut by_id: std::collections::BTreeMap<String, proto::IdentityInfo> = Default::default();
        let view = self.state.registry.view();
        for w in view.workloads.values() {
            let Ok(id) = w.spiffe_id(&td) else { continue };
            let number = view.identities.get(&id).copied().unwrap_or(0);
            let e = by_id.entry(id.to_string()).or_insert_with(|| proto::IdentityInfo {
                spiffe_id: id.to_string(),
                number,
                ..Default::default()
            });
            if !e.nodes.contains(&w.node) {
                e.nodes.push(w.node.clone());
            }
            e.workloads.push(w.key());
        }
        Ok(Response::new(proto::ListIdentitiesResponse { identities: by_id.into_values().collect() }))
    }

    async fn list_svids(&self, req: Request<proto::ListSvidsRequest>) -> Result<Response<proto::ListSvidsResponse>, Status> {
        let all = req.get_ref().include_expired;
        let st = self.state.clone();
        let list = blocking(move || st.ca.svids(all).map_err(ca_status)).await?;
        let svids = list
            .into_iter()
            .map(|(serial, r)| proto::SvidInfo {
                serial: hex::encode(serial),
                spiffe_id: r.spiffe_id,
                node: r.node,
                issued_at: r.issued_at,
                expires_at: r.expires_at,
                authority_id: r.authority_id,
            })
            .collect();
        Ok(Response::new(proto::ListSvidsResponse { svids }))
    }

    async fn get_bundle(&self, _req: Request<proto::GetBundleRequest>) -> Result<Response<proto::Bundle>, Status> {
        Ok(Response::new(bundle_to_proto(&self.state.ca.bundle())))
    }

    async fn list_authorities(
        &self,
        _req: Request<proto::ListAuthoritiesRequest>,
    ) -> Result<Response<proto::ListAuthoritiesResponse>, Status> {
        Ok(Response::new(proto::ListAuthoritiesResponse { authorities: self.state.ca.list().iter().map(|a| authority_info(a)).collect() }))
    }

    async fn prepare_authority(&self, _req: Request<proto::PrepareAuthorityRequest>) -> Result<Response<proto::AuthorityInfo>, Status> {
        let st = self.state.clone();
        // Observed in the blocking job: it commits even if this call is dropped.
        let a = blocking(move || {
            let r = st.ca.prepare().map_err(ca_status);
            st.metrics.observe_authorities(&st.ca.list());
            r
        })
        .await?;
        Ok(Response::new(authority_info(&a)))
    }

    async fn activate_authority(&self, _req: Request<proto::ActivateAuthorityRequest>) -> Result<Response<proto::AuthorityInfo>, Status> {
        let st = self.state.clone();
        // Observed in the blocking job: it commits even if this call is dropped.
        let a = blocking(move || {
            let r = st.ca.activate().map_err(ca_status);
            st.metrics.observe_authorities(&st.ca.list());
            r
        })
        .await?;
        Ok(Response::new(authority_info(&a)))
    }

    async fn retire_authority(&self, req: Request<proto::RetireAuthorityRequest>) -> Result<Response<proto::AuthorityInfo>, Status> {
        let force = req.get_ref().force;
        let st = self.state.clone();
        // Observed in the blocking job: it commits even if this call is dropped.
        let a = blocking(move || {
            let r = st.ca.retire(force).map_err(ca_status);
            st.metrics.observe_authorities(&st.ca.list());
            r
        })
        .await?;
        Ok(Response::new(authority_info(&a)))
    }

    async fn put_workload(&self, req: Request<proto::PutWorkloadRequest>) -> Result<Response<proto::PutWorkloadResponse>, Status> {
        refused_on_kubernetes(&self.state, WORKLOADS_ON_KUBERNETES)?;
        let w = req.into_inner().workload.ok_or_else(|| Status::invalid_argument("workload is missing"))?;
        let w = convert::workload_from_proto(w).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let st = self.state.clone();
        blocking(move || st.registry.put_workload(w).map_err(reg_status)).await?;
        Ok(Response::new(proto::PutWorkloadResponse {}))
    }

    async fn delete_workload(&self, req: Request<proto::DeleteWorkloadRequest>) -> Result<Response<proto::DeleteWorkloadResponse>, Status> {
        refused_on_kubernetes(&self.state, WORKLOADS_ON_KUBERNETES)?;
        let r = req.into_inner();
        let st = self.state.clone();
        blocking(move || st.registry.delete_workload(&format!("{}/{}", r.namespace, r.name)).map_err(reg_status)).await?;
        Ok(Response::new(proto::DeleteWorkloadResponse {}))
    }

    async fn list_workloads(&self, _req: Request<proto::ListWorkloadsRequest>) -> Result<Response<proto::ListWorkloadsResponse>, Status> {
        let workloads = self.state.registry.view().workloads.values().map(convert::workload_to_proto).collect();
        Ok(Response::new(proto::ListWorkloadsResponse { workloads }))
    }

    async fn put_policy(&self, req: Request<proto::PutPolicyRequest>) -> Result<Response<proto::PutPolicyResponse>, Status> {
        refused_on_kubernetes(&self.state, POLICIES_ON_KUBERNETES)?;
        let text = req.into_inner().yaml;
        // YAML is a superset of JSON, so one parser takes both; a
        // multi-document stream is applied in one transaction, all or none.
        let ps = MeshPolicy::all_from_yaml(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let Some(first) = ps.first() else { return Err(Status::invalid_argument("no MeshPolicy in the request")) };
        let (namespace, name) = (first.namespace().to_owned(), first.name().to_owned());
        let keys = ps.iter().map(MeshPolicy::key).collect();
        let st = self.state.clone();
        blocking(move || st.registry.put_policies(ps).map_err(reg_status)).await?;
        Ok(Response::new(proto::PutPolicyResponse { namespace, name, keys }))
    }

    async fn delete_policy(&self, req: Request<proto::DeletePolicyRequest>) -> Result<Response<proto::DeletePolicyResponse>, Status> {
        refused_on_kubernetes(&self.state, POLICIES_ON_KUBERNETES)?;
        let r = req.into_inner();
        let st = self.state.clone();
        blocking(move || st.registry.delete_policy(&format!("{}/{}", r.namespace, r.name)).map_err(reg_status)).await?;
        Ok(Response::new(proto::DeletePolicyResponse {}))
    }

    async fn list_policies(&self, _req: Request<proto::ListPoliciesRequest>) -> Result<Response<proto::ListPoliciesResponse>, Status> {
        let policies = self.state.registry.view().policies.values().map(convert::policy_to_proto).collect();
        Ok(Response::new(proto::ListPoliciesResponse { policies }))
    }

    async fn delete_node(&self, req: Request<proto::DeleteNodeRequest>) -> Result<Response<proto::DeleteNodeResponse>, Status> {
        let name = req.into_inner().name;
        let st = self.state.clone();
        if st.on_kubernetes() {
            // The record is the node's MeshNode (a registry delete would be
            // undone by the next relist); the attestation is the CA's own,
            // and forgetting it is how a node's credential is revoked.
            let record = st.registry.view().nodes.contains_key(&name);
            let n = name.clone();
            let was = blocking(move || st.forget_attestation(&n).map_err(|e| Status::internal(e.to_string()))).await?;
            if !was {
                let why = if record { "is not attested" } else { "is neither attested nor published" };
                return Err(Status::failed_precondition(format!(
                    "node {name} {why}; on Kubernetes its record is its MeshNode object: kubectl delete meshnode {name}"
                )));
            }
            tracing::info!(node = %name, "node attestation removed; on Kubernetes its record stays until its MeshNode is deleted");
            return Ok(Response::new(proto::DeleteNodeResponse {}));
        }
        let found = blocking(move || st.remove_node(&name).map_err(|e| Status::internal(e.to_string()))).await?;
        if !found {
            return Err(Status::not_found("no such node"));
        }
        Ok(Response::new(proto::DeleteNodeResponse {}))
    }

    async fn metrics(&self, _req: Request<proto::MetricsRequest>) -> Result<Response<proto::MetricsResponse>, Status> {
        Ok(Response::new(proto::MetricsResponse { text: self.state.metrics.render() }))
    }
}
