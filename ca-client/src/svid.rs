//! X.509-SVID verification exactly as the SPIFFE X509-SVID standard says, and
//! the rustls verifiers and TLS configurations built on it.
//!
//! A leaf SVID has exactly one URI SAN holding a valid SPIFFE ID with a
//! non-empty path, is not a CA, has `digitalSignature` and neither
//! `keyCertSign` nor `cRLSign`. Every signing certificate is a CA with
//! `keyCertSign`. The chain must lead to one of the trust domain's X.509
//! authorities (the bundle) and be valid at the time of use. Hostnames play
//! no part: peers are named by SPIFFE ID.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use meshguard_common::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

pub mod node_file;
pub mod node_tls;
#[cfg(test)]
pub(crate) mod testing;

/// ALPN for gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Signature algorithms accepted in certificate chains.
static CHAIN_ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate chain is empty: present the SVID and its intermediates")]
    EmptyChain,
    #[error("certificate {index} in the chain cannot be parsed: {reason}")]
    Parse { index: usize, reason: String },
    #[error("svid has no URI SAN: an X.509-SVID carries its SPIFFE ID as exactly one URI SAN")]
    NoUriSan,
    #[error("svid has {count} URI SANs: an X.509-SVID must have exactly one")]
    MultipleUriSans { count: usize },
    #[error("svid's URI SAN is not a valid SPIFFE ID: {source}")]
    BadSpiffeId {
        #[source]
        source: SpiffeIdError,
    },
    #[error("svid's SPIFFE ID {id} has no path; a leaf SVID must name a workload")]
    EmptyPath { id: String },
    #[error("svid {id} belongs to trust domain {got}, not {want}")]
    WrongTrustDomain { id: String, got: String, want: String },
    #[error("leaf certificate is a CA; a leaf SVID must not set cA")]
    LeafIsCa,
    #[error("leaf certificate lacks keyUsage digitalSignature")]
    LeafMissingDigitalSignature,
    #[error("leaf certificate has keyUsage keyCertSign or cRLSign, which a leaf SVID must not")]
    LeafCanSign,
    #[error("signing certificate {index} is not a CA or lacks keyUsage keyCertSign")]
    SignerCannotSign { index: usize },
    #[error("certificate chain does not verify against the trust bundle: {reason}")]
    Chain { reason: String },
    #[error("svid {id} is not the expected peer identity")]
    UnexpectedPeer { id: String },
    #[error("trust bundle certificate {index} is unusable: {reason}")]
    BadAuthority { index: usize, reason: String },
}

/// The fields of a leaf SVID that callers use, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub serial: Vec<u8>,
}

/// The X.509 authorities of one trust domain.
#[derive(Clone)]
pub struct X509Bundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// Chains that verified against these authorities. A bundle never
    /// changes (rotation builds a new one, with an empty memo), so a chain's
    /// result only depends on the time: it is reused inside the chain's
    /// validity window. Spares the chain's signature check and parsing when
    /// the same SVID is presented again (auth-handshake: once per pair).
    verified: Arc<Mutex<ChainMemo>>,
}

/// Most chains remembered per bundle; past it the memo starts over.
const MEMO_MAX: usize = 4096;

#[derive(Default)]
struct ChainMemo {
    hasher: std::hash::RandomState,
    chains: HashMap<u64, MemoEntry>,
}

struct MemoEntry {
    chain: Vec<Vec<u8>>,
    leaf: LeafInfo,
    /// Unix seconds: the latest notBefore and the earliest notAfter in the chain.
    from: i64,
    until: i64,
}

/// A bundle that can be replaced while verifiers hold it (CA rotation).
#[derive(Clone)]
pub struct BundleCell(Arc<RwLock<Arc<X509Bundle>>>);

/// Decides whether an authenticated peer is the one this side wants.
pub type PeerFilter = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// rustls verifier for servers and clients that present X.509-SVIDs.
pub struct SpiffeVerifier {
    bundle: BundleCell,
    accept: PeerFilter,
    /// For the server side: whether a client may connect without a certificate
    /// (identity-ca's attestation call); each call then checks for itself.
    client_auth_mandatory: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// A rotating certificate and key for one side of a TLS connection.
#[derive(Clone, Default)]
pub struct CredentialCell(Arc<RwLock<Option<Arc<CertifiedKey>>>>);

// === impl X509Bundle ===

impl X509Bundle {
    /// Builds a bundle; every authority must be a CA certificate with keyCertSign.
    pub fn new(trust_domain: TrustDomain, authorities: Vec<CertificateDer<'static>>) -> Result<Self, SvidError> {
        let mut anchors = Vec::with_capacity(authorities.len());
        for (index, der) in authorities.iter().enumerate() {
            let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::BadAuthority { index, reason: e.to_string() })?;
            if !can_sign(&cert) {
                return Err(SvidError::BadAuthority { index, reason: "not a CA with keyCertSign".into() });
            }
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| SvidError::BadAuthority { index, reason: e.to_string() })?.to_owned();
            anchors.push(anchor);
        }
        Ok(Self { trust_domain, authorities, anchors, verified: Arc::default() })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// Verifies an SVID chain (leaf first) at `now` and returns its checked leaf.
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<LeafInfo, SvidError> {
        self.verify_until(chain, now).map(|(leaf, _)| leaf)
    }

