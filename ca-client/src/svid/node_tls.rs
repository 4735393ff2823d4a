//! identity-ca's node API, from a second process on the node.
//!
//! auth-handshake attests the node and keeps the node SVID renewed in its
//! node credential file ([`super::node_file`]). Another process that must
//! speak for the node — wg-agent publishing the node's WireGuard key, which
//! only the node's own SVID may do — builds its TLS client configuration
//! from that file with [`NodeTls`], and follows the renewals: the file is
//! polled (metadata only, every second by default) and a renewed credential
//! is installed for the next connection. It never writes the file: one
//! writer (auth-handshake), any number of readers.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use meshguard_common::cluster::ClusterSource as _;
//! use meshguard_ca_client::registry::{self, RegistrySource};
//! use meshguard_common::spiffe::TrustDomain;
//! use meshguard_ca_client::svid::node_tls::{DEFAULT_POLL_INTERVAL, NodeTls};
//!
//! let td = TrustDomain::new("cluster.local")?;
//! let tls = NodeTls::follow(
//!     "/var/lib/meshguard/auth-handshake/node-svid.json".as_ref(),
//!     "/etc/meshguard/bundle.pem".as_ref(),
//!     &td,
//!     DEFAULT_POLL_INTERVAL,
//! )?;
//! let channel = registry::channel("10.0.0.1:8443", tls.client_config())?;
//! let source = RegistrySource::start(channel.clone());
//! # let record: meshguard_common::cluster::NodeRecord = todo!();
//! source.publish_node(&record).await?; // as node `tls.node_name()`
//! // After a CA rotation, follow the CA's bundle (auth-handshake does the same):
//! tls.refresh_bundle(channel).await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::node_file::{self, NodeCredential, NodeFileError};
use super::{BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
use crate::registry::{self, CA_SERVER_PATH, proto};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};

/// How often the credential and bundle files are checked for a change: a
/// `stat` each, and renewals happen at half-life (30 minutes by default),
/// so a second is plenty and costs nothing.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeTlsError {
    #[error(transparent)]
    File(#[from] NodeFileError),
    #[error("node credential file {path} holds {id}, which is not a node identity of trust domain {trust_domain}; check trustDomain")]
    NotANodeIdentity { path: String, id: String, trust_domain: String },
    #[error("the node SVID in {path} expired at {expires_at} (unix seconds): auth-handshake renews it at half-life; is it running?")]
    Expired { path: String, expires_at: i64 },
    #[error("the node SVID in {path} is unusable: {reason}")]
    Unusable { path: String, reason: String },
    #[error("trust bundle file {path} is unusable: {reason}; use the PEM from `identity-ca bundle show`")]
    Bundle { path: String, reason: String },
    #[error("tls setup failed: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("identity-ca refused the bundle request: {message}")]
    Refused { message: String },
}

/// The node credential in use, without its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub spiffe_id: SpiffeId,
    pub node: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A TLS client configuration for identity-ca that presents the node SVID
