//! URL paths, as kube-apiserver lays them out:
//! `/api/v1[/namespaces/{ns}]/{plural}[/{name}[/status]]` for the core group and
//! `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/status]]` for the others.

use super::query::decode;
use crate::store::{ResourceId, Store};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/healthz`, `/livez`, `/readyz`.
    Health,
    Version,
    OpenIdConfiguration,
    Jwks,
    /// `/api`.
    CoreVersions,
    /// `/apis`.
    Groups,
    /// `/apis/{group}`.
    Group(&'a str),
    /// `/api/v1`, `/apis/{group}/{version}`.
    ResourceList {
        group: &'a str,
        version: &'a str,
    },
    TokenReview,
    /// Anything under a group version, resolved against the registered resources.
    Resource {
        group: &'a str,
        version: &'a str,
        rest: Vec<&'a str>,
    },
    NotFound,
}

impl Route<'_> {
    /// Paths served without a credential, as the real server's `system:public-info-viewer` and
    /// issuer discovery allow.
    pub(crate) fn is_public(&self) -> bool {
        matches!(self, Route::Health | Route::Version | Route::OpenIdConfiguration | Route::Jwks)
    }
}

pub(crate) fn parse(path: &str) -> Route<'_> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["version"] => Route::Version,
        [".well-known", "openid-configuration"] => Route::OpenIdConfiguration,
        ["openid", "v1", "jwks"] => Route::Jwks,
        ["api"] => Route::CoreVersions,
        ["api", "v1"] => Route::ResourceList { group: "", version: "v1" },
        ["api", "v1", rest @ ..] => Route::Resource { group: "", version: "v1", rest: rest.to_vec() },
        ["apis"] => Route::Groups,
        ["apis", group] => Route::Group(group),
        ["apis", group, version] => Route::ResourceList { group, version },
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Route::TokenReview,
        ["apis", group, version, rest @ ..] => Route::Resource { group, version, rest: rest.to_vec() },
        _ => Route::NotFound,
    }
}

/// A resource path resolved to a registered resource.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) id: ResourceId,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    /// The `/status` subresource.
    pub(crate) status: bool,
}

/// Resolves the segments after the group version; `None` is a 404.
pub(crate) fn resolve(store: &Store, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let rest: Vec<String> = rest.iter().map(|s| decode(s)).collect();
    // `/namespaces/{ns}/{plural}...` when `{plural}` is namespaced; otherwise `namespaces` is
    // the resource itself (`/api/v1/namespaces/{name}/status`).
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Some(id) = store.find(group, version, &rest[2]).filter(|id| store.resource(*id).namespaced)
    {
        return target(store, id, Some(rest[1].clone()), &rest[3..]);
    }
    let id = store.find(group, version, rest.first()?)?;
    if store.resource(id).namespaced && rest.len() > 1 {
        return None;
    }
    target(store, id, None, &rest[1..])
}

fn target(store: &Store, id: ResourceId, namespace: Option<String>, tail: &[String]) -> Option<Target> {
    let status = match tail {
        [] | [_] => false,
        [_, sub] if sub == "status" && store.resource(id).status_subresource => true,
        _ => return None,
    };
    Some(Target { id, namespace, name: tail.first().cloned(), status })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Resource;

    fn resolve_path(store: &Store, path: &str) -> Option<(String, Option<String>, Option<String>, bool)> {
        let Route::Resource { group, version, rest } = parse(path) else { return None };
        let t = resolve(store, group, version, &rest)?;
        Some((store.resource(t.id).plural.clone(), t.namespace, t.name, t.status))
    }

    #[test]
    fn paths_resolve_as_in_kubernetes() {
        let s = Store::new(Resource::builtins());
        let r = |p| resolve_path(&s, p);
        let some = |plural: &str, ns: Option<&str>, name: Option<&str>, status| {
            Some((plural.to_owned(), ns.map(str::to_owned), name.map(str::to_owned), status))
        };
        assert_eq!(r("/api/v1/pods"), some("pods", None, None, false));
        assert_eq!(r("/api/v1/namespaces/ns/pods"), some("pods", Some("ns"), None, false));
        assert_eq!(r("/api/v1/namespaces/ns/pods/p/status"), some("pods", Some("ns"), Some("p"), true));
        assert_eq!(r("/api/v1/namespaces"), some("namespaces", None, None, false));
        assert_eq!(r("/api/v1/namespaces/ns"), some("namespaces", None, Some("ns"), false));
        assert_eq!(r("/api/v1/namespaces/ns/status"), some("namespaces", None, Some("ns"), true));
        assert_eq!(r("/api/v1/nodes/n1"), some("nodes", None, Some("n1"), false));
        assert_eq!(r("/apis/meshguard.io/v1alpha1/namespaces/ns/meshpolicies/p"), some("meshpolicies", Some("ns"), Some("p"), false));
        assert_eq!(r("/apis/meshguard.io/v1alpha1/meshnodes/n/status"), some("meshnodes", None, Some("n"), true));
        assert_eq!(r("/api/v1/pods/p"), None, "a namespaced object needs its namespace");
        assert_eq!(r("/api/v1/namespaces/ns/pods/p/exec"), None);
        assert_eq!(r("/api/v1/namespaces/ns/serviceaccounts/sa/status"), None, "no status subresource");
        assert_eq!(r("/apis/meshguard.io/v1/meshnodes"), None);
        assert_eq!(parse("/apis/authentication.k8s.io/v1/tokenreviews"), Route::TokenReview);
    }
}
