//! JWT-SVID validation against the trust domain's JWT bundle (JWKS): ES256
//! only, `kid` must name a bundle key, `sub` a SPIFFE ID of the trust
//! domain, `aud` must contain the audience, `exp` in the future.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
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
    #[error("token audience does not include {audience:?}")]
    Audience { audience: String },
    #[error("token subject is not a SPIFFE ID of trust domain {trust_domain}")]
    Subject { trust_domain: String },
}

/// Largest token accepted: JWT-SVIDs are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

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
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected three dot-separated parts"));
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64URL.decode(h).map_err(|_| bad("header is not base64url"))?).map_err(|_| bad("header is not JSON"))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
        return Err(JwtError::Algorithm);
    }
    let kid = header.get("kid").and_then(|k| k.as_str()).ok_or(JwtError::UnknownKey)?;
    let set: serde_json::Value = serde_json::from_slice(jwks).map_err(|_| JwtError::UnknownKey)?;
    let key = set
        .get("keys")
        .and_then(|k| k.as_array())
        .and_then(|keys| keys.iter().find(|k| k.get("kid").and_then(|v| v.as_str()) == Some(kid)))
        .ok_or(JwtError::UnknownKey)?;
    let coord = |name: &str| key.get(name).and_then(|v| v.as_str()).and_then(|v| B64URL.decode(v).ok()).filter(|v| v.len() == 32);
    let (Some(x), Some(y)) = (coord("x"), coord("y")) else {
        return Err(JwtError::UnknownKey);
    };
    let mut point = vec![0x04];
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let sig = B64URL.decode(s).map_err(|_| bad("signature is not base64url"))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&B64URL.decode(p).map_err(|_| bad("payload is not base64url"))?)
            .map_err(|_| bad("payload is not a JSON object"))?;
    let exp = claims.get("exp").and_then(|e| e.as_i64()).ok_or_else(|| bad("no exp claim"))?;
    if exp <= now {
        return Err(JwtError::Expired);
    }
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(JwtError::Audience { audience: audience.to_owned() });
    }
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .and_then(|s| SpiffeId::parse(s).ok())
        .filter(|id| id.is_member_of(td))
        .ok_or_else(|| JwtError::Subject { trust_domain: td.to_string() })?;
    Ok((sub, claims))
}
