//! The `MeshPolicy` resource (`meshguard.io/v1alpha1`): the same YAML for
//! `kubectl apply` and `meshctl policy apply`.
//!
//! This module owns the shape and its validation, and which identity pairs
//! need proving ([`auth_pairs`]); compiling policies into datapath entries
//! is the node agent's job.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spiffe::{SpiffeId, validate_segment};

pub mod auth_pairs;

pub const API_VERSION: &str = "meshguard.io/v1alpha1";
pub const KIND: &str = "MeshPolicy";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy YAML is invalid: {0}")]
    Yaml(#[from] crate::yaml::YamlError),
    #[error("policy JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("apiVersion must be {API_VERSION:?}, got {got:?}")]
    ApiVersion { got: String },
    #[error("kind must be {KIND:?}, got {got:?}")]
    Kind { got: String },
    #[error("policy {policy}: {what}")]
    Invalid { policy: String, what: String },
    #[error("document {index} (from line {line}): {source}")]
    InDocument {
        index: usize,
        line: usize,
        #[source]
        source: Box<PolicyError>,
    },
}

// The resource ([`MeshPolicy`]: metadata, spec, status) and its CRD are
// derived from the spec: the OpenAPI schema from these types, plus CEL rules
// for what a schema cannot say. `MeshPolicy::validate` checks the same
// rules in Rust, so `kubectl`, `meshctl policy apply` and the registry
// refuse the same policies (a test holds them to it). Doc comments here
// are what `kubectl explain` shows.

/// The pods the policy is about and its ingress and egress rules.
// Each printcolumn(...) names its own type_; clippy reads them as repeats.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[kube(
    group = "meshguard.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    namespaced,
    status = "MeshPolicyStatus",
    shortname = "mp",
    category = "meshguard",
    derive = "PartialEq",
    doc = "Which identities may talk to the selected pods (ingress) and to whom they may talk (egress), over which protocols and ports, and whether both sides must first prove their identities (mTLS).",
    printcolumn(name = "Accepted", type_ = "string", json_path = r#".status.conditions[?(@.type=="Accepted")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Accepted")].reason"#, priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("!has(self.ingress) || self.ingress.all(r, !has(r.to))").message("ingress rules list peers under `from`, not `to`"),
    validation = Rule::new("!has(self.egress) || self.egress.all(r, !has(r.from))").message("egress rules list peers under `to`, not `from`")
)]
pub struct MeshPolicySpec {
    /// Subject pods in the policy's namespace; `{}` selects all of them.
    #[serde(default)]
    pub selector: LabelSelector,
    /// Who may connect to the subject pods. Absent: ingress is not judged by
    /// this policy; empty: nothing may connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    // The full path: KubeSchema's expansion imports kube's own `Rule`.
    pub ingress: Option<Vec<crate::policy::Rule>>,
    /// Whom the subject pods may connect to. Absent: egress is not judged by
    /// this policy; empty: they may connect to nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub egress: Option<Vec<crate::policy::Rule>>,
}

/// What the cluster source (or the registry) made of a policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` when the policy is enforced, `False` with the
    /// reason when it is refused (and then nothing of it is enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Kubernetes label selector, with its semantics.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_EXPRESSIONS))]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new(
    "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values) || size(self.values) == 0"
).message("In and NotIn need values; Exists and DoesNotExist take none"))]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_VALUES))]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One rule. Ingress rules use `from`, egress rules use `to`; an absent or
/// empty list matches every peer, as in NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub action: Action,
    /// Ingress only: the peers allowed (or denied) to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PEERS))]
    pub from: Option<Vec<PeerSelector>>,
    /// Egress only: the peers that may (or may not) be connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PEERS))]
    pub to: Option<Vec<PeerSelector>>,
    /// Absent or empty: every protocol and port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PORTS))]
    pub ports: Vec<PortRule>,
    /// `required`: the flow passes only once auth-handshake has proved both
    /// workloads' identities to each other with mutual TLS.
    #[serde(default)]
    pub authentication: Authentication,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Authentication {
    #[default]
    None,
    Required,
}