/// from auth-handshake's node credential file and accepts only the CA's own
/// SVID (`spiffe://<td>/meshguard/identity-ca`) chained to the bundle.
pub struct NodeTls {
    config: Arc<rustls::ClientConfig>,
    creds: CredentialCell,
    bundle: BundleCell,
    identity: watch::Receiver<NodeIdentity>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// What the follower needs to re-read the files.
struct Files {
    credentials: PathBuf,
    trust_bundle: PathBuf,
    trust_domain: TrustDomain,
}

/// Identifies one version of a file: atomic replacement makes a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    modified: Option<SystemTime>,
    inode: u64,
    len: u64,
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

// === impl NodeTls ===

impl NodeTls {
    /// Reads and checks the node credential file and the trust bundle (PEM),
    /// and builds the configuration. Does not follow renewals: see
    /// [`NodeTls::follow`]. Fails with a clear error when the file is
    /// missing, malformed, not a node identity of `trust_domain`, expired,
    /// or its key does not match its certificate.
    pub fn load(credentials: &Path, trust_bundle: &Path, trust_domain: &TrustDomain) -> Result<Self, NodeTlsError> {
        let files =
            Files { credentials: credentials.to_owned(), trust_bundle: trust_bundle.to_owned(), trust_domain: trust_domain.clone() };
        let bundle = BundleCell::new(files.read_bundle()?);
        let cred = files.read_credential()?;
        let creds = CredentialCell::default();
        let identity = files.install(&creds, &cred)?;
        let ca_id = SpiffeId::new(trust_domain, CA_SERVER_PATH)
            .map_err(|e| NodeTlsError::Bundle { path: trust_bundle.display().to_string(), reason: e.to_string() })?;
        let verifier = Arc::new(SpiffeVerifier::exactly(bundle.clone(), ca_id));
        let config = super::client_config(creds.clone(), verifier).map_err(|source| NodeTlsError::Tls { source })?;
        let (_, rx) = watch::channel(identity);
        Ok(Self { config: Arc::new(config), creds, bundle, identity: rx, task: None })
    }

    /// [`NodeTls::load`], then checks both files every `poll` and installs
    /// a renewed credential (or a changed bundle) as soon as it appears. A
    /// file that turns bad or goes away is reported once and the last good
    /// version kept. Must run inside a tokio runtime.
    pub fn follow(credentials: &Path, trust_bundle: &Path, trust_domain: &TrustDomain, poll: Duration) -> Result<Self, NodeTlsError> {
        // The versions before reading, so a change made meanwhile is not missed.
        let seen = (version(credentials), version(trust_bundle));
        let mut this = Self::load(credentials, trust_bundle, trust_domain)?;
        let files =
            Files { credentials: credentials.to_owned(), trust_bundle: trust_bundle.to_owned(), trust_domain: trust_domain.clone() };
        let (tx, rx) = watch::channel(this.identity.borrow().clone());
        this.identity = rx;
        this.task = Some(tokio::spawn(follow(files, seen, this.creds.clone(), this.bundle.clone(), tx, poll)));
        Ok(this)
    }

    /// For [`crate::registry::channel`]. Each new connection presents the
    /// credential current at that time.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    pub fn credentials(&self) -> &CredentialCell {
        &self.creds
    }

    pub fn bundle(&self) -> &BundleCell {
        &self.bundle
    }

    /// The credential in use; marked changed whenever a renewal is installed
    /// (e.g. to reconnect at once rather than at the CA's connection recycling).
    pub fn identity(&self) -> watch::Receiver<NodeIdentity> {
        self.identity.clone()
    }

    /// The node this credential speaks for.
    pub fn node_name(&self) -> String {
        self.identity.borrow().node.clone()
    }

    /// Replaces the trust bundle's authorities.
    pub fn set_bundle(&self, authorities: Vec<CertificateDer<'static>>) -> Result<(), NodeTlsError> {
        let td = self.bundle.get().trust_domain().clone();
        let b =
            X509Bundle::new(td, authorities).map_err(|e| NodeTlsError::Bundle { path: "<identity-ca>".into(), reason: e.to_string() })?;
        self.bundle.set(b);
        Ok(())
    }

    /// Fetches the CA's current bundle over `channel` and uses it, so a CA
    /// rotation does not strand this process with the bundle file's
    /// authorities (auth-handshake does the same every `bundleRefresh`).
    /// Returns the bundle's sequence number.
    pub async fn refresh_bundle(&self, channel: Channel) -> Result<u64, NodeTlsError> {
        let b = registry::node_client(channel)
            .get_bundle(proto::GetBundleRequest {})
            .await
            .map_err(|s| NodeTlsError::Refused { message: s.message().to_owned() })?
            .into_inner();
        if b.trust_domain != self.bundle.get().trust_domain().as_str() {
            return Err(NodeTlsError::Bundle {
                path: "<identity-ca>".into(),
                reason: format!("it is for trust domain {:?}", b.trust_domain),
            });
        }
        self.set_bundle(b.x509_authorities.into_iter().map(CertificateDer::from).collect())?;
        Ok(b.sequence)
    }
}

