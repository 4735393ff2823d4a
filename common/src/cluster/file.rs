//! A cluster source backed by a shared directory: the static source used
//! before the registry exists, and by the simulated cluster.
//!
//! ```text
//! <dir>/cluster.yaml        optional: trustDomain, workloads, policies (written by an operator)
//! <dir>/nodes/<name>.yaml   one NodeRecord per node (written by that node's agent)
//! <dir>/allocations.yaml    numeric identities and node ids (written by whichever
//!                           agent first needs a number, under an exclusive lock)
//! ```
//!
//! Files are replaced atomically (write, then rename), so a reader never sees
//! half a record. A malformed file is reported once and the last good
//! version of it is kept, so one bad write cannot take a node out of the mesh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::alloc::Allocations;
use super::{BoxFuture, ClusterSource, ClusterView, NodeRecord, SourceError, Workload};
use crate::policy::MeshPolicy;
use crate::spiffe::TrustDomain;

/// How often the directory is re-read. Small files, so this is cheap; 100 ms
/// keeps a change's propagation well under the agents' one-second budgets.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

pub const CLUSTER_FILE: &str = "cluster.yaml";
pub const NODES_DIR: &str = "nodes";
pub const ALLOCATIONS_FILE: &str = "allocations.yaml";
const ALLOCATIONS_LOCK: &str = "allocations.lock";

/// The operator-written part of a file-backed cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default, deserialize_with = "crate::policy::deserialize_policies")]
    pub policies: Vec<MeshPolicy>,
}

pub struct FileSource {
    dir: PathBuf,
    rx: watch::Receiver<Arc<ClusterView>>,
    _task: tokio::task::JoinHandle<()>,
}

/// What the poller remembers between reads.
#[derive(Default)]
struct PollState {
    /// Last good parse of each file, and the raw bytes it came from.
    nodes: BTreeMap<String, (Vec<u8>, NodeRecord)>,
    cluster: Option<(Vec<u8>, ClusterFile)>,
}

// === impl FileSource ===

impl FileSource {
    /// Starts watching `dir` (created if missing). Must run inside a tokio runtime.
    pub fn start(dir: impl Into<PathBuf>, poll: Duration) -> Result<Self, SourceError> {
        let dir = dir.into();
        let nodes = dir.join(NODES_DIR);
        std::fs::create_dir_all(&nodes).map_err(|source| SourceError::Io { path: nodes.display().to_string(), source })?;
        let mut state = PollState::default();
        let first = state.read(&dir);
        let (tx, rx) = watch::channel(Arc::new(first));
        let task_dir = dir.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let dir = task_dir.clone();
                let (next, s) = match tokio::task::spawn_blocking(move || {
                    let view = state.read(&dir);
                    (view, state)
                })
                .await
                {
                    Ok(r) => r,
                    Err(_) => return,
                };
                state = s;
                tx.send_if_modified(|cur| {
                    if **cur != next {
                        *cur = Arc::new(next);
                        true
                    } else {
                        false
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { dir, rx, _task: task })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self._task.abort();
    }
}

impl ClusterSource for FileSource {
    fn publish_node<'a>(&'a self, node: &'a NodeRecord) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let path = self.dir.join(NODES_DIR).join(format!("{}.yaml", node.name));
            let text = crate::yaml::to_string(node)
                .map_err(|e| SourceError::Invalid { path: path.display().to_string(), reason: e.to_string() })?;
            write_atomic(&path, text.as_bytes()).await
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }
}

/// Writes `path` so readers see either the old or the new content, never a mix.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SourceError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let io = |source| SourceError::Io { path: path.display().to_string(), source };
    tokio::fs::write(&tmp, bytes).await.map_err(io)?;
    tokio::fs::rename(&tmp, path).await.map_err(io)
}

// === impl PollState ===

