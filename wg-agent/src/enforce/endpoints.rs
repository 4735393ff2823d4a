//! The pods on this node, as the CNI plugin (or the simulated cluster)
//! describes them: one `<namespace>_<name>.yaml` per pod in the agent's
//! endpoints directory.

use std::path::Path;

use meshguard_common::cluster::LocalEndpoint;

use super::EnforceError;

/// Reads `<dir>/*.yaml`; a malformed file is reported and skipped.
pub fn read_endpoints(dir: &Path) -> Result<Vec<LocalEndpoint>, EnforceError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| EnforceError::Endpoints { dir: dir.display().to_string(), source })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        match serde_yaml::from_str::<LocalEndpoint>(&text) {
            Ok(ep) => out.push(ep),
            Err(error) => tracing::warn!(path = %path.display(), %error, "invalid endpoint file; skipped"),
        }
    }
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(out)
}

