//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle §4): one RFC 7517
//! JWK Set holding the X.509 authorities (`use: x509-svid`, the certificate
//! in `x5c` and its public key beside it, X509-SVID §6.1) and the JWT
//! authorities (`use: jwt-svid`, each with its `kid`, JWT-SVID §6.1), plus
//! `spiffe_sequence` and `spiffe_refresh_hint`. It is what a SPIRE server
//! (`spire-server bundle set -format spiffe`) or a SPIFFE library imports to
//! trust this trust domain.
//!
//! The trust domain's name is not part of the document: the spec (§3) has
//! the consumer keep it beside the bundle, as SPIRE's `-id` does.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use serde::Serialize;
use serde_json::{Map, Value, json};
use x509_parser::public_key::PublicKey;

/// The `spiffe_refresh_hint` we publish: 5 minutes, the interval SPIFFE
/// Federation §4.1 recommends and SPIRE's bundle client falls back to when a
/// bundle has no hint (given one, it polls four times per hint). Rotation is what
/// a peer must keep up with: after `ca prepare`, wait at least this long
/// before `ca activate`, so every federated peer holds the new authority
/// before it signs anything. Shorter would only add polling; longer would
/// stretch that wait and slow a key's removal on `ca retire`.
pub const REFRESH_HINT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SpiffeBundleError {
    #[error("X.509 authority {index} is not a DER certificate: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("X.509 authority {index} has a {key} key: the SPIFFE bundle carries only EC (P-256, P-384, P-521) and RSA keys")]
    UnsupportedKey { index: usize, key: String },
    #[error("the JWT authorities are not a JWK Set: {reason}")]
    BadJwks { reason: String },
    #[error("JWT authority {index} cannot go in a SPIFFE bundle: {reason}")]
    BadJwk { index: usize, reason: &'static str },
    #[error("bug: the SPIFFE bundle does not serialize: {source}")]
    BugSerialize {
        #[source]
        source: serde_json::Error,
    },
}

/// Field order as in the spec's Appendix A.
#[derive(Serialize)]
struct Document {
    spiffe_sequence: u64,
    spiffe_refresh_hint: u64,
    keys: Vec<Value>,
}

/// The SPIFFE bundle document (pretty JSON) for `x509_authorities` (DER CA
/// certificates) and `jwt_jwks` (an RFC 7517 JWK Set of the JWT-SVID
/// signing keys, each with a `kid`).
pub fn render(
    x509_authorities: &[impl AsRef<[u8]>],
    jwt_jwks: &[u8],
    sequence: u64,
    refresh_hint: Duration,
) -> Result<String, SpiffeBundleError> {
    let mut keys = Vec::with_capacity(x509_authorities.len());
    for (index, der) in x509_authorities.iter().enumerate() {
        keys.push(x509_entry(index, der.as_ref())?);
    }
    keys.extend(jwt_entries(jwt_jwks)?);
    let doc = Document { spiffe_sequence: sequence, spiffe_refresh_hint: refresh_hint.as_secs(), keys };
    serde_json::to_string_pretty(&doc).map_err(|source| SpiffeBundleError::BugSerialize { source })
}

/// One `x509-svid` entry: no `kid` (X509-SVID §6.1 forbids it), exactly one
/// certificate in `x5c` (standard base64, RFC 7517 §4.7), and the public key
/// from its SubjectPublicKeyInfo (RFC 7518 §6), which consumers such as
/// go-jose check against the certificate.
fn x509_entry(index: usize, der: &[u8]) -> Result<Value, SpiffeBundleError> {
    let bad = |reason: String| SpiffeBundleError::BadCertificate { index, reason };
    let unsupported = |key: String| SpiffeBundleError::UnsupportedKey { index, key };
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} trailing bytes", rest.len())));
    }
    let spki = cert.public_key();
    let key: Vec<(&str, String)> = match spki.parsed().map_err(|e| bad(format!("its public key does not parse: {e}")))? {
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            let (crv, width) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                Some("1.3.132.0.35") => ("P-521", 66),
                other => return Err(unsupported(format!("EC key on curve {}", other.unwrap_or("(unnamed)")))),
            };
            match point.data() {
                [0x04, xy @ ..] if xy.len() == 2 * width => {
                    let (x, y) = xy.split_at(width);
                    vec![("kty", "EC".into()), ("crv", crv.into()), ("x", B64URL.encode(x)), ("y", B64URL.encode(y))]
                }
                [0x02 | 0x03, ..] => return Err(unsupported(format!("compressed {crv}"))),
                _ => return Err(bad(format!("its {crv} point is malformed"))),
            }
        }
        PublicKey::RSA(rsa) => {
            let (n, e) = (unsigned(rsa.modulus), unsigned(rsa.exponent));
            if n.is_empty() || e.is_empty() {
                return Err(bad("its RSA modulus or exponent is zero".to_owned()));
            }
            vec![("kty", "RSA".into()), ("n", B64URL.encode(n)), ("e", B64URL.encode(e))]
        }
        _ => return Err(unsupported(format!("algorithm {}", spki.algorithm.algorithm.to_id_string()))),
    };
    let mut entry: Map<String, Value> = key.into_iter().map(|(k, v)| (k.to_owned(), Value::String(v))).collect();
    entry.insert("use".into(), "x509-svid".into());
    entry.insert("x5c".into(), json!([B64.encode(der)]));
    Ok(Value::Object(entry))
}

