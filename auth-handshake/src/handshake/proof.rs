//! What a proof says, who signs it, and how it is checked.
//!
//! A proof is a signature by a workload SVID's key over
//! [`statement`]: a context string, the signer's role, the session's TLS
//! exporter value, both SPIFFE IDs and both node names. It is checked with
//! the key of a chain that must verify against the trust bundle and name
//! exactly the identity expected.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use meshguard_ca_client::svid::{SvidError, X509Bundle, check_leaf};
use meshguard_common::spiffe::SpiffeId;
use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::SigningKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Refusal, Role};

/// The TLS exporter label (RFC 8446 §7.5) the proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshguard-auth-v1";
/// Bytes of exporter output signed.
pub const EXPORTER_LEN: usize = 32;
/// Domain separation: these bytes start every signed statement, so a proof
/// can never be mistaken for a signature made for another purpose.
pub const CONTEXT: &[u8] = b"meshguard auth-handshake v1 identity proof\0";

/// Signature schemes a workload key may sign with, in preference order.
const SCHEMES: &[SignatureScheme] =
    &[SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384, SignatureScheme::ED25519];

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("workload key for {id} is unusable: {reason}")]
    Key { id: String, reason: String },
    #[error("signing with the key of {id} failed: {reason}")]
    Sign { id: String, reason: String },
}

/// A workload SVID this node holds, ready to sign proofs.
pub struct WorkloadKey {
    pub id: SpiffeId,
    /// DER, leaf first.
    pub chain: Arc<Vec<Vec<u8>>>,
    /// The earliest `notAfter` in the chain (unix seconds).
    pub not_after: i64,
    signer: Arc<dyn SigningKey>,
}

/// What the protocol needs to know about the cluster at one moment: this
/// node, the trust bundle, the SVIDs held here, where each identity runs and
/// each node's address. The agent rebuilds it on every change; the session
/// reads it on every frame, so a change applies to the next proof.
#[derive(Clone)]
pub struct Directory {
    pub node: String,
    pub bundle: Arc<X509Bundle>,
    pub keys: BTreeMap<SpiffeId, Arc<WorkloadKey>>,
    /// Identity → the nodes the cluster view places it on.
    pub placement: BTreeMap<SpiffeId, BTreeSet<String>>,
    /// Node → its address (the underlay address of its WireGuard endpoint).
    pub node_addrs: BTreeMap<String, IpAddr>,
}

/// What a checked proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub id: SpiffeId,
    /// The earliest `notAfter` in the presented chain.
    pub not_after: i64,
}

/// The two identities and two nodes a proof is about, and the session it is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub exporter: &'a [u8; EXPORTER_LEN],
    pub initiator: &'a SpiffeId,
    pub responder: &'a SpiffeId,
    pub initiator_node: &'a str,
    pub responder_node: &'a str,
}

// === impl WorkloadKey ===

impl WorkloadKey {
    /// `chain` DER leaf first; `key_pkcs8` the leaf's private key.
    pub fn new(id: SpiffeId, chain: Vec<Vec<u8>>, key_pkcs8: &[u8]) -> Result<Self, ProofError> {
        let bad = |reason: String| ProofError::Key { id: id.to_string(), reason };
        let key = PrivateKeyDer::Pkcs8(key_pkcs8.to_vec().into());
        let signer = meshguard_ca_client::svid::provider().key_provider.load_private_key(key).map_err(|e| bad(e.to_string()))?;
        if signer.choose_scheme(SCHEMES).is_none() {
            return Err(bad(format!("key algorithm {:?} is not one of {SCHEMES:?}", signer.algorithm())));
        }
        let not_after = chain_not_after(&chain).map_err(|e| bad(e.to_string()))?;
        Ok(Self { id, chain: Arc::new(chain), not_after, signer })
    }