impl PollState {
    fn read(&mut self, dir: &Path) -> ClusterView {
        self.read_cluster_file(&dir.join(CLUSTER_FILE));
        self.read_nodes(&dir.join(NODES_DIR));
        let mut view = ClusterView::default();
        if let Some((_, c)) = &self.cluster {
            view.trust_domain = c.trust_domain.clone();
            view.workloads = c.workloads.iter().map(|w| (w.key(), w.clone())).collect();
            view.policies = c.policies.iter().map(|p| (p.key(), p.clone())).collect();
        }
        view.nodes = self.nodes.values().map(|(_, n)| (n.name.clone(), n.clone())).collect();
        match allocate(dir, &view) {
            Ok(a) => {
                view.identities = a.identities;
                view.node_ids = a.nodes;
            }
            Err(reason) => tracing::error!(%reason, "cannot allocate numeric identities; the datapath keeps its last view"),
        }
        view
    }

    fn read_cluster_file(&mut self, path: &Path) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.cluster = None;
                return;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read cluster file; keeping the last good one");
                return;
            }
        };
        if self.cluster.as_ref().is_some_and(|(raw, _)| *raw == bytes) {
            return;
        }
        match parse_cluster_file(&bytes) {
            Ok(c) => self.cluster = Some((bytes, c)),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "invalid cluster file; keeping the last good one");
                // Remember the bad bytes so the warning is not repeated every poll.
                let keep = self.cluster.take().map(|(_, c)| c).unwrap_or_default();
                self.cluster = Some((bytes, keep));
            }
        }
    }

    fn read_nodes(&mut self, nodes_dir: &Path) {
        let entries = match std::fs::read_dir(nodes_dir) {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(path = %nodes_dir.display(), %error, "cannot list node records");
                return;
            }
        };
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".yaml")) else {
                continue;
            };
            let stem = stem.to_owned();
            let Ok(bytes) = std::fs::read(&path) else { continue };
            seen.push(stem.clone());
            if self.nodes.get(&stem).is_some_and(|(raw, _)| *raw == bytes) {
                continue;
            }
            match crate::yaml::from_slice::<NodeRecord>(&bytes) {
                Ok(n) if n.name == stem => {
                    self.nodes.insert(stem, (bytes, n));
                }
                Ok(n) => {
                    tracing::warn!(path = %path.display(), name = %n.name, "node record's name does not match its file name; ignored");
                    self.remember_bad(stem, bytes);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "invalid node record; keeping the last good one");
                    self.remember_bad(stem, bytes);
                }
            }
        }
        self.nodes.retain(|name, _| seen.contains(name));
    }

    fn remember_bad(&mut self, stem: String, bytes: Vec<u8>) {
        if let Some(entry) = self.nodes.get_mut(&stem) {
            entry.0 = bytes;
        }
    }
}

/// Every identity the view names: its workloads' and those policies name by SPIFFE ID.
fn wanted_identities(view: &ClusterView) -> Vec<crate::spiffe::SpiffeId> {
    let mut ids: Vec<_> = view.workload_ids().filter_map(|(_, id)| id).collect();
    ids.extend(view.policies.values().flat_map(super::alloc::policy_identities).cloned());
    ids
}