impl Drop for NodeTls {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("identity", &*self.identity.borrow()).field("bundle", &self.bundle.get()).finish()
    }
}

// === impl Files ===

impl Files {
    fn read_bundle(&self) -> Result<X509Bundle, NodeTlsError> {
        let bad = |reason: String| NodeTlsError::Bundle { path: self.trust_bundle.display().to_string(), reason };
        let pem = std::fs::read(&self.trust_bundle).map_err(|e| bad(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("no CERTIFICATE blocks".into()));
        }
        X509Bundle::new(self.trust_domain.clone(), certs).map_err(|e| bad(e.to_string()))
    }

    /// Loads the credential and checks that it is a live node identity of our trust domain.
    fn read_credential(&self) -> Result<NodeCredential, NodeTlsError> {
        let path = || self.credentials.display().to_string();
        let cred = node_file::load(&self.credentials)?;
        if cred.spiffe_id.node_name().is_none() || !cred.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(NodeTlsError::NotANodeIdentity {
                path: path(),
                id: cred.spiffe_id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if cred.expires_at <= now_unix() {
            return Err(NodeTlsError::Expired { path: path(), expires_at: cred.expires_at });
        }
        Ok(cred)
    }

    /// Installs `cred` (after checking its key matches its certificate).
    fn install(&self, creds: &CredentialCell, cred: &NodeCredential) -> Result<NodeIdentity, NodeTlsError> {
        let unusable = |e: rustls::Error| NodeTlsError::Unusable { path: self.credentials.display().to_string(), reason: e.to_string() };
        let chain: Vec<CertificateDer<'static>> = cred.chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
        let key = PrivateKeyDer::Pkcs8(cred.key_pkcs8.to_vec().into());
        let signer = super::provider().key_provider.load_private_key(key).map_err(unusable)?;
        rustls::sign::CertifiedKey::new(chain.clone(), signer).keys_match().map_err(unusable)?;
        creds.set(chain, &cred.key_pkcs8).map_err(unusable)?;
        let node = cred.spiffe_id.node_name().unwrap_or_default().to_owned();
        Ok(NodeIdentity { spiffe_id: cred.spiffe_id.clone(), node, expires_at: cred.expires_at })
    }
}

/// A `stat`: cheap enough to call from the runtime's threads once a second.
fn version(path: &Path) -> Option<FileVersion> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileVersion { modified: m.modified().ok(), inode: m.ino(), len: m.len() })
}

