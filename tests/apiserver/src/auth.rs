//! Authentication: static bearer tokens the test registers, and the service-account JWTs the
//! server issues, checked as kube-apiserver checks them (audience, bound objects still there).

mod token;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use self::token::{Claims, TokenKey};
pub use self::token::{KeyError, ServiceAccountToken};
use crate::meta;

const AUTHENTICATED: &str = "system:authenticated";

/// Who made a request, as `TokenReview.status.user` and admission's `userInfo` say it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn new(username: &str, groups: &[&str]) -> Self {
        UserInfo { username: username.to_owned(), groups: groups.iter().map(|g| (*g).to_owned()).collect(), ..Default::default() }
    }
}

/// A successful authentication: the user and the audiences the credential is good for.
#[derive(Clone, Debug)]
pub(crate) struct Authenticated {
    pub(crate) user: UserInfo,
    pub(crate) audiences: Vec<String>,
}

/// Looks up the uid of a core/v1 object (`pods`, `nodes`, `serviceaccounts`), to check that what
/// a token is bound to still exists.
pub(crate) trait BoundObjects {
    fn uid(&self, plural: &str, namespace: Option<&str>, name: &str) -> Option<String>;
}

pub(crate) struct Authenticator {
    static_tokens: RwLock<HashMap<String, UserInfo>>,
    key: TokenKey,
    issuer: String,
    audience: String,
    /// Uids of service accounts that have no object in the store, so their tokens agree.
    sa_uids: Mutex<HashMap<(String, String), String>>,
}

impl Authenticator {
    pub(crate) fn new(issuer: &str, audience: &str) -> Result<Self, KeyError> {
        Ok(Authenticator {
            static_tokens: RwLock::default(),
            key: TokenKey::generate()?,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            sa_uids: Mutex::default(),
        })
    }

    pub(crate) fn issuer(&self) -> &str {
        &self.issuer
    }

    pub(crate) fn jwks(&self) -> serde_json::Value {
        self.key.jwks()
    }

    pub(crate) fn add_static(&self, token: &str, user: UserInfo) {
        self.static_tokens.write().unwrap_or_else(|e| e.into_inner()).insert(token.to_owned(), user);
    }

    /// Signs a token; `stored_sa_uid` is the ServiceAccount object's uid when it exists.
    pub(crate) fn issue(&self, spec: &ServiceAccountToken, stored_sa_uid: Option<String>) -> Result<String, jsonwebtoken::errors::Error> {
        let uid = stored_sa_uid.unwrap_or_else(|| {
            let mut uids = self.sa_uids.lock().unwrap_or_else(|e| e.into_inner());
            uids.entry((spec.namespace.clone(), spec.service_account.clone())).or_insert_with(meta::new_uid).clone()
        });
        self.key.sign(&token::claims_for(spec, &self.issuer, &self.audience, &uid))
    }

    /// Authenticates a bearer token for `audiences` (empty: the server's own). Errors read like
    /// the real `TokenReview.status.error`.
    pub(crate) fn authenticate(&self, token: &str, audiences: &[String], bound: &dyn BoundObjects) -> Result<Authenticated, String> {
        let wanted: Vec<String> = if audiences.is_empty() { vec![self.audience.clone()] } else { audiences.to_vec() };
        let found = self.static_tokens.read().unwrap_or_else(|e| e.into_inner()).get(token).cloned();
        if let Some(mut user) = found {
            // Static tokens are audience-agnostic: good for whatever was asked.
            if !user.groups.iter().any(|g| g == AUTHENTICATED) {
                user.groups.push(AUTHENTICATED.to_owned());
            }
            return Ok(Authenticated { user, audiences: wanted });
        }
        let invalid = |why: String| format!("[invalid bearer token, {why}]");
        if token.split('.').count() != 3 {
            return Err(invalid("token lookup failed".to_owned()));
        }
        let claims = self.key.verify(token, &self.issuer).map_err(invalid)?;
        let matched: Vec<String> = wanted.iter().filter(|a| claims.aud.contains(a)).cloned().collect();
        if matched.is_empty() {
            return Err(invalid(format!("token audiences {:?} is invalid for the target audiences {:?}", claims.aud, wanted)));
        }
        check_bound(&claims, bound).map_err(|why| invalid(why.to_owned()))?;
        Ok(Authenticated { user: service_account_user(&claims), audiences: matched })
    }
}

/// What kube-apiserver's service-account validator checks: the service account (when it has an
/// object here), the pod a token is bound to, or the node when it is bound to the node itself.
fn check_bound(claims: &Claims, bound: &dyn BoundObjects) -> Result<(), &'static str> {
    const INVALIDATED: &str = "service account token has been invalidated";
    let k = &claims.kubernetes;
    let ns = Some(k.namespace.as_str());
    if bound.uid("serviceaccounts", ns, &k.serviceaccount.name).is_some_and(|uid| uid != k.serviceaccount.uid) {
        return Err(INVALIDATED);
    }
    if let Some(pod) = &k.pod {
        if bound.uid("pods", ns, &pod.name).as_deref() != Some(pod.uid.as_str()) {
            return Err(INVALIDATED);
        }
    } else if let Some(node) = &k.node
        && bound.uid("nodes", None, &node.name).as_deref() != Some(node.uid.as_str())
    {
        return Err(INVALIDATED);
    }
    Ok(())
}

/// The user a service-account token stands for, with the `extra` keys of Kubernetes 1.32+.
fn service_account_user(claims: &Claims) -> UserInfo {
    let k = &claims.kubernetes;
    let mut extra = BTreeMap::new();
    let mut put = |key: &str, value: &str| extra.insert(format!("authentication.kubernetes.io/{key}"), vec![value.to_owned()]);
    put("credential-id", &format!("JTI={}", claims.jti));
    if let Some(pod) = &k.pod {
        put("pod-name", &pod.name);
        put("pod-uid", &pod.uid);
    }
    if let Some(node) = &k.node {
        put("node-name", &node.name);
        put("node-uid", &node.uid);
    }
    UserInfo {
        username: format!("system:serviceaccount:{}:{}", k.namespace, k.serviceaccount.name),
        uid: k.serviceaccount.uid.clone(),
        groups: vec!["system:serviceaccounts".to_owned(), format!("system:serviceaccounts:{}", k.namespace), AUTHENTICATED.to_owned()],
        extra,
    }
}