/// Who a rule is about. Fields combine (all must match): `namespace` scopes
/// `serviceAccount` and `podSelector` (default: the policy's namespace);
/// `spiffeId` names one identity exactly, anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, try_from = "RawPeerSelector")]
pub struct PeerSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, try_from = "RawPortRule")]
pub struct PortRule {
    pub protocol: Protocol,
    /// First port (TCP/UDP/SCTP) or ICMP type; absent = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Last port of a range, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// Bounds on lists, so the API server can bound the cost of the CEL rules
/// (it refuses a CRD whose rules it cannot bound) and no policy is absurdly
/// large; [`MeshPolicy::validate`] enforces the same.
const MAX_RULES: usize = 256;
const MAX_PEERS: usize = 64;
const MAX_PORTS: usize = 64;
const MAX_EXPRESSIONS: usize = 32;
const MAX_VALUES: usize = 64;

/// A namespace or service-account name as SPIFFE path segments allow it:
/// letters, digits, `.`, `-`, `_`, but not `.` or `..` alone.
const SEGMENT_PATTERN: &str = r"^([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)$";

// The two rules most often written wrong are checked while they are parsed,
// so the YAML parser's error carries the field path, line and column. The
// raw shapes are also what the CRD's schema is derived from (serde's
// `try_from` makes schemars use them), so their CEL rules live here.

// What depends on the protocol (ICMP types, ports on portless protocols) is
// checked by `validate` only, and reported in the policy's status: the
// protocol is int-or-string, which CEL sees as `dyn` of unbounded size, so
// string work on it in a rule repeated for up to 256 x 64 port rules per
// direction is past the cost the API server accepts for a CRD.
#[derive(Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("!has(self.endPort) || has(self.port)").message("endPort needs port"),
    validation = Rule::new("!has(self.endPort) || !has(self.port) || self.endPort >= self.port").message("endPort is below port"),
)]
struct RawPortRule {
    /// TCP, UDP, SCTP, ICMP, ICMPv6, or any IP protocol by number (0-255).
    protocol: Protocol,
    /// First port (TCP/UDP/SCTP) or ICMP type; absent = any.
    #[serde(default)]
    port: Option<u16>,
    /// Last port of a range, inclusive (TCP/UDP/SCTP).
    #[serde(default)]
    end_port: Option<u16>,
}

#[derive(Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    // `namespace` is a CEL keyword: Kubernetes escapes it as `__namespace__`.
    validation = Rule::new("has(self.__namespace__) || has(self.serviceAccount) || has(self.spiffeId) || has(self.podSelector)")
        .message("empty peer: give serviceAccount, namespace, spiffeId or podSelector"),
    validation = Rule::new("!has(self.spiffeId) || !(has(self.__namespace__) || has(self.serviceAccount) || has(self.podSelector))")
        .message("spiffeId names one identity and cannot be combined with other fields"),
)]
struct RawPeerSelector {
    /// The peers' namespace (default: the policy's own).
    #[serde(default)]
    #[schemars(regex(pattern = SEGMENT_PATTERN), length(max = 253))]
    namespace: Option<String>,
    /// The peers' Kubernetes service account.
    #[serde(default)]
    #[schemars(regex(pattern = SEGMENT_PATTERN), length(max = 253))]
    service_account: Option<String>,
    /// One SPIFFE ID, in any namespace or trust domain.
    #[serde(default)]
    spiffe_id: Option<SpiffeId>,
    /// The peers' pod labels.
    #[serde(default)]
    pod_selector: Option<LabelSelector>,
}

impl TryFrom<RawPortRule> for PortRule {
    type Error = String;
    fn try_from(r: RawPortRule) -> Result<Self, String> {
        let p = Self { protocol: r.protocol, port: r.port, end_port: r.end_port };
        validate_port(&p)?;
        Ok(p)
    }
}

impl TryFrom<RawPeerSelector> for PeerSelector {
    type Error = String;
    fn try_from(r: RawPeerSelector) -> Result<Self, String> {
        let p = Self { namespace: r.namespace, service_account: r.service_account, spiffe_id: r.spiffe_id, pod_selector: r.pod_selector };
        validate_peer(&p)?;
        Ok(p)
    }
}

/// An IP protocol: by name for the common ones, by number for any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Other(u8),
}