fn read_allocations(path: &Path) -> Result<Allocations, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let a: Allocations = crate::yaml::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            a.validate().map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(a)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Returns the allocations covering `view`, allocating (under an exclusive
/// lock, so concurrent agents agree) whatever is missing.
fn allocate(dir: &Path, view: &ClusterView) -> Result<Allocations, String> {
    let path = dir.join(ALLOCATIONS_FILE);
    let ids = wanted_identities(view);
    let nodes: Vec<&String> = view.nodes.keys().collect();
    let current = read_allocations(&path)?;
    if ids.iter().all(|i| current.identities.contains_key(i)) && nodes.iter().all(|n| current.nodes.contains_key(*n)) {
        return Ok(current);
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(ALLOCATIONS_LOCK))
        .map_err(|e| format!("allocation lock: {e}"))?;
    lock.lock().map_err(|e| format!("allocation lock: {e}"))?;
    // Re-read under the lock: another agent may have just allocated.
    let mut a = read_allocations(&path)?;
    if a.allocate(&ids, nodes).map_err(|e| e.to_string())? {
        let text = crate::yaml::to_string(&a).map_err(|e| e.to_string())?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    drop(lock);
    Ok(a)
}

/// Parses and validates `cluster.yaml`.
pub fn parse_cluster_file(bytes: &[u8]) -> Result<ClusterFile, String> {
    let c: ClusterFile = crate::yaml::from_slice(bytes).map_err(|e| e.to_string())?;
    for p in &c.policies {
        p.validate().map_err(|e| e.to_string())?;
    }
    let mut keys = std::collections::BTreeSet::new();
    for w in &c.workloads {
        crate::spiffe::validate_segment(&w.namespace).map_err(|e| format!("workload {}: namespace: {e}", w.key()))?;
        crate::spiffe::validate_segment(&w.service_account).map_err(|e| format!("workload {}: serviceAccount: {e}", w.key()))?;
        if !keys.insert(w.key()) {
            return Err(format!("workload {} is listed twice", w.key()));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PublicKey;

    fn node(name: &str, byte: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            public_key: PublicKey([byte; 32]),
            endpoint: "192.168.1.1:51820".parse().unwrap(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn publishes_and_sees_nodes_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileSource::start(dir.path(), Duration::from_millis(10)).unwrap();
        let b = FileSource::start(dir.path(), Duration::from_millis(10)).unwrap();
        let mut rx = b.subscribe();
        a.publish_node(&node("node-1", 1)).await.unwrap();
        let view =
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.nodes.contains_key("node-1"))).await.unwrap().unwrap().clone();
        assert_eq!(view.nodes["node-1"], node("node-1", 1));

        // A garbage write keeps the last good record.
        std::fs::write(dir.path().join("nodes/node-1.yaml"), b"publicKey: [").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(b.subscribe().borrow().nodes["node-1"], node("node-1", 1));

        // A key rotation is seen.
        a.publish_node(&node("node-1", 2)).await.unwrap();
        let mut rx = b.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.nodes["node-1"].public_key == PublicKey([2; 32])))
            .await
            .unwrap()
            .unwrap();

        // Removal is seen.
        std::fs::remove_file(dir.path().join("nodes/node-1.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.nodes.is_empty())).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn identities_are_allocated_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CLUSTER_FILE),
            "trustDomain: td\nworkloads:\n  - {name: web, namespace: shop, serviceAccount: web, node: node-1}\n  - {name: web2, namespace: shop, serviceAccount: web, node: node-2}\n  - {name: api, namespace: shop, serviceAccount: api, node: node-2}\n",
        )
        .unwrap();
        let a = FileSource::start(dir.path(), Duration::from_millis(10)).unwrap();
        let b = FileSource::start(dir.path(), Duration::from_millis(10)).unwrap();
        a.publish_node(&node("node-1", 1)).await.unwrap();
        let mut rx = b.subscribe();
        let view = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.node_ids.contains_key("node-1")))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(view.identities.len(), 2, "two service accounts, two identities: {:?}", view.identities);
        assert_eq!(a.subscribe().borrow().identities, view.identities);
        // A restart (a new source on the same directory) sees the same numbers.
        drop((a, b));
        let c = FileSource::start(dir.path(), Duration::from_millis(10)).unwrap();
        assert_eq!(c.subscribe().borrow().identities, view.identities);
    }

    #[test]
    fn cluster_file_validation() {
        let ok = "trustDomain: cluster.local\nworkloads:\n  - {name: web, namespace: shop, serviceAccount: web, node: node-1, ips: [10.244.1.5]}\n";
        assert_eq!(parse_cluster_file(ok.as_bytes()).unwrap().workloads.len(), 1);
        let dup = format!("{ok}  - {{name: web, namespace: shop, serviceAccount: x, node: node-2}}\n");
        assert!(parse_cluster_file(dup.as_bytes()).unwrap_err().contains("twice"));
        assert!(parse_cluster_file(b"trustDomain: BAD").unwrap_err().contains("trust domain"));
        assert!(parse_cluster_file(b"nodes: []").unwrap_err().contains("unknown field"));
    }
}
