//! Every MeshPolicy and MeshNode the docs show is valid against the CRDs
//! generated from the types: it parses with the types (whose shapes the
//! schema is derived from), passes `MeshPolicy::validate`, and passes the
//! CRD's CEL rules as the API server would evaluate them (kube-cel). A doc
//! example a user copies into `kubectl apply` must not be refused.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use meshguard_common::cluster::MeshNode;
use meshguard_common::policy::MeshPolicy;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// YAML documents in the Markdown files: ```yaml blocks, and heredocs
/// (`<<'EOF'` ... `EOF`) in shell blocks.
fn documents(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let end = if line.trim_start() == "```yaml" {
            "```"
        } else if line.contains("<<'EOF'") || line.contains("<<EOF") {
            "EOF"
        } else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().map(|(_, l)| l).take_while(|l| l.trim() != end).collect();
        for doc in body.join("\n").split("\n---") {
            out.push((i + 2, doc.to_owned()));
        }
    }
    out
}

fn schema_of(crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition) -> serde_json::Value {
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

#[test]
fn every_policy_and_node_in_the_docs_is_valid_against_the_crds() {
    let policy_schema = schema_of(&MeshPolicy::crd());
    let node_schema = schema_of(&MeshNode::crd());
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path()).collect();
    files.push(root().join("README.md"));
    files.retain(|p| p.extension().is_some_and(|x| x == "md"));
    let mut checked = 0;
    for file in &files {
        for (line, doc) in documents(file) {
            let at = format!("{}:{line}", file.display());
            let object: serde_json::Value = match meshguard_common::yaml::from_str(&doc) {
                Ok(v) => v,
                Err(_) => continue, // not YAML (a shell heredoc of something else)
            };
            let schema = match object.get("kind").and_then(|k| k.as_str()) {
                Some("MeshPolicy") => {
                    MeshPolicy::from_yaml(&doc).unwrap_or_else(|e| panic!("{at}: {e}"));
                    &policy_schema
                }
                Some("MeshNode") => {
                    meshguard_common::yaml::from_str::<MeshNode>(&doc).unwrap_or_else(|e| panic!("{at}: {e}"));
                    &node_schema
                }
                _ => continue,
            };
            if let Err(e) = kube::core::cel::Validator::new().validate(schema, &object, None) {
                panic!("{at}: the CRD's rules refuse it: {e:?}");
            }
            checked += 1;
        }
    }
    // The policy reference, the quick start and the identity stack guide.
    assert!(checked >= 3, "found only {checked} examples: has the docs layout changed?");
}