// === impl Protocol ===

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
            Self::Icmp => 1,
            Self::Icmpv6 => 58,
            Self::Other(n) => n,
        }
    }

    pub const fn from_number(n: u8) -> Self {
        match n {
            6 => Self::Tcp,
            17 => Self::Udp,
            132 => Self::Sctp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            n => Self::Other(n),
        }
    }

    /// Whether `port`/`endPort` mean transport ports for this protocol.
    pub const fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }

    pub const fn is_icmp(self) -> bool {
        matches!(self, Self::Icmp | Self::Icmpv6)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("TCP"),
            Self::Udp => f.write_str("UDP"),
            Self::Sctp => f.write_str("SCTP"),
            Self::Icmp => f.write_str("ICMP"),
            Self::Icmpv6 => f.write_str("ICMPv6"),
            Self::Other(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            "SCTP" => Self::Sctp,
            "ICMP" => Self::Icmp,
            "ICMPV6" => Self::Icmpv6,
            other => match other.parse::<u8>() {
                Ok(n) => Self::from_number(n),
                Err(_) => {
                    return Err(format!("unknown protocol {s:?}: use TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number 0-255"));
                }
            },
        })
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Other(n) => s.serialize_u8(*n),
            p => s.collect_str(p),
        }
    }
}

/// Int-or-string, as Kubernetes writes such fields; the CEL rule accepts
/// exactly what [`Protocol`]'s `FromStr` does.
impl JsonSchema for Protocol {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Protocol".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "TCP, UDP, SCTP, ICMP, ICMPv6 (any case), or an IP protocol number 0-255.",
            "x-kubernetes-int-or-string": true,
            // No CEL on it (see RawPortRule): an unknown protocol is
            // refused by `validate` and reported in the policy's status.
            "maxLength": 8
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u8),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Self::from_number(n)),
            Raw::Name(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

// === impl LabelSelector ===

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    LabelOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    LabelOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    LabelOperator::Exists => value.is_some(),
                    LabelOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

// === impl MeshPolicy ===

impl MeshPolicy {
    /// Parses one policy from YAML and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        let p = crate::yaml::from_str::<PolicyDocument>(text)?.into_policy()?;
        p.validate()?;
        Ok(p)
    }

    /// Parses one policy from JSON (the registry's wire form, the API
    /// server's) and validates it.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let p = serde_json::from_str::<PolicyDocument>(text)?.into_policy()?;
        p.validate()?;
        Ok(p)
    }

    /// Parses a multi-document YAML stream (`---` separated) of policies.
    /// Shape errors carry the parser's field path, line and column; the
    /// remaining checks name the document, the line it starts on, and the field.
    pub fn all_from_yaml(text: &str) -> Result<Vec<Self>, PolicyError> {
        let starts = document_start_lines(text);
        let mut out = Vec::new();
        // Deserialized straight from the stream (not via a Value), so the
        // parser's locations survive into the error.
        for (i, doc) in crate::yaml::documents::<PolicyDocument>(text)?.into_iter().enumerate() {
            let in_doc =
                |e: PolicyError| PolicyError::InDocument { index: i + 1, line: starts.get(i).copied().unwrap_or(1), source: Box::new(e) };
            let p = doc.into_policy().map_err(in_doc)?;
            p.validate().map_err(in_doc)?;
            out.push(p);
        }
        Ok(out)
    }

    /// A policy named `namespace/name`, for code and tests that build one.
    pub fn named(namespace: &str, name: &str, spec: MeshPolicySpec) -> Self {
        let mut p = Self::new(name, spec);
        p.metadata.namespace = Some(namespace.to_owned());
        p
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The namespace; `default` when the metadata names none (as `kubectl`
    /// would place it without `-n`).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// Everything the CRD's schema and CEL rules check, in Rust: meshctl and
    /// the registry refuse what the API server would (a test holds the two
    /// to the same verdicts), with the field path in the message.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let invalid = |what: String| PolicyError::Invalid { policy: self.key(), what };
        let name = self.metadata.name.as_deref().ok_or_else(|| invalid("metadata.name is missing".into()))?;
        validate_segment(name).map_err(|e| invalid(format!("metadata.name: {e}")))?;
        validate_segment(self.namespace()).map_err(|e| invalid(format!("metadata.namespace: {e}")))?;
        validate_selector(&self.spec.selector).map_err(|e| invalid(format!("spec.selector: {e}")))?;
        for (dir, rules, peers_field, wrong_field) in
            [("ingress", &self.spec.ingress, "from", "to"), ("egress", &self.spec.egress, "to", "from")]
        {
            let rules = rules.as_deref().unwrap_or_default();
            at_most(rules, MAX_RULES).map_err(|e| invalid(format!("spec.{dir}: {e}")))?;
            for (i, rule) in rules.iter().enumerate() {
                let at = format!("spec.{dir}[{i}]");
                let (peers, wrong) = if dir == "ingress" { (&rule.from, &rule.to) } else { (&rule.to, &rule.from) };
                if wrong.is_some() {
                    return Err(invalid(format!("{at}: {dir} rules list peers under `{peers_field}`, not `{wrong_field}`")));
                }
                let peers = peers.as_deref().unwrap_or_default();
                at_most(peers, MAX_PEERS).map_err(|e| invalid(format!("{at}.{peers_field}: {e}")))?;
                for (j, peer) in peers.iter().enumerate() {
                    validate_peer(peer).map_err(|e| invalid(format!("{at}.{peers_field}[{j}]: {e}")))?;
                }
                at_most(&rule.ports, MAX_PORTS).map_err(|e| invalid(format!("{at}.ports: {e}")))?;
                for (j, port) in rule.ports.iter().enumerate() {
                    validate_port(port).map_err(|e| invalid(format!("{at}.ports[{j}]: {e}")))?;
                }
            }
        }
        Ok(())
    }
}