/// Polls both files; installs what changed and is good, keeps the rest.
async fn follow(
    files: Files,
    seen: (Option<FileVersion>, Option<FileVersion>),
    creds: CredentialCell,
    bundle: BundleCell,
    tx: watch::Sender<NodeIdentity>,
    poll: Duration,
) {
    let files = Arc::new(files);
    let (mut cred_seen, mut bundle_seen) = seen;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let v = version(&files.trust_bundle);
        if v != bundle_seen {
            bundle_seen = v;
            let f = files.clone();
            match tokio::task::spawn_blocking(move || f.read_bundle()).await {
                Ok(Ok(b)) => {
                    bundle.set(b);
                    tracing::info!(path = %files.trust_bundle.display(), "trust bundle file changed; using it");
                }
                Ok(Err(error)) => tracing::warn!(%error, "keeping the current trust bundle"),
                Err(_) => return,
            }
        }
        let v = version(&files.credentials);
        if v == cred_seen {
            continue;
        }
        cred_seen = v;
        let f = files.clone();
        let cred = match tokio::task::spawn_blocking(move || f.read_credential()).await {
            Ok(r) => r,
            Err(_) => return,
        };
        let installed = cred.and_then(|c| {
            if creds.get().is_some_and(|cur| cur.cert.first().map(|c| c.as_ref()) == c.chain.first().map(Vec::as_slice)) {
                return Ok(None);
            }
            files.install(&creds, &c).map(Some)
        });
        match installed {
            Ok(Some(id)) => {
                tracing::info!(spiffe_id = %id.spiffe_id, expires_at = id.expires_at, "picked up the renewed node SVID");
                tx.send_replace(id);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "keeping the current node SVID"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::svid::node_file::{NODE_SVID_FILE, save};
    use crate::svid::testing::{TestCa, node_credential, test_ca};

    struct Setup {
        _dir: tempfile::TempDir,
        cred: PathBuf,
        bundle: PathBuf,
        ca: TestCa,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = test_ca("td");
        let cred = dir.path().join(NODE_SVID_FILE);
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, ca.pem()).unwrap();
        Setup { cred, bundle, ca, _dir: dir }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    /// The certificate a TLS server sees from a client using `tls`.
    async fn presented(ca: &TestCa, tls: Arc<rustls::ClientConfig>) -> Vec<u8> {
        let server_id = SpiffeId::new(&ca.trust_domain, CA_SERVER_PATH).unwrap();
        let (chain, key, _) = ca.leaf(&server_id, 3600);
        let creds = CredentialCell::default();
        creds.set(chain, &key).unwrap();
        let bundle = BundleCell::new(X509Bundle::new(ca.trust_domain.clone(), vec![ca.cert.clone()]).unwrap());
        let server = crate::svid::server_config(creds, Arc::new(SpiffeVerifier::any_in_trust_domain(bundle))).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from(registry::TLS_SERVER_NAME).unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(tls).connect(name, c),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s)
        );
        let (_client, server) = (client.unwrap(), server.unwrap());
        server.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn presents_the_node_svid_and_picks_up_renewals() {
        let s = setup();
        let first = node_credential(&s.ca, "node-1", 3600);
        save(&s.cred, &first).unwrap();
        let tls = NodeTls::follow(&s.cred, &s.bundle, &td(), Duration::from_millis(20)).unwrap();
        assert_eq!(tls.node_name(), "node-1");
        assert_eq!(presented(&s.ca, tls.client_config()).await, first.chain[0]);

        // auth-handshake renews: the next connection presents the new SVID.
        let renewed = node_credential(&s.ca, "node-1", 7200);
        save(&s.cred, &renewed).unwrap();
        let mut id = tls.identity();
        tokio::time::timeout(Duration::from_secs(5), id.wait_for(|i| i.expires_at == renewed.expires_at)).await.unwrap().unwrap();
        assert_eq!(presented(&s.ca, tls.client_config()).await, renewed.chain[0]);

        // A bad write (or a deleted file) keeps the last good credential.
        std::fs::write(&s.cred, "{garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::remove_file(&s.cred).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(presented(&s.ca, tls.client_config()).await, renewed.chain[0]);
        // ...until a good one comes back.
        let again = node_credential(&s.ca, "node-1", 3600);
        save(&s.cred, &again).unwrap();
        tokio::time::timeout(Duration::from_secs(5), id.wait_for(|i| i.expires_at == again.expires_at)).await.unwrap().unwrap();
        assert_eq!(presented(&s.ca, tls.client_config()).await, again.chain[0]);
    }

    #[test]
    fn refuses_missing_garbage_foreign_expired_and_mismatched_credentials() {
        let s = setup();
        let err = |cred: &Path, bundle: &Path| NodeTls::load(cred, bundle, &td()).unwrap_err();
        let e = err(&s.cred, &s.bundle);
        assert!(matches!(e, NodeTlsError::File(NodeFileError::NotFound { .. })), "{e}");
        std::fs::write(&s.cred, "garbage").unwrap();
        assert!(matches!(err(&s.cred, &s.bundle), NodeTlsError::File(NodeFileError::Invalid { .. })));

        save(&s.cred, &node_credential(&s.ca, "node-1", -10)).unwrap();
        let e = err(&s.cred, &s.bundle);
        assert!(matches!(e, NodeTlsError::Expired { .. }) && e.to_string().contains("is it running"), "{e}");

        let workload = {
            let id = s.ca.trust_domain.workload_id("shop", "web").unwrap();
            let (chain, key, expires_at) = s.ca.leaf(&id, 3600);
            NodeCredential {
                spiffe_id: id,
                chain: chain.into_iter().map(|c| c.to_vec()).collect(),
                key_pkcs8: key,
                issued_at: 0,
                expires_at,
            }
        };
        save(&s.cred, &workload).unwrap();
        assert!(matches!(err(&s.cred, &s.bundle), NodeTlsError::NotANodeIdentity { .. }));
        let foreign = test_ca("other");
        save(&s.cred, &node_credential(&foreign, "node-1", 3600)).unwrap();
        assert!(matches!(err(&s.cred, &s.bundle), NodeTlsError::NotANodeIdentity { .. }));

        let mut mismatched = node_credential(&s.ca, "node-1", 3600);
        mismatched.key_pkcs8 = node_credential(&s.ca, "node-1", 3600).key_pkcs8;
        save(&s.cred, &mismatched).unwrap();
        let e = err(&s.cred, &s.bundle);
        assert!(matches!(e, NodeTlsError::Unusable { .. }), "{e}");

        save(&s.cred, &node_credential(&s.ca, "node-1", 3600)).unwrap();
        std::fs::write(&s.bundle, "not pem").unwrap();
        assert!(matches!(err(&s.cred, &s.bundle), NodeTlsError::Bundle { .. }));
        std::fs::remove_file(&s.bundle).unwrap();
        assert!(matches!(err(&s.cred, &s.bundle), NodeTlsError::Bundle { .. }));
    }

    /// A `tracing` writer that keeps everything written to it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_key_is_never_logged() {
        use base64::Engine as _;
        // The process-wide subscriber: a scoped one would miss events whose
        // callsites another test thread registered first.
        let logs = Captured::default();
        let w = logs.clone();
        let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || w.clone()).finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only test that sets a subscriber");
        let s = setup();
        let creds = [node_credential(&s.ca, "node-1", 3600), node_credential(&s.ca, "node-1", 7200)];
        save(&s.cred, &creds[0]).unwrap();
        let tls = NodeTls::follow(&s.cred, &s.bundle, &td(), Duration::from_millis(10)).unwrap();
        let shown = format!("{tls:?} {:?} {:?}", tls.credentials(), creds[0]);
        // A renewal, a torn file, a mismatched key: everything that logs.
        save(&s.cred, &creds[1]).unwrap();
        let mut id = tls.identity();
        tokio::time::timeout(Duration::from_secs(5), id.wait_for(|i| i.expires_at == creds[1].expires_at)).await.unwrap().unwrap();
        let text = std::fs::read_to_string(&s.cred).unwrap();
        std::fs::write(&s.cred, &text[..text.len() / 2]).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut bad = creds[1].clone();
        bad.key_pkcs8 = creds[0].key_pkcs8.clone();
        save(&s.cred, &bad).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("picked up the renewed node SVID"), "{logs}");
        assert!(logs.contains("keeping the current node SVID"), "{logs}");
        for c in &creds {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.key_pkcs8.as_slice());
            for (i, chunk) in b64.as_bytes().chunks(12).enumerate() {
                let chunk = std::str::from_utf8(chunk).unwrap();
                assert!(!logs.contains(chunk) && !shown.contains(chunk), "key chunk {i} appears in the logs or a Debug");
            }
        }
    }
}
