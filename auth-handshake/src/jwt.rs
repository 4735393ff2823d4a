//! JWT-SVID validation against the trust domain's JWT bundle (JWKS), through
//! `jsonwebtoken`: ES256 only; the header's `kid` must name a bundle key and
//! its `typ`, if any, be `JWT` or `JOSE`; `exp` is required and must be in
//! the future, `nbf` (if present) reached; `iat` (if present) no more than
//! [`IAT_SKEW`] ahead of this node's clock; `aud` must contain the audience
//! and `sub` be a SPIFFE ID of the trust domain.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a compact JWS: {reason}")]
    Malformed { reason: String },
    #[error("token algorithm must be ES256")]
    Algorithm,
    #[error("token key id is not in the trust bundle")]
    UnknownKey,
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf, or iat in the future)")]
    NotYetValid,
    #[error("token audience does not include {audience:?}")]
    Audience { audience: String },
    #[error("token subject is not a SPIFFE ID of trust domain {trust_domain}")]
    Subject { trust_domain: String },
}

/// Largest token accepted: JWT-SVIDs are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How far ahead of this node's clock a token's `iat` may be (the issuer's
/// clock may run ahead). `exp` and `nbf` are exact.
pub const IAT_SKEW: i64 = 60;

pub fn validate(
    token: &str,
    audience: &str,
    td: &TrustDomain,
    jwks: &[u8],
    now: i64,
) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), JwtError> {
    let bad = |r: &str| JwtError::Malformed { reason: r.to_owned() };
    if token.len() > MAX_TOKEN_BYTES {
        return Err(bad("too long"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => JwtError::Algorithm,
        _ => bad(&format!("header: {e}")),
    })?;
    if header.alg != Algorithm::ES256 {
        return Err(JwtError::Algorithm);
    }
    if header.typ.as_deref().is_some_and(|t| t != "JWT" && t != "JOSE") {
        return Err(bad("typ must be JWT or JOSE"));
    }
    let kid = header.kid.ok_or(JwtError::UnknownKey)?;
    let set: JwkSet = serde_json::from_slice(jwks).map_err(|_| JwtError::UnknownKey)?;
    let key = set.find(&kid).ok_or(JwtError::UnknownKey).and_then(|jwk| DecodingKey::from_jwk(jwk).map_err(|_| JwtError::UnknownKey))?;
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v).map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => JwtError::Signature,
        ErrorKind::InvalidAlgorithm => JwtError::Algorithm,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidAudience => JwtError::Audience { audience: audience.to_owned() },
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::Audience { audience: audience.to_owned() },
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => JwtError::Subject { trust_domain: td.to_string() },
        _ => bad(&e.to_string()),
    })?;
    let claims = data.claims;
    match claims.get("iat") {
        None => {}
        Some(iat) => match iat.as_i64() {
            Some(iat) if iat <= now + IAT_SKEW => {}
            Some(_) => return Err(JwtError::NotYetValid),
            None => return Err(bad("iat is not a number")),
        },
    }
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .and_then(|s| SpiffeId::parse(s).ok())
        .filter(|id| id.is_member_of(td))
        .ok_or_else(|| JwtError::Subject { trust_domain: td.to_string() })?;
    Ok((sub, claims))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    use super::*;

    struct Issuer {
        key: EcdsaKeyPair,
        jwks: Vec<u8>,
    }

    fn issuer() -> Issuer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let p = key.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "jwt-svid",
            "x": B64URL.encode(&p[1..33]), "y": B64URL.encode(&p[33..65]),
        }]});
        Issuer { key, jwks: jwks.to_string().into_bytes() }
    }

    impl Issuer {
        fn sign(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
            let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
            let sig = self.key.sign(&ring::rand::SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", B64URL.encode(sig.as_ref()))
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    const SUB: &str = "spiffe://td/ns/shop/sa/web";

    #[test]
    fn every_claim_and_the_header_are_checked() {
        let i = issuer();
        let td = TrustDomain::new("td").unwrap();
        let h = serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let t = now();
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub": SUB, "aud": ["db"], "exp": t + 60, "iat": t});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            c
        };
        let check = |tok: &str| validate(tok, "db", &td, &i.jwks, t);
        let (id, _) = check(&i.sign(h.clone(), claims(serde_json::json!({})))).unwrap();
        assert_eq!(id.as_str(), SUB);
        // A single audience as a string is fine too.
        assert!(check(&i.sign(h.clone(), claims(serde_json::json!({"aud": "db"})))).is_ok());

        let cases = [
            (claims(serde_json::json!({"exp": t - 1})), JwtError::Expired),
            (claims(serde_json::json!({"nbf": t + 30})), JwtError::NotYetValid),
            (claims(serde_json::json!({"iat": t + IAT_SKEW + 30})), JwtError::NotYetValid),
            (claims(serde_json::json!({"aud": ["other"]})), JwtError::Audience { audience: "db".into() }),
            (claims(serde_json::json!({"sub": "spiffe://other/ns/shop/sa/web"})), JwtError::Subject { trust_domain: "td".into() }),
            (claims(serde_json::json!({"sub": "not a spiffe id"})), JwtError::Subject { trust_domain: "td".into() }),
        ];
        for (c, want) in cases {
            assert_eq!(check(&i.sign(h.clone(), c.clone())).unwrap_err(), want, "{c}");
        }
        // exp is required.
        let mut no_exp = claims(serde_json::json!({}));
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(matches!(check(&i.sign(h.clone(), no_exp)).unwrap_err(), JwtError::Malformed { .. }));

        // Header: algorithm, key id, type.
        let good = claims(serde_json::json!({}));
        let none = i.sign(serde_json::json!({"alg": "none", "kid": "k1"}), good.clone());
        assert!(matches!(check(&none).unwrap_err(), JwtError::Algorithm | JwtError::Malformed { .. }));
        let hs = i.sign(serde_json::json!({"alg": "HS256", "kid": "k1"}), good.clone());
        assert_eq!(check(&hs).unwrap_err(), JwtError::Algorithm);
        assert_eq!(check(&i.sign(serde_json::json!({"alg": "ES256", "kid": "k2"}), good.clone())).unwrap_err(), JwtError::UnknownKey);
        assert_eq!(check(&i.sign(serde_json::json!({"alg": "ES256"}), good.clone())).unwrap_err(), JwtError::UnknownKey);
        assert!(matches!(
            check(&i.sign(serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "x"}), good.clone())).unwrap_err(),
            JwtError::Malformed { .. }
        ));

        // Another key's signature, a tampered payload, garbage.
        let other = issuer();
        assert_eq!(check(&other.sign(h.clone(), good.clone())).unwrap_err(), JwtError::Signature);
        let tok = i.sign(h.clone(), good);
        let mut parts: Vec<&str> = tok.split('.').collect();
        let forged = B64URL.encode(claims(serde_json::json!({"sub": "spiffe://td/ns/shop/sa/admin"})).to_string());
        parts[1] = &forged;
        assert_eq!(check(&parts.join(".")).unwrap_err(), JwtError::Signature);
        for junk in ["", "a.b", "a.b.c.d", "!!.??.**"] {
            assert!(matches!(check(junk).unwrap_err(), JwtError::Malformed { .. } | JwtError::Algorithm), "{junk:?}");
        }
        assert!(matches!(check(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(), JwtError::Malformed { .. }));
    }
}