/// A policy as written: the resource's fields, unknown ones refused (the
/// derived resource type ignores `apiVersion` and `kind` and would accept
/// anything at the top level).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyDocument {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: MeshPolicySpec,
    #[serde(default)]
    status: Option<MeshPolicyStatus>,
}

impl PolicyDocument {
    fn into_policy(self) -> Result<MeshPolicy, PolicyError> {
        if self.api_version != API_VERSION {
            return Err(PolicyError::ApiVersion { got: self.api_version });
        }
        if self.kind != KIND {
            return Err(PolicyError::Kind { got: self.kind });
        }
        let mut metadata = self.metadata;
        metadata.namespace.get_or_insert_with(|| "default".to_owned());
        Ok(MeshPolicy { metadata, spec: self.spec, status: self.status })
    }
}

/// Policies as a field of another document (the file cluster source's):
/// `apiVersion`, `kind` and unknown fields checked as [`MeshPolicy::from_yaml`]
/// checks them; the caller runs [`MeshPolicy::validate`].
pub fn deserialize_policies<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<MeshPolicy>, D::Error> {
    Vec::<PolicyDocument>::deserialize(d)?
        .into_iter()
        .map(PolicyDocument::into_policy)
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

fn at_most<T>(items: &[T], max: usize) -> Result<(), String> {
    if items.len() > max { Err(format!("{} entries; at most {max} are allowed", items.len())) } else { Ok(()) }
}

/// The 1-based line each YAML document of `text` starts on (after its `---`).
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut in_doc = false;
    for (i, line) in text.lines().enumerate() {
        let content = line.trim();
        if line == "---" || line.starts_with("--- ") {
            starts.push(i + 2);
            in_doc = true;
        } else if !in_doc && !content.is_empty() && !content.starts_with('#') {
            starts.push(i + 1);
            in_doc = true;
        }
    }
    starts
}

fn validate_selector(s: &LabelSelector) -> Result<(), String> {
    at_most(&s.match_expressions, MAX_EXPRESSIONS).map_err(|e| format!("matchExpressions: {e}"))?;
    for e in &s.match_expressions {
        at_most(&e.values, MAX_VALUES).map_err(|err| format!("matchExpressions key {:?}: values: {err}", e.key))?;
        let needs_values = matches!(e.operator, LabelOperator::In | LabelOperator::NotIn);
        if needs_values && e.values.is_empty() {
            return Err(format!("matchExpressions key {:?}: {:?} needs values", e.key, e.operator));
        }
        if !needs_values && !e.values.is_empty() {
            return Err(format!("matchExpressions key {:?}: {:?} takes no values", e.key, e.operator));
        }
    }
    Ok(())
}

