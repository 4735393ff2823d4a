//! The pods on this node, as the CNI plugin hands them over (the agent
//! writes the file, `enforcer::handoff`) or the simulated cluster describes
//! them: one `<namespace>_<name>.yaml` per pod in the agent's endpoints
//! directory.

use std::path::Path;

use meshguard_common::cluster::LocalEndpoint;

use super::EnforceError;

/// One endpoint file: the pod it describes, or why it cannot be read. An
/// unreadable file is never skipped silently — its pod (if the enforcer
/// knew it) is held closed, and the failure shows in `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFile {
    /// The file name, `<namespace>_<name>.yaml`.
    pub file: String,
    pub endpoint: Result<LocalEndpoint, String>,
}

/// Reads `<dir>/*.yaml`, sorted by file name.
pub fn read_endpoints(dir: &Path) -> Result<Vec<EndpointFile>, EnforceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| EnforceError::Endpoints { dir: dir.display().to_string(), source })?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|source| EnforceError::Endpoints { dir: dir.display().to_string(), source })?;
        let path = e.path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let file = e.file_name().to_string_lossy().into_owned();
        let endpoint = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| meshguard_common::yaml::from_str::<LocalEndpoint>(&text).map_err(|e| format!("invalid: {e}")))
            .and_then(|ep| {
                if ep.file_name() == file { Ok(ep) } else { Err(format!("describes pod {} but is not named {}", ep.key(), ep.file_name())) }
            });
        out.push(EndpointFile { file, endpoint });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_misnamed_files_are_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ep = LocalEndpoint {
            namespace: "shop".into(),
            name: "web".into(),
            interface: "veth-web".into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec!["10.244.1.2".parse().unwrap()],
        };
        let text = meshguard_common::yaml::to_string(&ep).unwrap();
        std::fs::write(dir.path().join("shop_web.yaml"), &text).unwrap();
        std::fs::write(dir.path().join("shop_api.yaml"), &text).unwrap();
        std::fs::write(dir.path().join("shop_db.yaml"), "namespace: sh").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let files = read_endpoints(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(names, ["shop_api.yaml", "shop_db.yaml", "shop_web.yaml"]);
        assert!(files[0].endpoint.as_ref().unwrap_err().contains("not named shop_web.yaml"));
        assert!(files[1].endpoint.as_ref().unwrap_err().starts_with("invalid"));
        assert_eq!(files[2].endpoint.as_ref().unwrap(), &ep);
    }
}
