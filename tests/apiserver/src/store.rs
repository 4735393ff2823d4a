//! The object store: one map per resource keyed as etcd keys them (`namespace/name`, or `name`
//! for cluster-scoped resources), one global revision, and the write rules the real registry
//! applies (metadata stamping, `generation`, the status subresource, finalizers, no-op writes).
//!
//! A write is planned from the current state, shown to admission without the lock held, then
//! committed only if the object has not changed meanwhile (else planned again).

mod history;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Value, json};

use self::history::History;
pub(crate) use self::history::{Change, ChangeKind, WatchRx};
use crate::admission::Operation;
use crate::auth::BoundObjects;
use crate::meta;
use crate::patch::{self, PatchKind};
use crate::resource::Resource;
use crate::status::{ApiError, Reason};

/// Index of a resource in the store's registry; stable for the server's lifetime.
pub(crate) type ResourceId = usize;

/// The revision an empty store starts at, like a fresh etcd.
const FIRST_REVISION: u64 = 1;

pub(crate) struct Store {
    resources: Vec<Arc<Resource>>,
    objects: Vec<BTreeMap<String, Arc<Value>>>,
    revision: u64,
    pub(crate) history: History,
}

/// A write request against one resource.
#[derive(Clone, Debug)]
pub(crate) enum WriteOp {
    /// POST. `whole`: a test fixture, whose `.status` is kept (a real create drops it).
    Create {
        object: Value,
        whole: bool,
    },
    /// PUT to the object (or to `/status` when `status`). `whole`: a test control that writes
    /// every field and skips the resourceVersion precondition.
    Replace {
        object: Value,
        status: bool,
        whole: bool,
    },
    Patch {
        kind: PatchKind,
        patch: Value,
        status: bool,
    },
    /// DELETE with the optional preconditions of DeleteOptions.
    Delete {
        resource_version: Option<String>,
        uid: Option<String>,
    },
}

/// A write worked out against the current state, not yet stored.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) resource: ResourceId,
    pub(crate) key: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: String,
    pub(crate) operation: Operation,
    pub(crate) status: bool,
    /// The state the plan was made from; the commit checks it is still current.
    pub(crate) prev: Option<Arc<Value>>,
    pub(crate) next: Next,
}

#[derive(Debug)]
pub(crate) enum Next {
    /// Store this state (create or update).
    Put(Value),
    /// Remove the object; the value is its final state.
    Remove(Value),
    /// Nothing changes (a no-op update, or deleting an object already being finalized).
    Keep,
}

/// The object changed between planning and committing.
#[derive(Debug)]
pub(crate) struct Raced;

impl Plan {
    /// The object admission sees (`None` for DELETE, as in Kubernetes).
    pub(crate) fn object(&self) -> Option<&Value> {
        match (&self.next, self.operation) {
            (_, Operation::Delete) => None,
            (Next::Put(v) | Next::Remove(v), _) => Some(v),
            (Next::Keep, _) => self.prev.as_deref(),
        }
    }

    /// What the client gets back if this is a dry run.
    pub(crate) fn preview(&self) -> Value {
        match &self.next {
            Next::Put(v) | Next::Remove(v) => v.clone(),
            Next::Keep => self.prev.as_deref().cloned().unwrap_or(Value::Null),
        }
    }
}

// === impl Store ===

impl Store {
    pub(crate) fn new(resources: Vec<Resource>) -> Self {
        let mut store =
            Store { resources: Vec::new(), objects: Vec::new(), revision: FIRST_REVISION, history: History::new(FIRST_REVISION) };
        for r in resources {
            store.register(r);
        }
        store
    }

    /// Adds a resource, or replaces the definition of one with the same group, version and
    /// plural (keeping its objects).
    pub(crate) fn register(&mut self, r: Resource) -> ResourceId {
        if let Some(id) = self.find(&r.group, &r.version, &r.plural) {
            self.resources[id] = Arc::new(r);
            return id;
        }
        self.resources.push(Arc::new(r));
        self.objects.push(BTreeMap::new());
        self.resources.len() - 1
    }

    pub(crate) fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    pub(crate) fn resource(&self, id: ResourceId) -> &Arc<Resource> {
        &self.resources[id]
    }

    pub(crate) fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceId> {
        self.resources.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub(crate) fn find_kind(&self, api_version: &str, kind: &str) -> Option<ResourceId> {
        self.resources.iter().position(|r| r.api_version() == api_version && r.kind == kind)
    }

    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    pub(crate) fn key(&self, id: ResourceId, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.resources[id].namespaced => format!("{ns}/{name}"),
            _ => name.to_owned(),
        }
    }

