//! Talking to identity-ca: attestation, the node SVID and its renewal, and
//! the signing calls, behind [`CaClient`] so the agent's logic can be
//! driven by a double.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use meshguard_ca_client::registry::{self, CA_SERVER_PATH, proto};
use meshguard_ca_client::svid::node_file::{self, NodeCredential, NodeFileError};
use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
use meshguard_common::cluster::BoxFuture;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// The node credential file in `stateDir` (format: [`node_file`]); other
/// processes on the node (wg-agent) read it to speak for the node.
pub const NODE_STATE_FILE: &str = node_file::NODE_SVID_FILE;

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("identity-ca refused: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("identity-ca sent an unusable {what}: {reason}")]
    BadResponse { what: &'static str, reason: String },
    #[error(
        "no valid node SVID and no join token: create one with `identity-ca token create --node {node}` and set joinToken (on Kubernetes: serviceAccountTokenFile)"
    )]
    NeedJoinToken { node: String },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NodeFile(#[from] NodeFileError),
    #[error("trust bundle file {path} is unusable: {reason}")]
    Bundle { path: String, reason: String },
    #[error("cannot make a key or CSR: {reason}")]
    Key { reason: String },
    #[error("tls setup failed: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
}

impl From<tonic::Status> for CaClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Refused { code: s.code(), message: s.message().to_owned() }
    }
}

/// An X.509-SVID and its private key.
#[derive(Clone)]
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Arc<Zeroizing<Vec<u8>>>,
    pub issued_at: i64,
    pub expires_at: i64,
}

/// The trust bundle as the CA serves it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaBundle {
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwks: Vec<u8>,
    pub sequence: u64,
}

/// The CA calls the agent makes once it holds a node SVID.
pub trait CaClient: Send + Sync {
    fn sign_workloads<'a>(&'a self, ids: &'a [SpiffeId]) -> BoxFuture<'a, Result<Vec<Svid>, CaClientError>>;
    fn sign_jwt<'a>(&'a self, id: &'a SpiffeId, audience: &'a [String]) -> BoxFuture<'a, Result<(String, i64), CaClientError>>;
    fn bundle(&self) -> BoxFuture<'_, Result<CaBundle, CaClientError>>;
}

/// The node's identity towards the CA, over one mutual-TLS channel.
pub struct GrpcCa {
    pub node: String,
    trust_domain: TrustDomain,
    creds: CredentialCell,
    bundle: BundleCell,
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    /// Replaced when the node SVID changes: the attestation connection
    /// carried no client certificate, and old connections the old one.
    channel: std::sync::RwLock<Channel>,
    state_file: PathBuf,
    node_svid: std::sync::RwLock<Option<Svid>>,
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn new_csr() -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CaClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaClientError::Key { reason: e.to_string() })?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key).map_err(|e| CaClientError::Key { reason: e.to_string() })?;
    Ok((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
}

fn svid_from_proto(p: Option<proto::X509Svid>, key: Zeroizing<Vec<u8>>) -> Result<Svid, CaClientError> {
    let p = p.ok_or(CaClientError::BadResponse { what: "svid", reason: "missing".into() })?;
    let spiffe_id = SpiffeId::parse(&p.spiffe_id).map_err(|e| CaClientError::BadResponse { what: "svid", reason: e.to_string() })?;
    let leaf = svid::check_leaf(p.cert_chain.first().map(Vec::as_slice).unwrap_or_default())
        .map_err(|e| CaClientError::BadResponse { what: "svid", reason: e.to_string() })?;
    if leaf.spiffe_id != spiffe_id {
        return Err(CaClientError::BadResponse { what: "svid", reason: "certificate names another identity".into() });
    }
    Ok(Svid { spiffe_id, chain: p.cert_chain, key_pkcs8: Arc::new(key), issued_at: now_unix(), expires_at: leaf.not_after })
}

/// Reads PEM certificates.
pub fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaClientError::Io { path: path.display().to_string(), source })?;
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            cur = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            let b = cur.take().unwrap_or_default();
            out.push(B64.decode(b).map_err(|e| CaClientError::Bundle { path: path.display().to_string(), reason: e.to_string() })?);
        } else if let Some(c) = cur.as_mut() {
            c.push_str(line);
        }
    }
    if out.is_empty() {
        return Err(CaClientError::Bundle { path: path.display().to_string(), reason: "no CERTIFICATE blocks".into() });
    }
    Ok(out)
}

