//! Node attestation: evidence in, a node name out.
//!
//! Standalone mode uses join tokens: an admin makes one for a named node
//! (`identity-ca token create --node NAME`); it is single-use, expires, and
//! only its SHA-256 is stored. Kubernetes mode ([`k8s`]) checks a projected
//! service-account token with the API server's TokenReview.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rand::RngCore as _;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::authority::now_unix;
use crate::store::{self, JOIN_TOKENS, Store, StoreError};

pub mod k8s;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Join tokens are 32 random bytes, so they cannot be guessed; anything
/// longer than this is not one of ours.
pub const MAX_EVIDENCE_BYTES: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// Deliberately vague towards the caller: unknown, used and expired
    /// tokens look the same from outside. The log says which.
    #[error("attestation failed: the evidence is not valid; ask the admin for a new join token")]
    Refused { reason: &'static str },
    #[error("attestation evidence is malformed: {reason}")]
    Malformed { reason: String },
    #[error("this attestation method is not enabled on the CA")]
    Unsupported,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kubernetes token review failed: {reason}; check the CA's API server access")]
    Review { reason: String },
}

/// What a node presents.
#[derive(Clone)]
pub enum Evidence {
    JoinToken(String),
    K8sServiceAccountToken(String),
}

/// Who the node turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    pub node_name: String,
    /// "join_token" or "k8s_psat", for logs and metrics.
    pub method: &'static str,
}

/// One way of attesting nodes.
pub trait NodeAttestor: Send + Sync {
    fn attest<'a>(&'a self, evidence: &'a Evidence) -> BoxFuture<'a, Result<AttestedNode, AttestError>>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    node: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

/// Join tokens kept in the store.
#[derive(Clone)]
pub struct JoinTokens {
    store: Store,
}

// === impl JoinTokens ===

impl JoinTokens {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Makes a token for `node`, valid for `ttl`. Returns the token and its expiry.
    pub fn create(&self, node: &str, ttl: Duration) -> Result<(String, i64), StoreError> {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = B64URL.encode(raw);
        let now = now_unix();
        let rec = TokenRecord { node: node.to_owned(), created_at: now, expires_at: now + ttl.as_secs() as i64, used_at: None };
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(JOIN_TOKENS).map_err(store::err("open table"))?;
            t.insert(hash(&token).as_slice(), store::encode(&rec).as_slice()).map_err(store::err("write"))?;
        }
        Store::commit(tx)?;
        Ok((token, rec.expires_at))
    }

    /// Consumes `token` atomically: it works once, before it expires.
    pub fn consume(&self, token: &str) -> Result<String, AttestError> {
        if token.is_empty() || token.len() > MAX_EVIDENCE_BYTES {
            return Err(AttestError::Malformed { reason: "join token is empty or too long".into() });
        }
        let key = hash(token);
        let now = now_unix();
        // Refuse from a read: an unauthenticated flood of bad tokens must
        // never queue on the store's single write lock.
        {
            let rx = self.store.read()?;
            let t = rx.open_table(JOIN_TOKENS).map_err(store::err("open table"))?;
            usable(t.get(key.as_slice()).map_err(store::err("read"))?.map(|v| v.value().to_vec()), now)?;
        }
        // Checked again under the write lock: of two racing uses, one wins.
        let tx = self.store.write()?;
        let node = {
            let mut t = tx.open_table(JOIN_TOKENS).map_err(store::err("open table"))?;
            let found = t.get(key.as_slice()).map_err(store::err("read"))?.map(|v| v.value().to_vec());
            let rec = usable(found, now)?;
            let used = TokenRecord { used_at: Some(now), ..rec.clone() };
            t.insert(key.as_slice(), store::encode(&used).as_slice()).map_err(store::err("write"))?;
            rec.node
        };
        Store::commit(tx)?;
        Ok(node)
    }

    /// Forgets tokens that expired more than `grace` ago (used or not).
    pub fn prune(&self, grace: Duration) -> Result<(), StoreError> {
        let cutoff = now_unix() - grace.as_secs() as i64;
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(JOIN_TOKENS).map_err(store::err("open table"))?;
            t.retain(|_, v| serde_json::from_slice::<TokenRecord>(v).map(|r| r.expires_at > cutoff).unwrap_or(true))
                .map_err(store::err("write"))?;
        }
        Store::commit(tx)
    }
}

/// The token's record, if it may still be used at `now`.
fn usable(found: Option<Vec<u8>>, now: i64) -> Result<TokenRecord, AttestError> {
    let rec: TokenRecord = match found {
        Some(v) => store::decode("join_tokens", "<token>", &v)?,
        None => return Err(AttestError::Refused { reason: "unknown join token" }),
    };
    if rec.used_at.is_some() {
        return Err(AttestError::Refused { reason: "join token already used" });
    }
    if rec.expires_at <= now {
        return Err(AttestError::Refused { reason: "join token expired" });
    }
    Ok(rec)
}

fn hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec()
}

impl NodeAttestor for JoinTokens {
    fn attest<'a>(&'a self, evidence: &'a Evidence) -> BoxFuture<'a, Result<AttestedNode, AttestError>> {
        Box::pin(async move {
            match evidence {
                Evidence::JoinToken(t) => {
                    let this = self.clone();
                    let t = t.clone();
                    let node = tokio::task::spawn_blocking(move || this.consume(&t))
                        .await
                        .map_err(|e| AttestError::Malformed { reason: e.to_string() })??;
                    Ok(AttestedNode { node_name: node, method: "join_token" })
                }
                _ => Err(AttestError::Unsupported),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_work_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "db", "td").unwrap();
        let tokens = JoinTokens::new(store.clone());
        let (t, _) = tokens.create("node-1", Duration::from_secs(60)).unwrap();
        assert_eq!(tokens.consume(&t).unwrap(), "node-1");
        assert!(matches!(tokens.consume(&t), Err(AttestError::Refused { reason: "join token already used" })));
        let (expired, _) = tokens.create("node-2", Duration::ZERO).unwrap();
        assert!(matches!(tokens.consume(&expired), Err(AttestError::Refused { reason: "join token expired" })));
        assert!(matches!(tokens.consume("forged"), Err(AttestError::Refused { reason: "unknown join token" })));
        assert!(matches!(tokens.consume(""), Err(AttestError::Malformed { .. })));
        // The raw token is not stored.
        drop(tokens);
        drop(store);
        let bytes = std::fs::read(dir.path().join("db")).unwrap();
        assert!(!bytes.windows(t.len()).any(|w| w == t.as_bytes()));
    }
}
