//! The `MeshPolicy` resource (`meshguard.io/v1alpha1`): the same YAML for
//! `kubectl apply` and `meshctl policy apply`.
//!
//! This module owns the shape and its validation, and which identity pairs
//! need proving ([`auth_pairs`]); compiling policies into datapath entries
//! is the node agent's job.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spiffe::{SpiffeId, validate_segment};

pub mod auth_pairs;

pub const API_VERSION: &str = "meshguard.io/v1alpha1";
pub const KIND: &str = "MeshPolicy";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy YAML is invalid: {0}")]
    Yaml(#[from] crate::yaml::YamlError),
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MeshPolicySpec,
}

/// The subset of Kubernetes object metadata meshguard reads; the rest
/// (labels, annotations, uid, ...) is accepted and kept so `kubectl` output
/// round-trips.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPolicySpec {
    /// Subject pods in the policy's namespace; `{}` selects all of them.
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One rule. Ingress rules use `from`, egress rules use `to`; an absent or
/// empty list matches every peer, as in NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<PeerSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<PeerSelector>>,
    /// Absent or empty: every protocol and port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRule>,
    #[serde(default)]
    pub authentication: Authentication,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Authentication {
    #[default]
    None,
    Required,
}

/// Who a rule is about. Fields combine (all must match): `namespace` scopes
/// `serviceAccount` and `podSelector` (default: the policy's namespace);
/// `spiffeId` names one identity exactly, anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

// The two rules most often written wrong are checked while they are parsed,
// so the YAML parser's error carries the field path, line and column.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortRule {
    protocol: Protocol,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    end_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerSelector {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    spiffe_id: Option<SpiffeId>,
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
        let p: Self = crate::yaml::from_str(text)?;
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
        for (i, p) in crate::yaml::documents::<Self>(text)?.into_iter().enumerate() {
            let in_doc =
                |e: PolicyError| PolicyError::InDocument { index: i + 1, line: starts.get(i).copied().unwrap_or(1), source: Box::new(e) };
            p.validate().map_err(in_doc)?;
            out.push(p);
        }
        Ok(out)
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.api_version != API_VERSION {
            return Err(PolicyError::ApiVersion { got: self.api_version.clone() });
        }
        if self.kind != KIND {
            return Err(PolicyError::Kind { got: self.kind.clone() });
        }
        let invalid = |what: String| PolicyError::Invalid { policy: self.key(), what };
        validate_segment(&self.metadata.name).map_err(|e| invalid(format!("metadata.name: {e}")))?;
        validate_segment(&self.metadata.namespace).map_err(|e| invalid(format!("metadata.namespace: {e}")))?;
        validate_selector(&self.spec.selector).map_err(|e| invalid(format!("spec.selector: {e}")))?;
        for (dir, rules, peers_field, wrong_field) in
            [("ingress", &self.spec.ingress, "from", "to"), ("egress", &self.spec.egress, "to", "from")]
        {
            for (i, rule) in rules.iter().flatten().enumerate() {
                let at = format!("spec.{dir}[{i}]");
                let (peers, wrong) = if dir == "ingress" { (&rule.from, &rule.to) } else { (&rule.to, &rule.from) };
                if wrong.is_some() {
                    return Err(invalid(format!("{at}: {dir} rules list peers under `{peers_field}`, not `{wrong_field}`")));
                }
                for (j, peer) in peers.iter().flatten().enumerate() {
                    validate_peer(peer).map_err(|e| invalid(format!("{at}.{peers_field}[{j}]: {e}")))?;
                }
                for (j, port) in rule.ports.iter().enumerate() {
                    validate_port(port).map_err(|e| invalid(format!("{at}.ports[{j}]: {e}")))?;
                }
            }
        }
        Ok(())
    }
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
    for e in &s.match_expressions {
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
        assert_eq!(all[1].metadata.name, "second");
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
}
