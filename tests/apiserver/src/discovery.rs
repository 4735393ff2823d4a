//! Discovery documents (`/api`, `/apis`, `/apis/{group}`, `/api/v1`, `/apis/{g}/{v}`), `/version`
//! and OIDC issuer discovery, in the real server's shapes. Typed clients do not need discovery;
//! dynamic ones and `kubectl`-like tools do.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::resource::Resource;

/// The Kubernetes version the server says it is: the oldest the project supports.
const VERSION: (&str, &str) = ("1", "33");

const VERBS: [&str; 7] = ["create", "delete", "get", "list", "patch", "update", "watch"];

/// TokenReview is served beside the registered resources, create-only.
fn token_reviews() -> Resource {
    Resource::new("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", false).without_status_subresource()
}

pub(crate) fn version() -> Value {
    let (major, minor) = VERSION;
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": format!("v{major}.{minor}.0+meshguard-test"),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub(crate) fn api_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string() }],
    })
}

fn all(resources: &[Arc<Resource>]) -> Vec<Resource> {
    resources.iter().map(|r| (**r).clone()).chain([token_reviews()]).collect()
}

fn group_json(group: &str, versions: &BTreeSet<String>) -> Value {
    let versions: Vec<Value> = versions.iter().map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v })).collect();
    json!({ "name": group, "versions": versions, "preferredVersion": versions.first() })
}

pub(crate) fn groups(resources: &[Arc<Resource>]) -> Value {
    let mut by_group = std::collections::BTreeMap::<String, BTreeSet<String>>::new();
    for r in all(resources).into_iter().filter(|r| !r.group.is_empty()) {
        by_group.entry(r.group).or_default().insert(r.version);
    }
    let groups: Vec<Value> = by_group.iter().map(|(g, vs)| group_json(g, vs)).collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

pub(crate) fn group(resources: &[Arc<Resource>], group: &str) -> Option<Value> {
    let versions: BTreeSet<String> = all(resources).into_iter().filter(|r| r.group == group).map(|r| r.version).collect();
    if versions.is_empty() {
        return None;
    }
    let mut g = group_json(group, &versions);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

pub(crate) fn resource_list(resources: &[Arc<Resource>], group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in all(resources).iter().filter(|r| r.group == group && r.version == version) {
        let verbs: &[&str] = if r.plural == "tokenreviews" { &["create"] } else { &VERBS };
        list.push(json!({
            "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs,
        }));
        if r.status_subresource {
            list.push(json!({ "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"] }));
        }
    }
    if list.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list }))
}

pub(crate) fn openid_configuration(issuer: &str, url: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{url}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}