    /// Signs `msg`: two bytes of signature scheme, then the signature.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ProofError> {
        let bad = |reason: String| ProofError::Sign { id: self.id.to_string(), reason };
        let signer = self.signer.choose_scheme(SCHEMES).ok_or_else(|| bad("no usable scheme".into()))?;
        let mut out = u16::from(signer.scheme()).to_be_bytes().to_vec();
        out.extend(signer.sign(msg).map_err(|e| bad(e.to_string()))?);
        Ok(out)
    }
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").field("id", &self.id).field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

// === impl Directory ===

impl Directory {
    /// Whether the cluster view places `id` on `node`.
    pub fn places(&self, id: &SpiffeId, node: &str) -> bool {
        self.placement.get(id).is_some_and(|n| n.contains(node))
    }

    /// The node whose address is `ip`.
    pub fn node_at(&self, ip: IpAddr) -> Option<&str> {
        self.node_addrs.iter().find(|(_, a)| **a == ip).map(|(n, _)| n.as_str())
    }
}

// === statements ===

/// The bytes a proof signs.
pub fn statement(role: Role, b: &Binding<'_>) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 1 + EXPORTER_LEN + 256);
    m.extend_from_slice(CONTEXT);
    m.push(match role {
        Role::Initiator => 1,
        Role::Responder => 2,
    });
    m.extend_from_slice(b.exporter);
    for part in [b.initiator.as_str(), b.responder.as_str(), b.initiator_node, b.responder_node] {
        // Length-prefixed, so no two different tuples give the same bytes.
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// Checks a presented chain and signature: the chain verifies against
/// `bundle` at `now`, its leaf names exactly `expected`, and the leaf's key
/// signed `msg`.
pub fn verify(
    bundle: &X509Bundle,
    chain: &[Vec<u8>],
    expected: &SpiffeId,
    msg: &[u8],
    signature: &[u8],
    now: UnixTime,
) -> Result<Verified, Refusal> {
    let ders: Vec<CertificateDer<'_>> = chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
    let (leaf, not_after) = bundle.verify_until(&ders, now).map_err(refusal_of)?;
    if leaf.spiffe_id != *expected {
        return Err(Refusal::WrongSpiffeId);
    }
    if signature.len() < 2 {
        return Err(Refusal::BadSignature);
    }
    let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm =
        match SignatureScheme::from(u16::from_be_bytes([signature[0], signature[1]])) {
            SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
            SignatureScheme::ED25519 => webpki::ring::ED25519,
            _ => return Err(Refusal::BadSignature),
        };
    let ee = webpki::EndEntityCert::try_from(&ders[0]).map_err(|_| Refusal::InvalidSvid)?;
    ee.verify_signature(alg, msg, &signature[2..]).map_err(|_| Refusal::BadSignature)?;
    Ok(Verified { id: leaf.spiffe_id, not_after })
}

fn refusal_of(e: SvidError) -> Refusal {
    match e {
        SvidError::WrongTrustDomain { .. } => Refusal::WrongTrustDomain,
        SvidError::Chain { reason } if reason.contains("Expired") || reason.contains("NotValidYet") => Refusal::Expired,
        SvidError::Chain { .. } | SvidError::SignerCannotSign { .. } | SvidError::BadAuthority { .. } => Refusal::UntrustedChain,
        SvidError::UnexpectedPeer { .. } => Refusal::WrongSpiffeId,
        SvidError::EmptyChain
        | SvidError::Parse { .. }
        | SvidError::NoUriSan
        | SvidError::MultipleUriSans { .. }
        | SvidError::BadSpiffeId { .. }
        | SvidError::EmptyPath { .. }
        | SvidError::LeafIsCa
        | SvidError::LeafMissingDigitalSignature
        | SvidError::LeafCanSign => Refusal::InvalidSvid,
    }
}

/// The earliest `notAfter` of a DER chain (unix seconds).
pub fn chain_not_after(chain: &[Vec<u8>]) -> Result<i64, SvidError> {
    let first = chain.first().ok_or(SvidError::EmptyChain)?;
    let mut min = check_leaf(first)?.not_after;
    for (index, der) in chain.iter().enumerate().skip(1) {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse { index, reason: e.to_string() })?;
        min = min.min(cert.validity().not_after.timestamp());
    }
    Ok(min)
}