    pub(crate) fn get(&self, id: ResourceId, key: &str) -> Option<&Arc<Value>> {
        self.objects[id].get(key)
    }

    pub(crate) fn objects(&self, id: ResourceId) -> &BTreeMap<String, Arc<Value>> {
        &self.objects[id]
    }

    /// The objects of a resource as they were at revision `at` (≤ the current one), rebuilt by
    /// undoing later changes; 410 when those changes were compacted away.
    pub(crate) fn snapshot(&self, id: ResourceId, at: u64) -> Result<BTreeMap<String, Arc<Value>>, ApiError> {
        let mut objects = self.objects[id].clone();
        if at >= self.revision {
            return Ok(objects);
        }
        for c in self.history.since(at, Some(id))?.iter().rev() {
            match &c.prev {
                Some(p) => objects.insert(c.key.clone(), p.clone()),
                None => objects.remove(&c.key),
            };
        }
        Ok(objects)
    }

    pub(crate) fn compact(&mut self) {
        self.history.compact(self.revision);
    }

    /// The Namespace object admission shows as `namespaceObject`.
    pub(crate) fn namespace_object(&self, ns: &str) -> Option<Value> {
        let id = self.find("", "v1", "namespaces")?;
        self.get(id, ns).map(|v| (**v).clone())
    }

    // --- writes ---