fn x509_bundle(td: &TrustDomain, certs: &[Vec<u8>]) -> Result<X509Bundle, CaClientError> {
    X509Bundle::new(td.clone(), certs.iter().map(|c| CertificateDer::from(c.clone())).collect())
        .map_err(|e| CaClientError::Bundle { path: "<ca>".into(), reason: e.to_string() })
}

// === impl GrpcCa ===

impl GrpcCa {
    /// Sets up the channel to `addr`, trusting `initial_bundle` for the CA's
    /// own certificate (which must be `spiffe://<td>/meshguard/identity-ca`).
    pub fn new(
        trust_domain: TrustDomain,
        node: &str,
        addr: &str,
        initial_bundle: &[Vec<u8>],
        state_dir: &Path,
    ) -> Result<Self, CaClientError> {
        let bundle = BundleCell::new(x509_bundle(&trust_domain, initial_bundle)?);
        let ca_id = SpiffeId::new(&trust_domain, CA_SERVER_PATH).map_err(|e| CaClientError::Key { reason: e.to_string() })?;
        let creds = CredentialCell::default();
        let tls = svid::client_config(creds.clone(), Arc::new(SpiffeVerifier::exactly(bundle.clone(), ca_id)))
            .map_err(|source| CaClientError::Tls { source })?;
        let tls = Arc::new(tls);
        let channel = registry::channel(addr, tls.clone()).map_err(|e| CaClientError::Key { reason: e.to_string() })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| CaClientError::Io { path: state_dir.display().to_string(), source })?;
        Ok(Self {
            node: node.to_owned(),
            trust_domain,
            creds,
            bundle,
            addr: addr.to_owned(),
            tls,
            channel: std::sync::RwLock::new(channel),
            state_file: state_dir.join(NODE_STATE_FILE),
            node_svid: std::sync::RwLock::new(None),
        })
    }

    pub fn channel(&self) -> Channel {
        self.channel.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn client(&self) -> proto::node_api_client::NodeApiClient<Channel> {
        registry::node_client(self.channel())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn node_svid(&self) -> Option<Svid> {
        self.node_svid.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gets a node SVID: the saved one if still valid, else by attesting
    /// with `join_token` or the service-account token in `sa_token_file`.
    pub async fn ensure_node_svid(&self, join_token: Option<&str>, sa_token_file: Option<&Path>) -> Result<(), CaClientError> {
        if let Some(saved) = self.load_state()
            && saved.expires_at > now_unix() + 30
        {
            tracing::info!(node = %self.node, expires_at = saved.expires_at, "using the saved node SVID");
            return self.install(saved);
        }
        let (evidence, method) = match (sa_token_file, join_token) {
            (Some(path), _) => {
                let token =
                    std::fs::read_to_string(path).map_err(|source| CaClientError::Io { path: path.display().to_string(), source })?;
                (proto::attest_node_request::Evidence::K8sSaToken(token.trim().to_owned()), "a service-account token")
            }
            (None, Some(token)) => (proto::attest_node_request::Evidence::JoinToken(token.to_owned()), "a join token"),
            (None, None) => return Err(CaClientError::NeedJoinToken { node: self.node.clone() }),
        };
        let (key, csr) = new_csr()?;
        let req = proto::AttestNodeRequest { csr, evidence: Some(evidence) };
        let resp = self.client().attest_node(req).await?.into_inner();
        let svid = svid_from_proto(resp.svid, key)?;
        if svid.spiffe_id.node_name() != Some(self.node.as_str()) {
            return Err(CaClientError::BadResponse {
                what: "node svid",
                reason: format!("the token was made for {}, not {}", svid.spiffe_id, self.node),
            });
        }
        if let Some(b) = resp.bundle {
            self.bundle.set(x509_bundle(&self.trust_domain, &b.x509_authorities)?);
        }
        tracing::info!(node = %self.node, spiffe_id = %svid.spiffe_id, "attested with {method}");
        self.install(svid)
    }

    /// Renews the node SVID (at half-life).
    pub async fn renew_node_svid(&self) -> Result<(), CaClientError> {
        let (key, csr) = new_csr()?;
        let resp = self.client().renew_node_svid(proto::RenewNodeSvidRequest { csr }).await?.into_inner();
        let svid = svid_from_proto(resp.svid, key)?;
        self.install(svid)
    }

    /// When the node SVID should be renewed: half-way through its life.
    pub fn node_renew_at(&self) -> i64 {
        self.node_svid().map(|s| s.issued_at + (s.expires_at - s.issued_at) / 2).unwrap_or(0)
    }

    /// Keeps the verifier's bundle in step with the CA's.
    pub fn set_bundle(&self, b: &CaBundle) -> Result<(), CaClientError> {
        self.bundle.set(x509_bundle(&self.trust_domain, &b.x509_authorities)?);
        Ok(())
    }

    fn install(&self, svid: Svid) -> Result<(), CaClientError> {
        let chain = svid.chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
        self.creds.set(chain, &svid.key_pkcs8).map_err(|source| CaClientError::Tls { source })?;
        self.save_state(&svid)?;
        if let Ok(ch) = registry::channel(&self.addr, self.tls.clone()) {
            *self.channel.write().unwrap_or_else(|e| e.into_inner()) = ch;
        }
        *self.node_svid.write().unwrap_or_else(|e| e.into_inner()) = Some(svid);
        Ok(())
    }

    /// The node credential file this agent keeps.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    fn load_state(&self) -> Option<Svid> {
        match node_file::load(&self.state_file) {
            Ok(c) => Some(Svid {
                spiffe_id: c.spiffe_id,
                chain: c.chain,
                key_pkcs8: Arc::new(c.key_pkcs8),
                issued_at: c.issued_at,
                expires_at: c.expires_at,
            }),
            Err(NodeFileError::NotFound { .. }) => None,
            Err(error) => {
                tracing::warn!(%error, "ignoring the saved node SVID; attesting again");
                None
            }
        }
    }

    fn save_state(&self, svid: &Svid) -> Result<(), CaClientError> {
        let cred = NodeCredential {
            spiffe_id: svid.spiffe_id.clone(),
            chain: svid.chain.clone(),
            key_pkcs8: Zeroizing::new(svid.key_pkcs8.to_vec()),
            issued_at: svid.issued_at,
            expires_at: svid.expires_at,
        };
        Ok(node_file::save(&self.state_file, &cred)?)
    }
}

impl CaClient for GrpcCa {
    fn sign_workloads<'a>(&'a self, ids: &'a [SpiffeId]) -> BoxFuture<'a, Result<Vec<Svid>, CaClientError>> {
        Box::pin(async move {
            let mut keys = Vec::with_capacity(ids.len());
            let mut requests = Vec::with_capacity(ids.len());
            for id in ids {
                let (key, csr) = new_csr()?;
                keys.push(key);
                requests.push(proto::WorkloadSvidRequest { spiffe_id: id.to_string(), csr });
            }
            let resp = self.client().sign_workload_svids(proto::SignWorkloadSvidsRequest { requests }).await?.into_inner();
            if resp.svids.len() != ids.len() {
                return Err(CaClientError::BadResponse { what: "svid batch", reason: "wrong number of SVIDs".into() });
            }
            resp.svids.into_iter().zip(keys).map(|(p, k)| svid_from_proto(Some(p), k)).collect()
        })
    }

    fn sign_jwt<'a>(&'a self, id: &'a SpiffeId, audience: &'a [String]) -> BoxFuture<'a, Result<(String, i64), CaClientError>> {
        Box::pin(async move {
            let req = proto::SignJwtSvidRequest { spiffe_id: id.to_string(), audience: audience.to_vec(), ttl_seconds: 0 };
            let r = self.client().sign_jwt_svid(req).await?.into_inner();
            Ok((r.token, r.expires_at))
        })
    }

    fn bundle(&self) -> BoxFuture<'_, Result<CaBundle, CaClientError>> {
        Box::pin(async move {
            let b = self.client().get_bundle(proto::GetBundleRequest {}).await?.into_inner();
            Ok(CaBundle { x509_authorities: b.x509_authorities, jwks: b.jwt_authorities_jwks, sequence: b.sequence })
        })
    }
}

/// Sleeps until the unix time `at` (at least 100 ms, to avoid spinning).
pub async fn sleep_until_unix(at: i64) {
    let secs = (at - now_unix()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(secs).max(Duration::from_millis(100))).await;
}