fn validate_peer(p: &PeerSelector) -> Result<(), String> {
    if p.namespace.is_none() && p.service_account.is_none() && p.spiffe_id.is_none() && p.pod_selector.is_none() {
        return Err("empty peer: give serviceAccount, namespace, spiffeId or podSelector".into());
    }
    if p.spiffe_id.is_some() && (p.namespace.is_some() || p.service_account.is_some() || p.pod_selector.is_some()) {
        return Err("spiffeId names one identity and cannot be combined with other fields".into());
    }
    if let Some(ns) = &p.namespace {
        validate_segment(ns).map_err(|e| format!("namespace: {e}"))?;
    }
    if let Some(sa) = &p.service_account {
        validate_segment(sa).map_err(|e| format!("serviceAccount: {e}"))?;
    }
    if let Some(sel) = &p.pod_selector {
        validate_selector(sel).map_err(|e| format!("podSelector: {e}"))?;
    }
    Ok(())
}

fn validate_port(p: &PortRule) -> Result<(), String> {
    match (p.port, p.end_port) {
        (None, Some(_)) => Err("endPort needs port".into()),
        (Some(start), Some(end)) if end < start => Err(format!("endPort {end} is below port {start}")),
        (Some(_), Some(_)) if p.protocol.is_icmp() => Err("ICMP rules take a single type, not a range".into()),
        (Some(port), _) if p.protocol.is_icmp() && port > 255 => Err(format!("ICMP type {port} is above 255")),
        (Some(_), _) if !p.protocol.has_ports() && !p.protocol.is_icmp() => Err(format!("protocol {} has no ports", p.protocol)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: backend-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  ingress:
    - action: Allow
      from:
        - {serviceAccount: web}
        - {namespace: ops, serviceAccount: probe}
        - {spiffeId: "spiffe://cluster.local/ns/batch/sa/report"}
        - {podSelector: {matchLabels: {tier: edge}}}
      ports:
        - {protocol: TCP, port: 8080}
        - {protocol: SCTP, port: 9000, endPort: 9010}
        - {protocol: UDP, port: 5353}
        - {protocol: ICMP}
      authentication: required
  egress:
    - to: [{serviceAccount: db}]
      ports: [{protocol: TCP, port: 5432}]
"#;

    #[test]
    fn parses_the_design_example() {
        let p = MeshPolicy::from_yaml(EXAMPLE).unwrap();
        assert_eq!(p.key(), "shop/backend-ingress");
        let ingress = &p.spec.ingress.as_ref().unwrap()[0];
        assert_eq!(ingress.authentication, Authentication::Required);
        assert_eq!(ingress.from.as_ref().unwrap().len(), 4);
        assert_eq!(ingress.ports[1].protocol, Protocol::Sctp);
        assert_eq!(ingress.ports[1].end_port, Some(9010));
        let egress = &p.spec.egress.as_ref().unwrap()[0];
        assert_eq!(egress.action, Action::Allow);
        // Round trip.
        let again = MeshPolicy::from_yaml(&crate::yaml::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn rejects_bad_policies_with_a_clear_error() {
        let cases = [
            (EXAMPLE.replace("v1alpha1", "v9"), "apiVersion"),
            (EXAMPLE.replace("kind: MeshPolicy", "kind: NetworkPolicy"), "kind"),
            (EXAMPLE.replace("endPort: 9010", "endPort: 8000"), "endPort 8000 is below port 9000"),
            (EXAMPLE.replace("protocol: UDP", "protocol: QUIC"), "unknown protocol"),
            (EXAMPLE.replace("authentication: required", "authentication: maybe"), "unknown variant"),
            (EXAMPLE.replace("- to: [", "- from: ["), "not `from`"),
            (EXAMPLE.replace("serviceAccount: web", "serviceAcount: web"), "unknown field"),
            (EXAMPLE.replace("spiffe://cluster.local/ns/batch", "spiffe://Cluster/ns/batch"), "trust domain"),
            (EXAMPLE.replace("port: 8080", "port: 80800"), "invalid u16"),
            ("{".to_owned(), "policy YAML is invalid"),
        ];
        for (yaml, want) in cases {
            let err = MeshPolicy::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn protocols_by_name_and_number() {
        let p: PortRule = crate::yaml::from_str("{protocol: 47}").unwrap();
        assert_eq!(p.protocol, Protocol::Other(47));
        let p: PortRule = crate::yaml::from_str("{protocol: \"6\"}").unwrap();
        assert_eq!(p.protocol, Protocol::Tcp);
        assert!(validate_port(&PortRule { protocol: Protocol::Other(47), port: Some(1), end_port: None }).is_err());
    }

    #[test]
    fn selectors_match_like_kubernetes() {
        let labels: BTreeMap<_, _> = [("app".to_owned(), "web".to_owned())].into();
        let mut s = LabelSelector::default();
        assert!(s.matches(&labels));
        s.match_expressions.push(LabelExpression { key: "tier".into(), operator: LabelOperator::NotIn, values: vec!["x".into()] });
        assert!(s.matches(&labels));
        s.match_expressions.push(LabelExpression { key: "app".into(), operator: LabelOperator::In, values: vec!["db".into()] });
        assert!(!s.matches(&labels));
    }

    #[test]
    fn multi_document_streams() {
        let two = format!("{EXAMPLE}\n---\n{}", EXAMPLE.replace("backend-ingress", "second"));
        let all = MeshPolicy::all_from_yaml(&two).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].name(), "second");
    }

    #[test]
    fn errors_name_the_field_and_the_line() {
        // A port range written backwards, in the second document, block style.
        let text = "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: a, namespace: shop}\n---\n\
                    apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: b, namespace: shop}\nspec:\n  ingress:\n\
                    \x20   - ports:\n        - {protocol: SCTP, port: 9010, endPort: 9000}\n";
        let e = MeshPolicy::all_from_yaml(text).unwrap_err().to_string();
        assert!(e.contains("spec.ingress[0].ports[0]:") && e.contains("endPort 9000 is below port 9010") && e.contains("line 11"), "{e}");
        // An empty peer.
        let e = MeshPolicy::all_from_yaml(&text.replace("ports:\n        - {protocol: SCTP, port: 9010, endPort: 9000}", "from: [{}]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.ingress[0].from[0]:") && e.contains("empty peer") && e.contains("line 10"), "{e}");
        // A document-level mistake names the document and where it starts.
        let valid = text.replace("endPort: 9000", "endPort: 9020");
        MeshPolicy::all_from_yaml(&valid).unwrap();
        let e =
            MeshPolicy::all_from_yaml(&valid.replace("kind: MeshPolicy\nmetadata: {name: b", "kind: NetworkPolicy\nmetadata: {name: b"))
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("document 2 (from line 5): kind must be"), "{e}");
        // A typo'd field: the parser's path, line and column.
        let e = MeshPolicy::all_from_yaml(&text.replace("endPort", "endport")).unwrap_err().to_string();
        assert!(e.contains("unknown field `endport`") && e.contains("line 11"), "{e}");
    }

    /// The CRD's CEL rules, evaluated as the API server would (kube-cel),
    /// give the same verdict as `MeshPolicy::validate` on every case: what
    /// `kubectl apply` refuses, `meshctl policy apply` refuses too.
    #[test]
    fn the_crd_rules_and_validate_agree() {
        let crd = <MeshPolicy as kube::CustomResourceExt>::crd();
        let schema = serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        // `Both`: kubectl and meshctl refuse it. `Status`: the API server takes
        // it (its CEL cannot afford the check, see RawPortRule) and the
        // policy is refused by validate, reported in status, never enforced.
        #[derive(Debug, PartialEq)]
        enum Verdict {
            Valid,
            Both,
            Status,
        }
        use Verdict::*;
        let cases: &[(&str, &str, Verdict)] = &[
            ("the design example", "", Valid),
            ("port range backwards", "endPort: 9010|endPort: 8000", Both),
            ("endPort without port", "{protocol: TCP, port: 8080}|{protocol: TCP, endPort: 8080}", Both),
            ("ICMP range", "{protocol: ICMP}|{protocol: ICMP, port: 3, endPort: 4}", Status),
            ("ICMP type above 255", "{protocol: ICMP}|{protocol: icmpv6, port: 300}", Status),
            ("ICMP type by number", "{protocol: ICMP}|{protocol: 1, port: 8}", Valid),
            ("ports on a portless protocol", "{protocol: ICMP}|{protocol: 47, port: 1}", Status),
            ("a protocol by number", "{protocol: ICMP}|{protocol: 47}", Valid),
            ("a protocol number as a string", "{protocol: ICMP}|{protocol: \"006\", port: 22}", Valid),
            ("a protocol number above 255", "{protocol: ICMP}|{protocol: 300}", Status),
            ("an unknown protocol", "protocol: UDP|protocol: QUIC", Status),
            ("a protocol in lowercase", "protocol: UDP|protocol: udp", Valid),
            ("an ingress rule with to", "- action: Allow\n      from:|- action: Allow\n      to:", Both),
            ("an egress rule with from", "- to: [|- from: [", Both),
            ("an empty peer", "{serviceAccount: web}|{}", Both),
            ("a namespace alone", "{serviceAccount: web}|{namespace: ops}", Valid),
            (
                "spiffeId with a namespace",
                "{spiffeId: \"spiffe://cluster.local/ns/batch/sa/report\"}|{spiffeId: \"spiffe://cluster.local/ns/batch/sa/report\", namespace: x}",
                Both,
            ),
            ("In without values", "{matchLabels: {tier: edge}}|{matchExpressions: [{key: tier, operator: In}]}", Both),
            ("Exists with values", "{matchLabels: {tier: edge}}|{matchExpressions: [{key: tier, operator: Exists, values: [a]}]}", Both),
            ("Exists without values", "{matchLabels: {tier: edge}}|{matchExpressions: [{key: tier, operator: Exists}]}", Valid),
        ];
        for (what, edit, verdict) in cases {
            let yaml = match edit.split_once('|') {
                Some((from, to)) => {
                    assert!(EXAMPLE.contains(from), "{what}: the example has no {from:?}");
                    EXAMPLE.replacen(from, to, 1)
                }
                None => EXAMPLE.to_owned(),
            };
            let rust = MeshPolicy::from_yaml(&yaml);
            assert_eq!(rust.is_ok(), *verdict == Valid, "{what}: validate says {rust:?}");
            let object: serde_json::Value = crate::yaml::from_str(&yaml).unwrap();
            let cel = kube::core::cel::Validator::new().validate(&schema, &object, None);
            assert_eq!(cel.is_ok(), *verdict != Both, "{what}: the CRD's CEL rules say {cel:?}");
        }
    }

    /// The API server refuses a CRD whose CEL it cannot bound in cost, and
    /// multiplies a rule's cost by how often its object can repeat: every
    /// MeshPolicy rule sits in lists (up to 256 x 64 x 2 port rules), so none
    /// may do string work (regexes, conversions), whose cost grows with
    /// lengths CEL cannot bound on an int-or-string.
    #[test]
    fn the_crd_rules_do_no_string_work() {
        fn rules(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::Array(rs)) = m.get("x-kubernetes-validations") {
                        out.extend(rs.iter().filter_map(|r| r["rule"].as_str().map(str::to_owned)));
                    }
                    m.values().for_each(|v| rules(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| rules(v, out)),
                _ => {}
            }
        }
        let crd = serde_json::to_value(<MeshPolicy as kube::CustomResourceExt>::crd()).unwrap();
        let mut all = Vec::new();
        rules(&crd, &mut all);
        assert!(all.len() >= 6, "the CRD's rules were not found: {all:?}");
        for rule in &all {
            for f in ["matches(", "string(", "lowerAscii(", "int(", "split(", "find("] {
                assert!(!rule.contains(f), "CEL rule {rule:?} calls {f}");
            }
        }
    }

    /// The CRD's patterns accept exactly what the parsers accept.
    #[test]
    fn the_crd_patterns_match_the_parsers() {
        let segment = regex::Regex::new(SEGMENT_PATTERN).unwrap();
        for s in ["web", "a.b", ".x", "..x", "...", "a_b-c", ".", "..", "", "a/b", "a b", "ü"] {
            assert_eq!(segment.is_match(s), validate_segment(s).is_ok(), "segment {s:?}");
        }
        let schema = serde_json::to_value(<SpiffeId as JsonSchema>::json_schema(&mut schemars::SchemaGenerator::default())).unwrap();
        let id = regex::Regex::new(schema["pattern"].as_str().unwrap()).unwrap();
        for s in [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://td/.x/..y/...",
            "spiffe://td/./x",
            "spiffe://td/x/..",
            "spiffe://td/x/",
            "spiffe://td//x",
            "spiffe://Cluster/x",
            "spiffe://td/x?y",
            "http://td/x",
        ] {
            assert_eq!(id.is_match(s), SpiffeId::parse(s).is_ok(), "SPIFFE ID {s:?}");
        }
    }
}