    /// Works out a write. `namespace` and `name` come from the URL (`name` is `None` for a create).
    pub(crate) fn plan(&self, id: ResourceId, namespace: Option<&str>, name: Option<&str>, op: &WriteOp) -> Result<Plan, ApiError> {
        let name = name.unwrap_or("");
        match op {
            WriteOp::Create { object, whole } => self.plan_create(id, namespace, object.clone(), *whole),
            WriteOp::Replace { object, status, whole } => {
                let prev = self.existing(id, namespace, name)?;
                self.plan_update(id, namespace, name, prev, object.clone(), *status, *whole)
            }
            WriteOp::Patch { kind, patch, status } => {
                let key = self.key(id, namespace, name);
                let Some(prev) = self.get(id, &key).cloned() else {
                    if *kind == PatchKind::Apply && !*status {
                        // Server-side apply creates what does not exist yet.
                        let mut object = patch.clone();
                        if object.is_object() && meta::name(&object).is_empty() {
                            meta::set_meta(&mut object, "name", json!(name));
                        }
                        return self.plan_create(id, namespace, object, false).and_then(|p| check_url_name(p, name));
                    }
                    return Err(ApiError::not_found(&self.resources[id], name));
                };
                let patched = match kind {
                    PatchKind::Json => patch::json_patch(&prev, patch).map_err(|e| ApiError::new(Reason::Invalid, e))?,
                    PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
                        if !patch.is_object() {
                            return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                        }
                        let mut t = (*prev).clone();
                        patch::merge_patch(&mut t, patch);
                        t
                    }
                };
                self.plan_update(id, namespace, name, prev, patched, *status, false)
            }
            WriteOp::Delete { resource_version, uid } => self.plan_delete(id, namespace, name, resource_version.as_deref(), uid.as_deref()),
        }
    }

    fn existing(&self, id: ResourceId, namespace: Option<&str>, name: &str) -> Result<Arc<Value>, ApiError> {
        self.get(id, &self.key(id, namespace, name)).cloned().ok_or_else(|| ApiError::not_found(&self.resources[id], name))
    }

    fn plan_create(&self, id: ResourceId, url_ns: Option<&str>, mut obj: Value, whole: bool) -> Result<Plan, ApiError> {
        let res = &self.resources[id];
        set_type(&mut obj, res)?;
        let namespace = self.scope(res, url_ns, &mut obj, true)?;
        let mut name = meta::name(&obj).to_owned();
        if name.is_empty() {
            let prefix = meta::str_at(&obj, "/metadata/generateName").unwrap_or("");
            if prefix.is_empty() {
                return Err(ApiError::invalid(res, "", "metadata.name: Required value: name or generateName is required"));
            }
            name = format!("{prefix}{}", meta::name_suffix());
            meta::set_meta(&mut obj, "name", json!(name));
        }
        validate_name(res, &name)?;
        let key = self.key(id, namespace.as_deref(), &name);
        if self.objects[id].contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        for field in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"] {
            meta::remove_meta(&mut obj, field);
        }
        meta::set_meta(&mut obj, "uid", json!(meta::new_uid()));
        meta::set_meta(&mut obj, "creationTimestamp", json!(meta::rfc3339(SystemTime::now())));
        meta::set_meta(&mut obj, "generation", json!(1));
        if res.status_subresource && !whole {
            // As the real registry does: a create cannot set what only `/status` writes.
            if let Value::Object(m) = &mut obj {
                m.remove("status");
            }
        }
        Ok(Plan { resource: id, key, namespace, name, operation: Operation::Create, status: false, prev: None, next: Next::Put(obj) })
    }

    #[allow(clippy::too_many_arguments)] // one call per write kind; a struct would only rename them
    fn plan_update(
        &self,
        id: ResourceId,
        url_ns: Option<&str>,
        name: &str,
        prev: Arc<Value>,
        mut body: Value,
        status: bool,
        whole: bool,
    ) -> Result<Plan, ApiError> {
        let res = &self.resources[id];
        set_type(&mut body, res)?;
        let namespace = self.scope(res, url_ns, &mut body, false)?;
        match meta::name(&body) {
            "" => meta::set_meta(&mut body, "name", json!(name)),
            n if n != name => {
                return Err(ApiError::bad_request(format!("the name of the object ({n}) does not match the name on the URL ({name})")));
            }
            _ => {}
        }
        let current_rv = meta::resource_version(&prev);
        let asked_rv = meta::resource_version(&body);
        if !whole && !asked_rv.is_empty() && asked_rv != current_rv {
            return Err(ApiError::conflict(
                res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }

        let mut next = if status {
            // A status write changes `.status` and nothing else.
            let mut n = (*prev).clone();
            set_or_remove(&mut n, "status", body.get("status").cloned());
            n
        } else {
            if res.status_subresource && !whole {
                set_or_remove(&mut body, "status", prev.get("status").cloned());
            }
            body
        };
        // Fields the server owns come from the stored object, whatever the client sent.
        for field in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
            match prev.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta::set_meta(&mut next, field, v.clone()),
                None => meta::remove_meta(&mut next, field),
            }
        }
        meta::set_meta(&mut next, "resourceVersion", json!(current_rv));
        if meta::spec_part(&next) != meta::spec_part(&prev) {
            meta::set_meta(&mut next, "generation", json!(generation(&prev) + 1));
        }

        let next = if next.pointer("/metadata/deletionTimestamp").is_some() && !meta::finalizers_pending(&next) {
            // The last finalizer is gone from an object being deleted: it goes now.
            Next::Remove(next)
        } else if meta::same_content(&next, &prev) {
            Next::Keep
        } else {
            Next::Put(next)
        };
        let key = self.key(id, namespace.as_deref(), name);
        Ok(Plan { resource: id, key, namespace, name: name.to_owned(), operation: Operation::Update, status, prev: Some(prev), next })
    }

    fn plan_delete(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        rv: Option<&str>,
        uid: Option<&str>,
    ) -> Result<Plan, ApiError> {
        let res = &self.resources[id];
        let prev = self.existing(id, namespace, name)?;
        if let Some(rv) = rv.filter(|rv| *rv != meta::resource_version(&prev)) {
            let why = format!(
                "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                meta::resource_version(&prev)
            );
            return Err(ApiError::conflict(res, name, &why));
        }
        let stored_uid = meta::str_at(&prev, "/metadata/uid").unwrap_or("");
        if let Some(uid) = uid.filter(|u| *u != stored_uid) {
            let why = format!(
                "the UID in the precondition ({uid}) does not match the UID in record ({stored_uid}). The object might have been deleted and then recreated"
            );
            return Err(ApiError::conflict(res, name, &why));
        }
        let next = if !meta::finalizers_pending(&prev) {
            Next::Remove((*prev).clone())
        } else if prev.pointer("/metadata/deletionTimestamp").is_some() {
            Next::Keep
        } else {
            // Finalizers pending: mark for deletion and wait for them to be removed.
            let mut n = (*prev).clone();
            meta::set_meta(&mut n, "deletionTimestamp", json!(meta::rfc3339(SystemTime::now())));
            meta::set_meta(&mut n, "deletionGracePeriodSeconds", json!(0));
            meta::set_meta(&mut n, "generation", json!(generation(&prev) + 1));
            Next::Put(n)
        };
        let key = self.key(id, namespace, name);
        let namespace = namespace.filter(|_| res.namespaced).map(str::to_owned);
        Ok(Plan {
            resource: id,
            key,
            namespace,
            name: name.to_owned(),
            operation: Operation::Delete,
            status: false,
            prev: Some(prev),
            next,
        })
    }

    /// Reconciles the object's namespace with the URL's: filled in when missing, 400 when they
    /// differ, removed for cluster-scoped resources. A create with neither lands in `default`.
    fn scope(&self, res: &Resource, url_ns: Option<&str>, obj: &mut Value, create: bool) -> Result<Option<String>, ApiError> {
        if !res.namespaced {
            meta::remove_meta(obj, "namespace");
            return Ok(None);
        }
        let ns = match (url_ns, meta::namespace(obj)) {
            (Some(u), Some(b)) if u != b => {
                return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
            }
            (Some(u), _) => u.to_owned(),
            (None, Some(b)) => b.to_owned(),
            (None, None) if create => "default".to_owned(),
            (None, None) => return Err(ApiError::bad_request("a namespaced object needs a namespace")),
        };
        meta::set_meta(obj, "namespace", json!(ns));
        Ok(Some(ns))
    }

    /// Stores a planned write if the object is still as planned: a new revision, stamped on the
    /// object, one change in the history, handed to the watchers.
    pub(crate) fn commit(&mut self, plan: Plan) -> Result<Value, Raced> {
        let current = self.objects[plan.resource].get(&plan.key);
        let unchanged = match (current, &plan.prev) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            return Err(Raced);
        }
        let (mut obj, kind) = match plan.next {
            Next::Keep => return Ok(plan.prev.as_deref().cloned().unwrap_or(Value::Null)),
            Next::Put(obj) => (obj, if plan.prev.is_some() { ChangeKind::Modified } else { ChangeKind::Added }),
            Next::Remove(obj) => (obj, ChangeKind::Deleted),
        };
        self.revision += 1;
        meta::set_meta(&mut obj, "resourceVersion", json!(self.revision.to_string()));
        let obj = Arc::new(obj);
        if kind == ChangeKind::Deleted {
            self.objects[plan.resource].remove(&plan.key);
        } else {
            self.objects[plan.resource].insert(plan.key.clone(), obj.clone());
        }
        let out = (*obj).clone();
        self.history.record(Change { rv: self.revision, resource: plan.resource, key: plan.key, kind, object: obj, prev: plan.prev });
        Ok(out)
    }
}

