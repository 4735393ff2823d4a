//! The CustomResourceDefinitions, derived from the types, and the YAML
//! under `deploy/crds/` that is generated from them (a test fails when the
//! two differ; `UPDATE_CRDS=1 cargo test -p meshguard-common crds` rewrites it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{MeshIdentity, MeshNode};
use crate::policy::MeshPolicy;

/// Every CRD meshguard defines, with the file name it has under `deploy/crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("meshguard.io_meshpolicies.yaml", MeshPolicy::crd()),
        ("meshguard.io_meshnodes.yaml", MeshNode::crd()),
        ("meshguard.io_meshidentities.yaml", MeshIdentity::crd()),
    ]
}

/// One CRD as the YAML `kubectl apply -f` takes.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let value = serde_json::to_value(crd).expect("a CRD serializes");
    format!(
        "# Generated from the Rust types by meshguard_common::cluster::crds; do not edit.\n{}",
        crate::yaml::to_string(&value).expect("a CRD serializes to YAML")
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn deploy_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
    }

    #[test]
    fn crds_under_deploy_match_the_types() {
        let update = std::env::var_os("UPDATE_CRDS").is_some();
        for (file, crd) in all() {
            let path = deploy_dir().join(file);
            let want = to_yaml(&crd);
            if update {
                std::fs::create_dir_all(deploy_dir()).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} differs from the CRD the types derive: rewrite it with `UPDATE_CRDS=1 cargo test -p meshguard-common crds`",
                path.display()
            );
        }
    }
}
