//! The kinds of object the server serves: group, version, plural, kind and scope, as a CRD or a
//! built-in type declares them.

/// A resource the server serves, like one version of a CRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; `""` for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    /// The lowercase plural in URLs (`pods`, `meshpolicies`).
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Whether `.status` is a subresource: writes to the object leave `.status` alone and only
    /// `/status` changes it (true for the built-ins here and for CRDs with `subresources.status`).
    pub status_subresource: bool,
    /// Field-selector paths beyond `metadata.name` and `metadata.namespace`, e.g. `spec.nodeName`.
    pub selectable_fields: Vec<String>,
}

impl Resource {
    /// A resource with a status subresource and only the metadata field selectors.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Resource {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
            status_subresource: true,
            selectable_fields: Vec::new(),
        }
    }

    /// Like a CRD without `subresources.status`: `.status` is written with the rest of the object.
    pub fn without_status_subresource(mut self) -> Self {
        self.status_subresource = false;
        self
    }

    /// One more field usable in `fieldSelector` (a dotted path into the object).
    pub fn with_selectable_field(mut self, path: &str) -> Self {
        self.selectable_fields.push(path.to_owned());
        self
    }

    /// `v1` for the core group, else `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// The name errors use: `pods`, `meshpolicies.meshguard.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The resources every server starts with: the core ones the project reads and its CRDs.
    pub(crate) fn builtins() -> Vec<Resource> {
        let pods = Resource::new("", "v1", "pods", "Pod", true);
        vec![
            [
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]
            .into_iter()
            .fold(pods, Resource::with_selectable_field),
            Resource::new("", "v1", "namespaces", "Namespace", false).with_selectable_field("status.phase"),
            Resource::new("", "v1", "nodes", "Node", false).with_selectable_field("spec.unschedulable"),
            Resource::new("", "v1", "serviceaccounts", "ServiceAccount", true).without_status_subresource(),
            Resource::new("meshguard.io", "v1alpha1", "meshpolicies", "MeshPolicy", true),
            Resource::new("meshguard.io", "v1alpha1", "meshnodes", "MeshNode", false),
            Resource::new("meshguard.io", "v1alpha1", "meshidentities", "MeshIdentity", false).without_status_subresource(),
        ]
    }
}
