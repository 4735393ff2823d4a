//! `meshctl policy apply|get|delete`: the `MeshPolicy` YAML that
//! `kubectl apply` takes, through identity-ca's registry (standalone mode).
//!
//! A file is parsed and checked whole here first (the error names the
//! document, field and line), then sent in one request that the registry
//! applies in one transaction: nothing is ever half-applied.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use meshguard_ca_client::registry::proto;
use meshguard_common::policy::MeshPolicy;

use crate::cli::{CliError, Output, PolicyCmd, state};
use crate::sim::identity::Identity;
use meshguard_common::output::Table;

pub fn run(dir: &Path, cmd: PolicyCmd) -> Result<ExitCode, CliError> {
    // Input is checked before the cluster is even looked at.
    let file_policies = match &cmd {
        PolicyCmd::Apply { file } | PolicyCmd::Delete { file: Some(file), .. } => Some(read_policies(file)?),
        _ => None,
    };
    let c = state::require(dir)?;
    let saved = state::saved(dir)?.and_then(|s| s.identity).ok_or_else(|| CliError::State("this cluster has no registry".into()))?;
    let id = c.identity_from(saved);
    match cmd {
        PolicyCmd::Apply { .. } => {
            let (text, policies) = file_policies.expect("read above");
            let keys = apply(&id, &text)?;
            debug_assert_eq!(keys.len(), policies.len());
            for k in keys {
                println!("meshpolicy {k} applied");
            }
        }
        PolicyCmd::Get { name, output } => {
            let mut all = list(&id)?;
            if let Some(name) = &name {
                all.retain(|p| &p.key() == name);
                if all.is_empty() {
                    return Err(CliError::Input(format!("no policy {name:?} (policies are NAMESPACE/NAME)")));
                }
            }
            print_policies(&all, output)?;
        }
        PolicyCmd::Delete { name, .. } => {
            let keys: Vec<String> = match (name, file_policies) {
                (Some(n), _) => vec![n],
                (None, Some((_, ps))) => ps.iter().map(MeshPolicy::key).collect(),
                (None, None) => unreachable!("clap requires a file or a name"),
            };
            let existing: Vec<String> = list(&id)?.iter().map(MeshPolicy::key).collect();
            if let Some(missing) = keys.iter().find(|k| !existing.contains(k)) {
                return Err(CliError::Input(format!("no policy {missing:?}; nothing deleted")));
            }
            for k in keys {
                delete(&id, &k)?;
                println!("meshpolicy {k} deleted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The file (or stdin for "-") and the policies in it, checked.
fn read_policies(file: &Path) -> Result<(String, Vec<MeshPolicy>), CliError> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| CliError::Input(format!("cannot read {}: {e}", file.display())))?
    };
    let policies = MeshPolicy::all_from_yaml(&text).map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
    if policies.is_empty() {
        return Err(CliError::Input(format!("{}: no MeshPolicy in the file", file.display())));
    }
    Ok((text, policies))
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CliError::Io)
}

fn admin_err(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(format!("identity-ca's admin API: {e}"))
}

/// Sends every policy of `text` in one request; the registry applies them
/// in one transaction. Returns the keys applied.
pub fn apply(id: &Identity<'_>, text: &str) -> Result<Vec<String>, CliError> {
    runtime()?.block_on(async {
        let mut c = meshguard_identity_ca::admin::connect(&id.admin_socket).await.map_err(admin_err)?;
        let r = c.put_policy(proto::PutPolicyRequest { yaml: text.to_owned() }).await.map_err(|s| admin_err(s.message()))?;
        Ok(r.into_inner().keys)
    })
}

/// Every policy in the registry.
pub fn list(id: &Identity<'_>) -> Result<Vec<MeshPolicy>, CliError> {
    runtime()?.block_on(async {
        let mut c = meshguard_identity_ca::admin::connect(&id.admin_socket).await.map_err(admin_err)?;
        let r = c.list_policies(proto::ListPoliciesRequest {}).await.map_err(|s| admin_err(s.message()))?;
        let mut out = r
            .into_inner()
            .policies
            .iter()
            .map(|p| serde_json::from_str::<MeshPolicy>(&p.json).map_err(|e| admin_err(format!("policy {}/{}: {e}", p.namespace, p.name))))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(MeshPolicy::key);
        Ok(out)
    })
}

fn delete(id: &Identity<'_>, key: &str) -> Result<(), CliError> {
    let (namespace, name) = key.split_once('/').ok_or_else(|| CliError::Input(format!("{key:?} is not NAMESPACE/NAME")))?;
    runtime()?.block_on(async {
        let mut c = meshguard_identity_ca::admin::connect(&id.admin_socket).await.map_err(admin_err)?;
        c.delete_policy(proto::DeletePolicyRequest { namespace: namespace.into(), name: name.into() })
            .await
            .map_err(|s| admin_err(s.message()))?;
        Ok(())
    })
}

fn print_policies(ps: &[MeshPolicy], output: Output) -> Result<(), CliError> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(ps).map_err(|e| CliError::Failed(e.to_string()))?),
        Output::Yaml => {
            // One document per policy: the file `policy apply -f` takes back.
            for p in ps {
                print!("---\n{}", meshguard_common::yaml::to_string(p).map_err(|e| CliError::Failed(e.to_string()))?);
            }
        }
        Output::Table => {
            let mut t = Table::new(&["NAMESPACE", "NAME", "SELECTOR", "INGRESS RULES", "EGRESS RULES", "AUTHENTICATION"]);
            for p in ps {
                let selector = if p.spec.selector.is_empty() {
                    "(all pods)".to_owned()
                } else {
                    p.spec.selector.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
                };
                let count =
                    |r: &Option<Vec<meshguard_common::policy::Rule>>| r.as_ref().map_or_else(|| "-".to_owned(), |r| r.len().to_string());
                let auth = p
                    .spec
                    .ingress
                    .iter()
                    .chain(p.spec.egress.iter())
                    .flatten()
                    .any(|r| r.authentication == meshguard_common::policy::Authentication::Required);
                t.row(vec![
                    p.namespace().to_owned(),
                    p.name().to_owned(),
                    selector,
                    count(&p.spec.ingress),
                    count(&p.spec.egress),
                    if auth { "required (some rules)".into() } else { "none".into() },
                ]);
            }
            print!("{t}");
        }
    }
    Ok(())
}
