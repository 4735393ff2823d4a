//! PKCS#10 certificate signing requests: only their public key matters (the
//! CA decides every other field), but the whole request is checked so a
//! malformed or oversized one is refused with a clear error.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// A P-256 CSR is ~250 bytes; anything past 4 KiB is not one.
pub const MAX_CSR_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is empty: send a DER PKCS#10 request")]
    Empty,
    #[error("csr is {len} bytes, more than the {MAX_CSR_BYTES} allowed")]
    TooLarge { len: usize },
    #[error("csr is not a DER PKCS#10 request: {reason}")]
    Malformed { reason: String },
    #[error("csr signature does not verify: sign the request with the key it carries")]
    BadSignature,
    #[error("csr key must be ECDSA P-256")]
    UnsupportedKey,
}

/// The verified public key of a CSR: an uncompressed P-256 point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey {
    point: Vec<u8>,
}

// === impl CsrKey ===

impl CsrKey {
    pub fn parse(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        if der.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge { len: der.len() });
        }
        let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed { reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed { reason: format!("{} trailing bytes", rest.len()) });
        }
        let spki = &csr.certification_request_info.subject_pki;
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve.as_ref() != Some(&OID_EC_P256) {
            return Err(CsrError::UnsupportedKey);
        }
        let point = spki.subject_public_key.data.to_vec();
        if point.len() != 65 || point[0] != 0x04 {
            return Err(CsrError::UnsupportedKey);
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        Ok(Self { point })
    }
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A fresh P-256 key and a CSR for it; what a node does before asking for an SVID.
pub fn generate() -> Result<(rcgen::KeyPair, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::default();
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_p256_and_refuses_the_rest() {
        let (_, der) = generate().unwrap();
        CsrKey::parse(&der).unwrap();
        assert_eq!(CsrKey::parse(&[]).unwrap_err(), CsrError::Empty);
        assert!(matches!(CsrKey::parse(&vec![0x30; MAX_CSR_BYTES + 1]), Err(CsrError::TooLarge { .. })));
        assert!(matches!(CsrKey::parse(b"garbage"), Err(CsrError::Malformed { .. })));
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(CsrKey::parse(&trailing), Err(CsrError::Malformed { .. })));
        // Flip a bit in the signature (the last byte).
        let mut forged = der.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert!(matches!(CsrKey::parse(&forged), Err(CsrError::BadSignature | CsrError::Malformed { .. })));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&ed).unwrap();
        assert_eq!(CsrKey::parse(csr.der()).unwrap_err(), CsrError::UnsupportedKey);
    }
}
