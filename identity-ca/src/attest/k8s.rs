//! Kubernetes node attestation: [`K8sAttestor`] with the API server's
//! TokenReview ([`ApiServerReviewer`]).
//!
//! The node agent presents a projected service-account token (audience
//! [`DEFAULT_AUDIENCE`], bound to its pod). The CA asks the API server's
//! TokenReview whether it is authentic, then requires: the audience is ours,
//! the user is the agent's service account, and the token is bound to a pod
//! whose node the API server names (`authentication.kubernetes.io/node-name`,
//! set for pod-bound tokens since Kubernetes 1.30). That node is the result:
//! the node name comes from the API server, never from the caller.

use super::{AttestError, AttestedNode, BoxFuture, Evidence, NodeAttestor};

pub const DEFAULT_AUDIENCE: &str = "meshguard-identity-ca";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// The status of a TokenReview, as the API server returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReviewStatus {
    pub authenticated: bool,
    /// `system:serviceaccount:<namespace>:<name>`
    pub username: String,
    pub audiences: Vec<String>,
    /// `user.extra`, one value per key as bound tokens carry.
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
    pub error: String,
}

/// The API server's TokenReview, behind a trait so tests need no cluster.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> BoxFuture<'a, Result<TokenReviewStatus, AttestError>>;
}

/// TokenReview through the API server (`authentication.k8s.io/v1`); the
/// CA's own service account needs `create` on `tokenreviews`.
#[derive(Clone)]
pub struct ApiServerReviewer {
    client: kube::Client,
}

impl ApiServerReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

/// The CA's API server client: from `kubeconfig` if given; else in the
/// cluster the pod's service account, outside it `$KUBECONFIG` or
/// `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, AttestError> {
    meshguard_k8s::client(kubeconfig).await.map_err(|e| AttestError::Review { reason: e.to_string() })
}

impl TokenReviewer for ApiServerReviewer {
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> BoxFuture<'a, Result<TokenReviewStatus, AttestError>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(audiences.to_vec()) },
                ..Default::default()
            };
            // The error names the API server's complaint, never the token.
            let done =
                api.create(&kube::api::PostParams::default(), &review).await.map_err(|e| AttestError::Review { reason: e.to_string() })?;
            let status = done.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(TokenReviewStatus {
                authenticated: status.authenticated.unwrap_or(false),
                username: user.username.unwrap_or_default(),
                audiences: status.audiences.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                error: status.error.unwrap_or_default(),
            })
        })
    }
}

/// Attests nodes by their agent's projected service-account token.
pub struct K8sAttestor<R> {
    reviewer: R,
    audience: String,
    /// `(namespace, service account)` the node agents run as.
    agent: (String, String),
}

impl<R: TokenReviewer> K8sAttestor<R> {
    pub fn new(reviewer: R, audience: impl Into<String>, agent_namespace: &str, agent_service_account: &str) -> Self {
        Self { reviewer, audience: audience.into(), agent: (agent_namespace.to_owned(), agent_service_account.to_owned()) }
    }

    async fn attest_token(&self, token: &str) -> Result<AttestedNode, AttestError> {
        if token.is_empty() || token.len() > super::MAX_EVIDENCE_BYTES {
            return Err(AttestError::Malformed { reason: "service-account token is empty or too long".into() });
        }
        let audiences = vec![self.audience.clone()];
        let status = self.reviewer.review(token, &audiences).await?;
        if !status.authenticated {
            return Err(AttestError::Refused { reason: "token review: not authenticated" });
        }
        if !status.audiences.contains(&self.audience) {
            return Err(AttestError::Refused { reason: "token review: wrong audience" });
        }
        let want = format!("system:serviceaccount:{}:{}", self.agent.0, self.agent.1);
        if status.username != want {
            return Err(AttestError::Refused { reason: "token review: not the node agent's service account" });
        }
        if status.extra.get(EXTRA_POD_NAME).is_none_or(|v| v.len() != 1) {
            return Err(AttestError::Refused { reason: "token review: token is not bound to a pod" });
        }
        let node = match status.extra.get(EXTRA_NODE_NAME).map(Vec::as_slice) {
            Some([node]) => node.clone(),
            _ => return Err(AttestError::Refused { reason: "token review: no node name bound to the token" }),
        };
        meshguard_common::spiffe::validate_segment(&node).map_err(|e| AttestError::Malformed { reason: format!("node name: {e}") })?;
        Ok(AttestedNode { node_name: node, method: "k8s_psat" })
    }
}

impl<R: TokenReviewer> NodeAttestor for K8sAttestor<R> {
    fn attest<'a>(&'a self, evidence: &'a Evidence) -> BoxFuture<'a, Result<AttestedNode, AttestError>> {
        Box::pin(async move {
            match evidence {
                Evidence::K8sServiceAccountToken(t) => self.attest_token(t).await,
                _ => Err(AttestError::Unsupported),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Answers from a fixed table: token → status.
    struct FakeReviewer(BTreeMap<String, TokenReviewStatus>);

    impl TokenReviewer for FakeReviewer {
        fn review<'a>(&'a self, token: &'a str, _aud: &'a [String]) -> BoxFuture<'a, Result<TokenReviewStatus, AttestError>> {
            Box::pin(async move { Ok(self.0.get(token).cloned().unwrap_or_default()) })
        }
    }

    fn good() -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: true,
            username: "system:serviceaccount:meshguard:auth-handshake".into(),
            audiences: vec![DEFAULT_AUDIENCE.into()],
            extra: [
                (EXTRA_NODE_NAME.to_owned(), vec!["node-1".to_owned()]),
                (EXTRA_POD_NAME.to_owned(), vec!["auth-handshake-abcde".to_owned()]),
            ]
            .into(),
            error: String::new(),
        }
    }

    #[tokio::test]
    async fn accepts_only_the_agents_bound_token() {
        let mut table = BTreeMap::new();
        table.insert("good".to_owned(), good());
        table.insert("wrong-sa".to_owned(), TokenReviewStatus { username: "system:serviceaccount:shop:web".into(), ..good() });
        table.insert("wrong-aud".to_owned(), TokenReviewStatus { audiences: vec!["api".into()], ..good() });
        let mut unbound = good();
        unbound.extra.remove(EXTRA_NODE_NAME);
        table.insert("unbound".to_owned(), unbound);
        let mut bad_node = good();
        bad_node.extra.insert(EXTRA_NODE_NAME.into(), vec!["../x".into()]);
        table.insert("bad-node".to_owned(), bad_node);
        let a = K8sAttestor::new(FakeReviewer(table), DEFAULT_AUDIENCE, "meshguard", "auth-handshake");

        let ok = a.attest(&Evidence::K8sServiceAccountToken("good".into())).await.unwrap();
        assert_eq!(ok, AttestedNode { node_name: "node-1".into(), method: "k8s_psat" });
        for t in ["forged", "wrong-sa", "wrong-aud", "unbound"] {
            let r = a.attest(&Evidence::K8sServiceAccountToken(t.into())).await;
            assert!(matches!(r, Err(AttestError::Refused { .. })), "{t}: {r:?}");
        }
        assert!(matches!(a.attest(&Evidence::K8sServiceAccountToken("bad-node".into())).await, Err(AttestError::Malformed { .. })));
        assert!(matches!(a.attest(&Evidence::JoinToken("x".into())).await, Err(AttestError::Unsupported)));
    }
}