    /// As [`Self::verify`], with the earliest `notAfter` in the chain (Unix seconds).
    pub fn verify_until(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<(LeafInfo, i64), SvidError> {
        let t = now.as_secs() as i64;
        let key = {
            let memo = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            let mut h = memo.hasher.build_hasher();
            for c in chain {
                c.as_ref().hash(&mut h);
            }
            let key = h.finish();
            if let Some(m) = memo.chains.get(&key)
                && m.from <= t
                && t < m.until
                && m.chain.len() == chain.len()
                && m.chain.iter().zip(chain).all(|(a, b)| a.as_slice() == b.as_ref())
            {
                return Ok((m.leaf.clone(), m.until));
            }
            key
        };
        let (leaf, from, until) = self.verify_uncached(chain, now)?;
        let mut memo = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if memo.chains.len() >= MEMO_MAX {
            memo.chains.clear();
        }
        let entry = MemoEntry { chain: chain.iter().map(|c| c.to_vec()).collect(), leaf: leaf.clone(), from, until };
        memo.chains.insert(key, entry);
        Ok((leaf, until))
    }

    /// The full check; also returns the chain's validity window.
    fn verify_uncached(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<(LeafInfo, i64, i64), SvidError> {
        let leaf_der = chain.first().ok_or(SvidError::EmptyChain)?;
        let leaf = check_leaf(leaf_der)?;
        if !leaf.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(SvidError::WrongTrustDomain {
                id: leaf.spiffe_id.to_string(),
                got: leaf.spiffe_id.trust_domain_str().to_owned(),
                want: self.trust_domain.to_string(),
            });
        }
        let (mut from, mut until) = (leaf.not_before, leaf.not_after);
        for (i, der) in chain.iter().enumerate().skip(1) {
            let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse { index: i, reason: e.to_string() })?;
            if !can_sign(&cert) {
                return Err(SvidError::SignerCannotSign { index: i });
            }
            from = from.max(cert.validity().not_before.timestamp());
            until = until.min(cert.validity().not_after.timestamp());
        }
        let ee = webpki::EndEntityCert::try_from(leaf_der).map_err(|e| SvidError::Chain { reason: format!("{e:?}") })?;
        let intermediates: Vec<CertificateDer<'_>> = chain[1..].iter().map(|c| CertificateDer::from(c.as_ref())).collect();
        ee.verify_for_usage(
            CHAIN_ALGS,
            &self.anchors,
            &intermediates,
            now,
            // SVIDs serve both ends of mutual TLS; an EKU, when present, must say so.
            webpki::KeyUsage::required_if_present(EKU_CLIENT_AUTH),
            None,
            None,
        )
        .map_err(|e| SvidError::Chain { reason: format!("{e:?}") })?;
        Ok((leaf, from, until))
    }
}

impl fmt::Debug for X509Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Bundle").field("trust_domain", &self.trust_domain).field("authorities", &self.authorities.len()).finish()
    }
}

/// id-kp-clientAuth (1.3.6.1.5.5.7.3.2), DER contents.
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

fn can_sign(cert: &X509Certificate<'_>) -> bool {
    let ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let cert_sign = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    ca && cert_sign
}

/// Checks a leaf certificate's SVID fields (not its chain) and returns them.
/// A leaf's basicConstraints (OID 2.5.29.19, critical): `cA` false as DER
/// says it, an empty SEQUENCE (a DEFAULT value is never encoded). rcgen's
/// `IsCa::ExplicitNoCa` writes `cA FALSE` explicitly, which strict DER
/// parsers (Python's `cryptography`, so the Python SPIFFE client) refuse;
/// signers add this as a custom extension instead.
pub const LEAF_BASIC_CONSTRAINTS: (&[u64], &[u8]) = (&[2, 5, 29, 19], &[0x30, 0x00]);

pub fn check_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse { index: 0, reason: e.to_string() })?;
    let spiffe_id = spiffe_id_of(&cert)?;
    if spiffe_id.path().is_empty() {
        return Err(SvidError::EmptyPath { id: spiffe_id.to_string() });
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err(SvidError::LeafIsCa),
        Ok(_) => {}
        Err(e) => return Err(SvidError::Parse { index: 0, reason: e.to_string() }),
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.digital_signature() {
                return Err(SvidError::LeafMissingDigitalSignature);
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::LeafCanSign);
            }
        }
        Ok(None) => return Err(SvidError::LeafMissingDigitalSignature),
        Err(e) => return Err(SvidError::Parse { index: 0, reason: e.to_string() }),
    }
    Ok(LeafInfo {
        spiffe_id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial().to_vec(),
    })
}

