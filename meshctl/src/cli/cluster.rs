//! `meshctl up`, `down` and `exec`: a cluster that outlives the command.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use crate::cli::{CliError, state};
use crate::sim::cluster::Cluster;
use crate::sim::identity::{SPIFFE_ENDPOINT_SOCKET, SavedIdentity};
use crate::sim::spec::ClusterSpec;

/// Builds the cluster a spec (or `--nodes/--pods`) describes, starts every
/// component, and leaves it running under `dir`.
pub fn up(dir: &Path, nodes: u8, pods: u16, spec: Option<&Path>) -> Result<ExitCode, CliError> {
    let spec = match spec {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?;
            ClusterSpec::from_yaml(&text).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?
        }
        None => ClusterSpec::generated(nodes.into(), pods.into()),
    };
    let lock = state::lock(dir)?;
    if let Some(saved) = state::saved(&lock.dir)? {
        return Err(CliError::State(format!(
            "a cluster ({}) is already up in {}; `meshctl down` removes it",
            saved.run_id,
            lock.dir.display()
        )));
    }
    let started = Instant::now();
    let (c, identity) = start(&lock.dir, &spec, None)?;
    let saved = c.detach(Some(identity), &state::state_file(&lock.dir))?;
    println!(
        "cluster {} is up ({:.1}s): {} nodes, {} pods",
        saved.run_id,
        started.elapsed().as_secs_f64(),
        saved.nodes.len(),
        saved.pods.len()
    );
    for p in &saved.pods {
        println!("  {:<28} {:<16} on {}", p.key(), p.ip.to_string(), p.node);
    }
    println!("\nnext: `meshctl status`, `meshctl exec <namespace>/<name> -- <command>`, `meshctl policy apply -f FILE`, `meshctl down`");
    Ok(ExitCode::SUCCESS)
}

/// Builds and starts a cluster: namespaces, identity-ca, auth-handshake and
/// wg-agent (on the CA's registry) on every node, and `policies` (YAML)
/// applied through the registry before the agents start. On any error the
/// partly built cluster is removed (dropping it does).
pub fn start(run_root: &Path, spec: &ClusterSpec, policies: Option<&str>) -> Result<(Cluster, SavedIdentity), CliError> {
    progress("building nodes and pods (network namespaces, veth pairs, routes)");
    let c = spec.builder().persistent().run_root(run_root).build()?;
    progress("starting identity-ca and auth-handshake on every node; issuing SVIDs");
    let saved = {
        let id = c.identity().start()?;
        if let Some(yaml) = policies {
            let file = c.dir.join("policies.yaml");
            std::fs::write(&file, yaml)?;
            id.admin(&["policy", "apply", "-f", &file.to_string_lossy()])?;
        }
        id.use_registry_for_agents();
        id.saved()
    };
    progress("starting wg-agent on every node; waiting for the WireGuard mesh and the eBPF datapath");
    c.start_agents()?;
    Ok((c, saved))
}

/// A progress line on stderr (stdout stays the command's result), with the
/// seconds since the command started.
pub fn progress(what: &str) {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = STARTED.get_or_init(Instant::now).elapsed();
    eprintln!("  [{:>5.1}s] {what}", t.as_secs_f64());
}

/// Removes the cluster of `dir` and checks that nothing of it is left.
pub fn down(dir: &Path) -> Result<ExitCode, CliError> {
    let lock = state::lock(dir)?;
    let Some(saved) = state::saved(&lock.dir)? else {
        return Err(CliError::State(format!("no cluster is up in {}", lock.dir.display())));
    };
    let (run_id, run_dir) = (saved.run_id.clone(), saved.dir.clone());
    Cluster::open(saved).remove();
    let left = Cluster::leftovers(&run_id, &run_dir);
    if !left.is_empty() {
        return Err(CliError::Failed(format!("cluster {run_id} is only partly removed; still there:\n  {}", left.join("\n  "))));
    }
    std::fs::remove_file(state::state_file(&lock.dir))?;
    println!("cluster {run_id} removed");
    Ok(ExitCode::SUCCESS)
}

/// Runs `command` in the pod's network namespace with the Workload API
/// socket of the pod's node, as the pod would see it; passes on its exit code.
pub fn exec(dir: &Path, pod: &str, command: &[String]) -> Result<ExitCode, CliError> {
    let c = state::require(dir)?;
    let Some(p) = c.pods.iter().find(|p| p.key() == pod) else {
        let known: Vec<String> = c.pods.iter().map(|p| p.key()).collect();
        return Err(CliError::Input(format!("no pod {pod:?} in the cluster (pods are NAMESPACE/NAME: {})", known.join(", "))));
    };
    let socket = c.workload_api_socket(&p.node);
    let status = Command::new("ip")
        .args(["netns", "exec", &p.netns])
        .args(command)
        .env(SPIFFE_ENDPOINT_SOCKET, format!("unix://{}", socket.display()))
        .status()
        .map_err(|e| CliError::Failed(format!("cannot run `ip netns exec`: {e}")))?;
    use std::os::unix::process::ExitStatusExt as _;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
