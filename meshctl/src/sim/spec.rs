//! The standalone cluster spec (`meshctl up --spec FILE`), a contract in
//! DESIGN.md:
//!
//! ```yaml
//! trustDomain: cluster.local
//! nodes: [{name: node-1}, {name: node-2}]
//! workloads:
//!   - {name: frontend, namespace: shop, serviceAccount: web, node: node-1, labels: {app: frontend}}
//! ```
//!
//! Parsed whole and checked before anything is built: an invalid spec
//! changes nothing, and the error names the field (and, for shape errors,
//! the line and column).

use std::collections::{BTreeMap, BTreeSet};

use meshguard_common::spiffe::TrustDomain;
use serde::Deserialize;

use crate::sim::cluster::{ClusterBuilder, MAX_NODES, MAX_PODS_PER_NODE, PodSpec, cluster};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cluster spec is invalid: {0}")]
    Yaml(#[from] meshguard_common::yaml::YamlError),
    #[error("cluster spec is invalid: {field}: {what}")]
    Invalid { field: String, what: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Kubernetes' default: the namespace's `default` service account.
    #[serde(default = "default_namespace")]
    pub service_account: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_namespace() -> String {
    "default".into()
}

/// Kubernetes' rule for names (RFC 1123 label): they become namespace,
/// directory and SPIFFE path segments here, so nothing looser is taken.
fn dns_label(s: &str) -> Result<(), String> {
    let ok_chars = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = s.starts_with(|c: char| c.is_ascii_alphanumeric()) && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if s.is_empty() || s.len() > 63 || !ok_chars || !ok_ends {
        return Err(format!(
            "{s:?} is not a valid name (1-63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

// === impl ClusterSpec ===

impl ClusterSpec {
    /// Parses and checks a spec; nothing is built.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = meshguard_common::yaml::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// `nodes` nodes and `pods` pods spread over them round-robin, one
    /// service account each, in the `default` namespace.
    pub fn generated(nodes: usize, pods: usize) -> Self {
        let nodes: Vec<NodeSpec> = (1..=nodes).map(|i| NodeSpec { name: format!("node-{i}") }).collect();
        let workloads = (0..pods)
            .map(|i| WorkloadSpec {
                name: format!("pod-{}", i + 1),
                namespace: "default".into(),
                service_account: format!("pod-{}", i + 1),
                node: nodes[i % nodes.len()].name.clone(),
                labels: BTreeMap::from([("app".to_owned(), format!("pod-{}", i + 1))]),
            })
            .collect();
        Self { trust_domain: default_trust_domain(), nodes, workloads }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: String, what: String| SpecError::Invalid { field, what };
        TrustDomain::new(&self.trust_domain).map_err(|e| invalid("trustDomain".into(), e.to_string()))?;
        if self.nodes.is_empty() || self.nodes.len() > MAX_NODES {
            return Err(invalid("nodes".into(), format!("give 1 to {MAX_NODES} nodes, not {}", self.nodes.len())));
        }
        let mut names = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            dns_label(&n.name).map_err(|e| invalid(format!("nodes[{i}].name"), e))?;
            if !names.insert(n.name.as_str()) {
                return Err(invalid(format!("nodes[{i}].name"), format!("node {:?} is listed twice", n.name)));
            }
        }
        let mut keys = BTreeSet::new();
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}].{f}");
            dns_label(&w.name).map_err(|e| invalid(at("name"), e))?;
            dns_label(&w.namespace).map_err(|e| invalid(at("namespace"), e))?;
            dns_label(&w.service_account).map_err(|e| invalid(at("serviceAccount"), e))?;
            if !names.contains(w.node.as_str()) {
                return Err(invalid(at("node"), format!("{:?} is not one of the spec's nodes", w.node)));
            }
            if !keys.insert((w.namespace.as_str(), w.name.as_str())) {
                return Err(invalid(at("name"), format!("workload {}/{} is listed twice", w.namespace, w.name)));
            }
            let n = per_node.entry(w.node.as_str()).or_default();
            *n += 1;
            if *n > MAX_PODS_PER_NODE {
                return Err(invalid(at("node"), format!("node {} cannot hold more than {MAX_PODS_PER_NODE} workloads", w.node)));
            }
        }
        Ok(())
    }

    /// The simulated cluster this spec describes.
    pub fn builder(&self) -> ClusterBuilder {
        let mut b = cluster().trust_domain(&self.trust_domain).named_nodes(self.nodes.iter().map(|n| n.name.clone()).collect());
        for w in &self.workloads {
            b = b.pod_spec(PodSpec {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                node: w.node.clone(),
                service_account: w.service_account.clone(),
                labels: w.labels.clone(),
            });
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
trustDomain: cluster.local
nodes: [{name: node-1}, {name: node-2}, {name: node-3}]
workloads:
  - {name: frontend, namespace: shop, serviceAccount: web, node: node-1, labels: {app: frontend}}
  - {name: backend, namespace: shop, serviceAccount: api, node: node-2, labels: {app: backend}}
"#;

    #[test]
    fn the_design_example_parses() {
        let s = ClusterSpec::from_yaml(DESIGN_EXAMPLE).unwrap();
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.workloads[1].service_account, "api");
        assert_eq!(s.workloads[0].labels["app"], "frontend");
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (yaml, want) in [
            ("nodes: []", "nodes: give 1 to 200"),
            ("nodes: [{name: a}, {name: a}]", "nodes[1].name: node \"a\" is listed twice"),
            ("nodes: [{name: Node_1}]", "nodes[0].name"),
            ("trustDomain: 'bad domain'\nnodes: [{name: a}]", "trustDomain"),
            ("nodes: [{name: a}]\nworkloads: [{name: w, node: b}]", "workloads[0].node: \"b\" is not one of"),
            (
                "nodes: [{name: a}]\nworkloads: [{name: w, node: a}, {name: w, node: a}]",
                "workloads[1].name: workload default/w is listed twice",
            ),
            ("nodes: [{name: a}]\nworkloads: [{name: w, node: a, serviceAccount: 'x/y'}]", "workloads[0].serviceAccount"),
        ] {
            let e = ClusterSpec::from_yaml(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn shape_errors_carry_the_line() {
        let e = ClusterSpec::from_yaml("nodes:\n  - {name: a}\nworkloads:\n  - {name: w, node: a, colour: red}\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`") && e.contains("line 4"), "{e}");
        let e = ClusterSpec::from_yaml("nodes: 3").unwrap_err().to_string();
        assert!(e.contains("nodes") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn generated_spreads_pods_round_robin() {
        let s = ClusterSpec::generated(3, 7);
        s.validate().unwrap();
        let on: Vec<&str> = s.workloads.iter().map(|w| w.node.as_str()).collect();
        assert_eq!(on, ["node-1", "node-2", "node-3", "node-1", "node-2", "node-3", "node-1"]);
    }
}
