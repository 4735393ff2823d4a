//! Who is calling the Workload API: peer credentials (SO_PEERCRED) give a
//! pid; a [`CallerResolver`] turns it into one of this node's workloads.
//!
//! In the simulated cluster every pod is a network namespace, so
//! [`NetnsResolver`] compares the caller's `/proc/<pid>/ns/net` with each
//! local pod's namespace file: same device and inode, same namespace.
//! Kubernetes will plug in a resolver based on the pod's cgroup.

use std::os::unix::fs::MetadataExt;

use meshguard_common::cluster::Workload;

/// Maps a caller to one of `candidates` (this node's workloads).
pub trait CallerResolver: Send + Sync {
    fn resolve(&self, pid: i32, candidates: &[Workload]) -> Option<Workload>;
}

/// Resolves by network namespace; `template` names each pod's namespace file
/// with `{namespace}`, `{name}` and `{node}`.
pub struct NetnsResolver {
    template: String,
}

impl NetnsResolver {
    pub fn new(template: impl Into<String>) -> Self {
        Self { template: template.into() }
    }

    pub fn path_for(&self, w: &Workload) -> String {
        self.template.replace("{namespace}", &w.namespace).replace("{name}", &w.name).replace("{node}", &w.node)
    }
}

impl CallerResolver for NetnsResolver {
    fn resolve(&self, pid: i32, candidates: &[Workload]) -> Option<Workload> {
        if pid <= 0 {
            return None;
        }
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
        let mut found =
            candidates.iter().filter(|w| std::fs::metadata(self.path_for(w)).is_ok_and(|m| m.dev() == ns.dev() && m.ino() == ns.ino()));
        let first = found.next()?;
        // Two pods claiming one namespace is a misconfiguration: trust neither.
        if found.next().is_some() {
            tracing::warn!(pid, "several workloads map to the caller's network namespace; refusing");
            return None;
        }
        Some(first.clone())
    }
}

/// A fixed pid → workload table, for tests.
#[derive(Default)]
pub struct StaticResolver(pub std::sync::Mutex<std::collections::BTreeMap<i32, String>>);

impl CallerResolver for StaticResolver {
    fn resolve(&self, pid: i32, candidates: &[Workload]) -> Option<Workload> {
        let key = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&pid).cloned()?;
        candidates.iter().find(|w| w.key() == key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_resolves_and_others_do_not() {
        let w = |name: &str| Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec![],
            labels: Default::default(),
        };
        // This process's own namespace file stands in for the pod's.
        let me = std::process::id() as i32;
        let r = NetnsResolver::new(format!("/proc/{me}/ns/{{name}}"));
        assert_eq!(r.resolve(me, &[w("net"), w("mnt")]).map(|w| w.name), Some("net".into()));
        assert_eq!(r.resolve(me, &[w("mnt")]), None);
        assert_eq!(r.resolve(-1, &[w("net")]), None);
    }
}