impl BoundObjects for Store {
    fn uid(&self, plural: &str, namespace: Option<&str>, name: &str) -> Option<String> {
        let id = self.find("", "v1", plural)?;
        let obj = self.get(id, &self.key(id, namespace, name))?;
        meta::str_at(obj, "/metadata/uid").map(str::to_owned)
    }
}

/// Fills in `apiVersion` and `kind`, or rejects an object of another type.
fn set_type(obj: &mut Value, res: &Resource) -> Result<(), ApiError> {
    let Value::Object(m) = obj else {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    };
    let api_version = res.api_version();
    for (field, want) in [("apiVersion", api_version.as_str()), ("kind", res.kind.as_str())] {
        match m.get(field) {
            None => {
                m.insert(field.to_owned(), json!(want));
            }
            Some(Value::String(s)) if s.is_empty() => {
                m.insert(field.to_owned(), json!(want));
            }
            Some(Value::String(s)) if s == want => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} of the provided object ({other}) does not match the expected {field} ({want})"
                )));
            }
        }
    }
    if m.get("metadata").is_some_and(|v| !v.is_object()) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

/// A lowercase RFC 1123 subdomain, as `metadata.name` must be for the resources served here.
fn validate_name(res: &Resource, name: &str) -> Result<(), ApiError> {
    let ok = name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        return Ok(());
    }
    let why = format!(
        "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    );
    Err(ApiError::invalid(res, name, &why))
}

fn check_url_name(plan: Plan, url_name: &str) -> Result<Plan, ApiError> {
    if plan.name != url_name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({url_name})",
            plan.name
        )));
    }
    Ok(plan)
}

fn generation(obj: &Value) -> i64 {
    obj.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0)
}

fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Value::Object(m) = obj {
        match value {
            Some(v) => m.insert(field.to_owned(), v),
            None => m.remove(field),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Store, ResourceId) {
        let s = Store::new(Resource::builtins());
        let id = s.find("meshguard.io", "v1alpha1", "meshpolicies").unwrap();
        (s, id)
    }

    fn write(s: &mut Store, id: ResourceId, ns: Option<&str>, name: Option<&str>, op: WriteOp) -> Result<Value, ApiError> {
        let plan = s.plan(id, ns, name, &op)?;
        Ok(s.commit(plan).unwrap())
    }

    fn policy(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"a": "1"}}, "spec": {"x": 1}, "status": {"ok": true}})
    }

    #[test]
    fn create_stamps_metadata_and_drops_status() {
        let (mut s, id) = store();
        let o = write(&mut s, id, Some("ns"), None, WriteOp::Create { object: policy("p"), whole: false }).unwrap();
        assert_eq!(o["apiVersion"], "meshguard.io/v1alpha1");
        assert_eq!(o["kind"], "MeshPolicy");
        assert_eq!(o["metadata"]["namespace"], "ns");
        assert_eq!(o["metadata"]["resourceVersion"], "2");
        assert_eq!(o["metadata"]["generation"], 1);
        assert!(o["metadata"]["uid"].is_string());
        assert!(o.get("status").is_none());
        let e = s.plan(id, Some("ns"), None, &WriteOp::Create { object: policy("p"), whole: false }).unwrap_err();
        assert_eq!(e.reason, Reason::AlreadyExists);
        let e = s.plan(id, Some("ns"), None, &WriteOp::Create { object: policy("Bad_Name"), whole: false }).unwrap_err();
        assert_eq!(e.reason, Reason::Invalid);
    }

    #[test]
    fn generation_follows_spec_only_and_no_op_writes_are_skipped() {
        let (mut s, id) = store();
        write(&mut s, id, Some("ns"), None, WriteOp::Create { object: policy("p"), whole: false }).unwrap();
        let status = WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"status": {"ok": false}}), status: true };
        let o = write(&mut s, id, Some("ns"), Some("p"), status.clone()).unwrap();
        assert_eq!((o["metadata"]["generation"].as_i64(), o["status"]["ok"].as_bool()), (Some(1), Some(false)));
        let rv = s.revision();
        write(&mut s, id, Some("ns"), Some("p"), status).unwrap();
        assert_eq!(s.revision(), rv, "an identical write makes no revision");
        let labels = WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"metadata": {"labels": {"b": "2"}}}), status: false };
        assert_eq!(write(&mut s, id, Some("ns"), Some("p"), labels).unwrap()["metadata"]["generation"], 1);
        let spec = WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"spec": {"x": 2}, "status": {"ok": true}}), status: false };
        let o = write(&mut s, id, Some("ns"), Some("p"), spec).unwrap();
        assert_eq!(o["metadata"]["generation"], 2);
        assert_eq!(o["status"]["ok"], false, "a main-resource write leaves status alone");
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let (mut s, id) = store();
        let mut p = policy("p");
        p["metadata"]["finalizers"] = json!(["meshguard.io/cleanup"]);
        write(&mut s, id, Some("ns"), None, WriteOp::Create { object: p, whole: false }).unwrap();
        let del = WriteOp::Delete { resource_version: None, uid: None };
        let o = write(&mut s, id, Some("ns"), Some("p"), del).unwrap();
        assert!(o["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(id, "ns/p").is_some());
        let clear = WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"metadata": {"finalizers": null}}), status: false };
        write(&mut s, id, Some("ns"), Some("p"), clear).unwrap();
        assert!(s.get(id, "ns/p").is_none());
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let (mut s, id) = store();
        write(&mut s, id, Some("ns"), None, WriteOp::Create { object: policy("a"), whole: false }).unwrap();
        let at = s.revision();
        write(&mut s, id, Some("ns"), None, WriteOp::Create { object: policy("b"), whole: false }).unwrap();
        write(&mut s, id, Some("ns"), Some("a"), WriteOp::Delete { resource_version: None, uid: None }).unwrap();
        let snap = s.snapshot(id, at).unwrap();
        assert_eq!(snap.keys().collect::<Vec<_>>(), ["ns/a"]);
        s.compact();
        assert_eq!(s.snapshot(id, at).unwrap_err().reason, Reason::Expired);
    }

    #[test]
    fn commit_refuses_a_stale_plan() {
        let (mut s, id) = store();
        write(&mut s, id, Some("ns"), None, WriteOp::Create { object: policy("p"), whole: false }).unwrap();
        let op = WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"spec": {"x": 5}}), status: false };
        let stale = s.plan(id, Some("ns"), Some("p"), &op).unwrap();
        write(
            &mut s,
            id,
            Some("ns"),
            Some("p"),
            WriteOp::Patch { kind: PatchKind::Merge, patch: json!({"spec": {"x": 6}}), status: false },
        )
        .unwrap();
        assert!(s.commit(stale).is_err());
    }
}
