//! Service-account JWTs as kube-apiserver issues them (ES256, the `kubernetes.io` private claims),
//! and their verification: signature, issuer, `exp`/`nbf`. Audience and bound-object checks are
//! the authenticator's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// go-jose's default leeway, which kube-apiserver's validator uses for `exp` and `nbf`.
const LEEWAY: Duration = Duration::from_secs(60);

/// What to put in a service-account token (`issue_token`), like a TokenRequest.
#[derive(Clone, Debug)]
pub struct ServiceAccountToken {
    pub namespace: String,
    pub service_account: String,
    /// `aud`; empty means the server's own API audience, as a TokenRequest without audiences.
    pub audiences: Vec<String>,
    pub expires_in: Duration,
    /// The pod the token is bound to, `(name, uid)`.
    pub pod: Option<(String, String)>,
    /// The node, `(name, uid)`: of the pod's node for a pod-bound token, or the bound object.
    pub node: Option<(String, String)>,
    /// `iat`/`nbf`; `None` is now. In the past (beyond `expires_in`) it makes an expired token,
    /// in the future one not valid yet.
    pub issued_at: Option<SystemTime>,
}

impl ServiceAccountToken {
    /// A one-hour token for the service account, with the server's audience, bound to nothing.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        ServiceAccountToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            audiences: Vec::new(),
            expires_in: Duration::from_secs(3600),
            pod: None,
            node: None,
            issued_at: None,
        }
    }

    pub fn audience(mut self, aud: &str) -> Self {
        self.audiences.push(aud.to_owned());
        self
    }

    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = d;
        self
    }

    pub fn pod(mut self, name: &str, uid: &str) -> Self {
        self.pod = Some((name.to_owned(), uid.to_owned()));
        self
    }

    pub fn node(mut self, name: &str, uid: &str) -> Self {
        self.node = Some((name.to_owned(), uid.to_owned()));
        self
    }

    pub fn issued_at(mut self, t: SystemTime) -> Self {
        self.issued_at = Some(t);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectRef {
    pub(crate) name: String,
    pub(crate) uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KubernetesClaims {
    pub(crate) namespace: String,
    pub(crate) serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pod: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<ObjectRef>,
}

/// The claims of a bound service-account token (Kubernetes 1.30+ layout).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: Vec<String>,
    pub(crate) exp: u64,
    pub(crate) iat: u64,
    pub(crate) nbf: u64,
    pub(crate) jti: String,
    #[serde(rename = "kubernetes.io")]
    pub(crate) kubernetes: KubernetesClaims,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not generate the token signing key")]
    Generate,
}

/// The server's service-account signing key (P-256, generated at start, never persisted).
pub(crate) struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    /// The public point's coordinates, base64url, for the JWKS document.
    x: String,
    y: String,
}

impl TokenKey {
    pub(crate) fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| KeyError::Generate)?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).map_err(|_| KeyError::Generate)?;
        // An uncompressed point: 0x04 || x || y, which is also what ring verifies against.
        let public = pair.public_key().as_ref();
        let (x, y) = public[1..].split_at(32);
        Ok(TokenKey {
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            decoding: DecodingKey::from_ec_der(public),
            kid: URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, public)),
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
        })
    }

    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    /// Signature, algorithm, issuer and the time claims (with go-jose's leeway).
    pub(crate) fn verify(&self, token: &str, issuer: &str) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = LEEWAY.as_secs();
        v.validate_nbf = true;
        // The authenticator checks `aud` against the request's audiences itself.
        v.validate_aud = false;
        v.set_issuer(&[issuer]);
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map(|d| d.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => "token is expired (exp)".to_owned(),
                ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => "error in cryptographic primitive".to_owned(),
                ErrorKind::InvalidIssuer => "token issuer is not this server".to_owned(),
                other => format!("{other:?}"),
            }
        })
    }

    /// The JWKS document served at `/openid/v1/jwks`.
    pub(crate) fn jwks(&self) -> Value {
        json!({ "keys": [{ "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256", "x": self.x, "y": self.y }] })
    }
}

/// Builds the claims kube-apiserver would put in a TokenRequest's token.
pub(crate) fn claims_for(spec: &ServiceAccountToken, issuer: &str, default_audience: &str, sa_uid: &str) -> Claims {
    let iat = spec.issued_at.unwrap_or_else(SystemTime::now).duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aud = if spec.audiences.is_empty() { vec![default_audience.to_owned()] } else { spec.audiences.clone() };
    let r = |(name, uid): &(String, String)| ObjectRef { name: name.clone(), uid: uid.clone() };
    Claims {
        iss: issuer.to_owned(),
        sub: format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
        aud,
        exp: iat + spec.expires_in.as_secs(),
        iat,
        nbf: iat,
        jti: crate::meta::new_uid(),
        kubernetes: KubernetesClaims {
            namespace: spec.namespace.clone(),
            serviceaccount: ObjectRef { name: spec.service_account.clone(), uid: sa_uid.to_owned() },
            pod: spec.pod.as_ref().map(r),
            node: spec.node.as_ref().map(r),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://kubernetes.default.svc";

    #[test]
    fn tokens_round_trip_and_reject_other_keys() {
        let key = TokenKey::generate().unwrap();
        let claims = claims_for(&ServiceAccountToken::new("ns", "sa").pod("p", "u1"), ISS, ISS, "sa-uid");
        let token = key.sign(&claims).unwrap();
        assert_eq!(key.verify(&token, ISS).unwrap(), claims);
        assert!(key.verify(&token, "https://elsewhere").is_err());
        let other = TokenKey::generate().unwrap();
        assert_eq!(other.verify(&token, ISS).unwrap_err(), "error in cryptographic primitive");
    }

    #[test]
    fn time_claims_are_checked_with_leeway() {
        let key = TokenKey::generate().unwrap();
        let sign = |spec: ServiceAccountToken| key.sign(&claims_for(&spec, ISS, ISS, "u")).unwrap();
        let now = SystemTime::now();
        let expired = sign(ServiceAccountToken::new("ns", "sa").issued_at(now - Duration::from_secs(7200)));
        assert_eq!(key.verify(&expired, ISS).unwrap_err(), "token is expired (exp)");
        let future = sign(ServiceAccountToken::new("ns", "sa").issued_at(now + Duration::from_secs(600)));
        assert_eq!(key.verify(&future, ISS).unwrap_err(), "token not valid yet (nbf)");
        let barely = sign(ServiceAccountToken::new("ns", "sa").issued_at(now - Duration::from_secs(3630)));
        assert!(key.verify(&barely, ISS).is_ok(), "within the 60 s leeway");
    }
}