/// The SPIFFE ID of a certificate: its one URI SAN.
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san =
        cert.subject_alternative_name().map_err(|e| SvidError::Parse { index: 0, reason: e.to_string() })?.ok_or(SvidError::NoUriSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|source| SvidError::BadSpiffeId { source }),
        more => Err(SvidError::MultipleUriSans { count: more.len() }),
    }
}

// === impl BundleCell ===

impl BundleCell {
    pub fn new(bundle: X509Bundle) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(bundle))))
    }

    pub fn get(&self) -> Arc<X509Bundle> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, bundle: X509Bundle) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(bundle);
    }
}

// === impl SpiffeVerifier ===

impl SpiffeVerifier {
    pub fn new(bundle: BundleCell, accept: PeerFilter) -> Self {
        Self { bundle, accept, client_auth_mandatory: true, provider: provider() }
    }

    /// Accepts any SVID of the bundle's trust domain.
    pub fn any_in_trust_domain(bundle: BundleCell) -> Self {
        Self::new(bundle, Arc::new(|_| true))
    }

    /// Accepts exactly `id`.
    pub fn exactly(bundle: BundleCell, id: SpiffeId) -> Self {
        Self::new(bundle, Arc::new(move |got| *got == id))
    }

    /// Lets clients without a certificate complete the handshake.
    pub fn client_auth_optional(mut self) -> Self {
        self.client_auth_mandatory = false;
        self
    }

    fn check(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<(), rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(CertificateDer::from(end_entity.as_ref()));
        chain.extend(intermediates.iter().map(|c| CertificateDer::from(c.as_ref())));
        let leaf = self.bundle.get().verify(&chain, now).map_err(|e| {
            tracing::debug!(error = %e, "peer svid refused");
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        if !(self.accept)(&leaf.spiffe_id) {
            let e = SvidError::UnexpectedPeer { id: leaf.spiffe_id.to_string() };
            tracing::debug!(error = %e, "peer svid refused");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e)))));
        }
        Ok(())
    }
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier").field("bundle", &self.bundle.get()).finish()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now).map(|()| ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// === impl CredentialCell ===

impl CredentialCell {
    /// Installs a certificate chain (leaf first) and its PKCS#8 private key.
    pub fn set(&self, chain: Vec<CertificateDer<'static>>, key_pkcs8: &[u8]) -> Result<(), rustls::Error> {
        let key = PrivateKeyDer::Pkcs8(key_pkcs8.to_vec().into());
        let signer = provider().key_provider.load_private_key(key)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(CertifiedKey::new(chain, signer)));
        Ok(())
    }

    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for CredentialCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialCell(<redacted>)")
    }
}

impl rustls::client::ResolvesClientCert for CredentialCell {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

impl rustls::server::ResolvesServerCert for CredentialCell {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

// === TLS configurations ===

/// The project's crypto provider: rustls with ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server speaking gRPC, presenting `creds`, verifying clients with `verifier`.
pub fn server_config(creds: CredentialCell, verifier: Arc<SpiffeVerifier>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(creds));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session would carry the identity (or the
    // absence of one) of an earlier handshake instead of a fresh verification.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// TLS 1.3 client speaking gRPC, presenting `creds` when it has one.
pub fn client_config(creds: CredentialCell, verifier: Arc<SpiffeVerifier>) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(creds));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod memo_tests {
    use std::time::Duration;

    use rustls::pki_types::UnixTime;

    use super::testing::test_ca;
    use super::{SvidError, X509Bundle};
    use meshguard_common::spiffe::SpiffeId;

    #[test]
    fn a_remembered_chain_still_expires_and_stays_bound_to_its_bundle() {
        let ca = test_ca("cluster.local");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        let (chain, _, expires_at) = ca.leaf(&id, 60);
        let bundle = X509Bundle::new(ca.trust_domain.clone(), vec![ca.cert.clone()]).unwrap();
        let now = UnixTime::now();
        let (leaf, until) = bundle.verify_until(&chain, now).unwrap();
        assert_eq!((leaf.spiffe_id, until), (id.clone(), expires_at));
        // Remembered: the same answer again.
        assert_eq!(bundle.verify_until(&chain, now).unwrap().1, expires_at);
        // Past its notAfter the memo does not answer; the full check refuses.
        let later = UnixTime::since_unix_epoch(Duration::from_secs((expires_at + 1) as u64));
        assert!(matches!(bundle.verify(&chain, later), Err(SvidError::Chain { .. })), "expired");
        // Another CA's bundle (rotation to a new authority) starts empty and refuses it.
        let other = test_ca("cluster.local");
        let rotated = X509Bundle::new(other.trust_domain.clone(), vec![other.cert.clone()]).unwrap();
        assert!(rotated.verify(&chain, now).is_err(), "a chain of a retired authority");
        // A different chain that happens to be presented next is checked in full.
        let mut tampered = chain[0].to_vec();
        let n = tampered.len();
        tampered[n - 1] ^= 1;
        assert!(bundle.verify(&[tampered.into()], now).is_err());
    }
}