/// A DER INTEGER's bytes as a JWK base64urlUint wants them: no leading zero
/// octets (RFC 7518 §2).
fn unsigned(int: &[u8]) -> &[u8] {
    let start = int.iter().position(|&b| b != 0).unwrap_or(int.len());
    &int[start..]
}

/// The JWK Set's keys as `jwt-svid` entries. Each must have a `kty` (§4.2.1)
/// and a `kid` (JWT-SVID §6.1); a key already marked for another use than
/// signing is refused rather than relabelled.
fn jwt_entries(jwks: &[u8]) -> Result<Vec<Value>, SpiffeBundleError> {
    let bad_set = |reason: String| SpiffeBundleError::BadJwks { reason };
    let set: Value = serde_json::from_slice(jwks).map_err(|e| bad_set(e.to_string()))?;
    let keys = set.get("keys").and_then(Value::as_array).ok_or_else(|| bad_set("it has no \"keys\" array".to_owned()))?;
    keys.iter()
        .enumerate()
        .map(|(index, key)| {
            let bad = |reason| SpiffeBundleError::BadJwk { index, reason };
            let mut key: Map<String, Value> = key.as_object().cloned().ok_or(bad("it is not a JSON object"))?;
            let non_empty = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
            if !non_empty(key.get("kty")) {
                return Err(bad("it has no \"kty\""));
            }
            if !non_empty(key.get("kid")) {
                return Err(bad("it has no \"kid\", which JWT-SVID verifiers look keys up by"));
            }
            match key.get("use").map(Value::as_str) {
                None | Some(Some("sig" | "jwt-svid")) => {}
                Some(_) => return Err(bad("its \"use\" is not signing")),
            }
            key.insert("use".into(), "jwt-svid".into());
            Ok(Value::Object(key))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate for `key`, as `authority.rs` makes them.
    fn ca_cert(key: &rcgen::KeyPair) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://td".try_into().unwrap())];
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.self_signed(key).unwrap().der().to_vec()
    }

    fn p256() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    /// A JWK Set as `authority::jwks` writes it, for `key` under `kid`.
    fn jwks(key: &rcgen::KeyPair, kid: &str) -> Vec<u8> {
        let point = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]), "kid": kid, "use": "jwt-svid"});
        serde_json::to_vec(&json!({"keys": [jwk]})).unwrap()
    }

    fn parse(doc: &str) -> Value {
        serde_json::from_str(doc).unwrap()
    }

    fn decode(v: &Value) -> Vec<u8> {
        B64URL.decode(v.as_str().unwrap()).unwrap()
    }

    #[test]
    fn ec_authorities_carry_their_certificate_and_its_key() {
        let (old, new, jwt) = (p256(), p256(), p256());
        let certs = [ca_cert(&old), ca_cert(&new)];
        let doc = parse(&render(&certs, &jwks(&jwt, "k1"), 7, REFRESH_HINT).unwrap());
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        for (entry, (cert, key)) in keys.iter().zip(certs.iter().zip([&old, &new])) {
            assert_eq!(entry["use"], "x509-svid");
            assert_eq!((&entry["kty"], &entry["crv"]), (&json!("EC"), &json!("P-256")));
            assert!(entry.get("kid").is_none(), "X509-SVID §6.1: no kid on {entry}");
            let x5c = entry["x5c"].as_array().unwrap();
            assert_eq!(x5c.len(), 1);
            assert_eq!(&B64.decode(x5c[0].as_str().unwrap()).unwrap(), cert);
            // x and y are the point the key pair itself reports, not a re-read of the certificate.
            let point = [vec![0x04], decode(&entry["x"]), decode(&entry["y"])].concat();
            assert_eq!(point, key.public_key_raw());
        }
        let point = [vec![0x04], decode(&keys[2]["x"]), decode(&keys[2]["y"])].concat();
        assert_eq!(point, jwt.public_key_raw());
        assert_eq!((&keys[2]["use"], &keys[2]["kid"]), (&json!("jwt-svid"), &json!("k1")));
        assert!(keys[2].get("x5c").is_none());
    }

    /// A 2048-bit RSA CA made by `openssl req -x509 -newkey rsa:2048` (ring
    /// cannot generate RSA keys), and its modulus as `openssl x509 -modulus`
    /// printed it.
    const RSA_CA: &str = "\
-----BEGIN CERTIFICATE-----
MIIDcDCCAligAwIBAgIUZsI888Eh187GYs5FUT9J/ftPwbEwDQYJKoZIhvcNAQEL
BQAwLzEXMBUGA1UECgwObWVzaGd1YXJkIHRlc3QxFDASBgNVBAMMC3JzYSBmaXh0
dXJlMCAXDTI2MTEzMDA0NDYwM1oYDzIxMjYxMTA2MDQ0NjAzWjAvMRcwFQYDVQQK
DA5tZXNoZ3VhcmQgdGVzdDEUMBIGA1UEAwwLcnNhIGZpeHR1cmUwggEiMA0GCSqG
SIb3DQEBAQUAA4IBDwAwggEKAoIBAQCRjfir+JURUgO+tF/Yoh6nmykWZ2f5NUZk
uvN+/oCLBSm+eZIBTKLJ1A5/p+nB+g9f9TTZUuCBqtjKRThFhwgroJ/YzomrMVcd
myzRt8rPi4+Bp4TL7UtM0X639Iw+/EEXOB0WcBcMaZ9qtumCv6xxqOj6Od/pmTv0
kTMM1I+Nas5ucF644gv2Sl/iqgvTFAtx417xn8jVe5wmCbWkFmt2h/NKuta5MDJa
/lghxqlAFNxz6K3sda0zukY6RocBVpQyivx29rvPNTVgvzKFugo10Mh/ZHcvI67R
+S8qoJDaLWPFYrPQuKv+S4hdo+gLRoguRzQo6VrgGEFLlrsdD8/dAgMBAAGjgYEw
fzAdBgNVHQ4EFgQUX/TlL+8GPY+pQrmPBedEtyVO0/YwHwYDVR0jBBgwFoAUX/Tl
L+8GPY+pQrmPBedEtyVO0/YwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMC
AgQwHAYDVR0RBBUwE4YRc3BpZmZlOi8vcnNhLnRlc3QwDQYJKoZIhvcNAQELBQAD
ggEBAGK4j6Epjsaa8/k0LghkelYaUISHAwOE+zXhIy12kXMWa4s61pHRhyYY+mdD
GXwE9pEx4ScEuiXBIEEOQ1jUmNNE+hXoZlB0ss3BWXSc/gl6Zf+0Tmbz8ZZc+Jmf
vXARIpAB5INE31NXuF69lmDNpa7yWrsz80jcXhL4lKOUTiHjQEGAwZ7Uk+xu2YcM
Mv/sksby0G6BWT01o1vYtYOWN8CwhONcElTZxOSYh4vcYuxE/n8l607XXDP/dYM0
IM5necn2Qpr+I/W/eM9j+tNqhyUVbOQ7HIGdLb48pLX8G9asxHU7qsd4nFpEjpgd
/k43UuHU7XVt46k4Foy1EoPUACI=
-----END CERTIFICATE-----";
    const RSA_MODULUS: &str = "918DF8ABF895115203BEB45FD8A21EA79B29166767F9354664BAF37EFE808B0529BE7992014CA2C9D40E7FA7E9C1FA0F5FF534D952E081AAD8CA45384587082BA09FD8CE89AB31571D9B2CD1B7CACF8B8F81A784CBED4B4CD17EB7F48C3EFC4117381D1670170C699F6AB6E982BFAC71A8E8FA39DFE9993BF491330CD48F8D6ACE6E705EB8E20BF64A5FE2AA0BD3140B71E35EF19FC8D57B9C2609B5A4166B7687F34ABAD6B930325AFE5821C6A94014DC73E8ADEC75AD33BA463A4687015694328AFC76F6BBCF353560BF3285BA0A35D0C87F64772F23AED1F92F2AA090DA2D63C562B3D0B8ABFE4B885DA3E80B46882E473428E95AE018414B96BB1D0FCFDD";

    #[test]
    fn rsa_authorities_carry_n_and_e_without_leading_zeros() {
        let der = x509_parser::pem::parse_x509_pem(RSA_CA.as_bytes()).unwrap().1.contents;
        let doc = parse(&render(&[der], br#"{"keys":[]}"#, 1, REFRESH_HINT).unwrap());
        let entry = &doc["keys"][0];
        assert_eq!((&entry["kty"], &entry["use"]), (&json!("RSA"), &json!("x509-svid")));
        assert_eq!(entry["e"], "AQAB");
        assert_eq!(hex::encode_upper(decode(&entry["n"])), RSA_MODULUS);
    }

    #[test]
    fn bad_input_is_refused_with_what_is_wrong() {
        let ok_jwks = jwks(&p256(), "k1");
        let ok_cert = ca_cert(&p256());
        let err = |certs: &[Vec<u8>], jwks: &[u8]| render(certs, jwks, 1, REFRESH_HINT).unwrap_err();

        assert!(matches!(err(&[b"not a certificate".to_vec()], &ok_jwks), SpiffeBundleError::BadCertificate { index: 0, .. }));
        let trailing = [ok_cert.clone(), [ok_cert.as_slice(), &[0]].concat()];
        let e = err(&trailing, &ok_jwks);
        assert!(matches!(e, SpiffeBundleError::BadCertificate { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("trailing"), "{e}");

        let ed25519 = ca_cert(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap());
        let e = err(&[ed25519], &ok_jwks);
        assert!(matches!(e, SpiffeBundleError::UnsupportedKey { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("1.3.101.112"), "{e}");

        assert!(matches!(err(&[], b"not json"), SpiffeBundleError::BadJwks { .. }));
        assert!(matches!(err(&[], b""), SpiffeBundleError::BadJwks { .. }));
        assert!(matches!(err(&[], br#"{"kets":[]}"#), SpiffeBundleError::BadJwks { .. }));
        let jwk = |k: Value| serde_json::to_vec(&json!({"keys": [k]})).unwrap();
        for (key, why) in [
            (json!("a string"), "object"),
            (json!({"kid": "k1", "x": "AA"}), "kty"),
            (json!({"kty": "EC", "kid": ""}), "kid"),
            (json!({"kty": "EC"}), "kid"),
            (json!({"kty": "EC", "kid": "k1", "use": "enc"}), "use"),
            (json!({"kty": "EC", "kid": "k1", "use": 1}), "use"),
        ] {
            let e = err(&[], &jwk(key.clone()));
            assert!(matches!(e, SpiffeBundleError::BadJwk { index: 0, .. }) && e.to_string().contains(why), "{key}: {e}");
        }
        // "sig" is relabelled as the SPIFFE use; the rest of the key is kept as it is.
        let doc =
            parse(&render(&[] as &[Vec<u8>], &jwk(json!({"kty": "OKP", "kid": "k1", "use": "sig", "x": "AA"})), 1, REFRESH_HINT).unwrap());
        assert_eq!(doc["keys"][0], json!({"kty": "OKP", "kid": "k1", "use": "jwt-svid", "x": "AA"}));
    }
}
