//! Test certificates (rcgen): a trust domain's CA and SVIDs it signs.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use super::node_file::NodeCredential;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};

pub struct TestCa {
    pub trust_domain: TrustDomain,
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub fn test_ca(td: &str) -> TestCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    TestCa { trust_domain: TrustDomain::new(td).unwrap(), cert: cert.der().clone(), issuer: Issuer::new(p, key) }
}

impl TestCa {
    /// A leaf X.509-SVID for `id` living `ttl_secs`: its chain and PKCS#8 key.
    pub fn leaf(&self, id: &SpiffeId, ttl_secs: i64) -> (Vec<CertificateDer<'static>>, Zeroizing<Vec<u8>>, i64) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        let now = now();
        let expires_at = now + ttl_secs;
        p.not_before = time::OffsetDateTime::from_unix_timestamp(now - 30).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(expires_at).unwrap();
        p.is_ca = IsCa::NoCa;
        let (oid, der) = crate::svid::LEAF_BASIC_CONSTRAINTS;
        let mut bc = rcgen::CustomExtension::from_oid_content(oid, der.to_vec());
        bc.set_criticality(true);
        p.custom_extensions = vec![bc];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], Zeroizing::new(key.serialize_der()), expires_at)
    }

    pub fn pem(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.cert);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
    }
}

/// A node credential for `node`, as auth-handshake would save it.
pub fn node_credential(ca: &TestCa, node: &str, ttl_secs: i64) -> NodeCredential {
    let id = ca.trust_domain.node_id(node).unwrap();
    let (chain, key, expires_at) = ca.leaf(&id, ttl_secs);
    NodeCredential { spiffe_id: id, chain: chain.into_iter().map(|c| c.to_vec()).collect(), key_pkcs8: key, issued_at: now(), expires_at }
}
