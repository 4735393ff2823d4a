//! The validating admission hook: what a ValidatingAdmissionPolicy (or webhook) would be shown,
//! and the function that says yes or no.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::UserInfo;

/// `request.operation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Create,
    Update,
    Delete,
}

/// One write as admission sees it, after defaulting and before it is stored.
#[derive(Clone, Debug)]
pub struct AdmissionRequest {
    pub operation: Operation,
    pub group: String,
    pub version: String,
    /// The plural, e.g. `meshpolicies`.
    pub resource: String,
    /// `Some("status")` for status writes.
    pub sub_resource: Option<String>,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub user_info: UserInfo,
    /// The object as it would be stored; `None` for DELETE.
    pub object: Option<Value>,
    /// The stored object; `None` for CREATE.
    pub old_object: Option<Value>,
    /// The object's Namespace, as CEL's `namespaceObject` (when it exists in the store).
    pub namespace_object: Option<Value>,
    pub dry_run: bool,
}

/// Says whether a write may happen; `Err(message)` denies it with 422 `Invalid` and the message.
///
/// Called without the store locked, so it may read the server through the test controls.
pub type AdmissionHook = Arc<dyn Fn(&AdmissionRequest) -> Result<(), String> + Send + Sync>;

impl AdmissionRequest {
    /// The `admission.k8s.io/v1` `AdmissionRequest` shape (CEL's `request` variable, a webhook's
    /// `request` field), for evaluators that want the JSON.
    pub fn request_json(&self) -> Value {
        json!({
            "uid": crate::meta::new_uid(),
            "kind": { "group": self.group, "version": self.version, "kind": self.kind },
            "resource": { "group": self.group, "version": self.version, "resource": self.resource },
            "subResource": self.sub_resource,
            "requestKind": { "group": self.group, "version": self.version, "kind": self.kind },
            "requestResource": { "group": self.group, "version": self.version, "resource": self.resource },
            "requestSubResource": self.sub_resource,
            "name": self.name,
            "namespace": self.namespace,
            "operation": self.operation,
            "userInfo": self.user_info,
            "object": self.object,
            "oldObject": self.old_object,
            "dryRun": self.dry_run,
        })
    }
}
