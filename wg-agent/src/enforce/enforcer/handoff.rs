//! The CNI plugin's hand-off, on the enforcer's side. ADD writes the pod's
//! endpoint file — the durable record that restarts and the pinned
//! datapath's adoption read — syncs at once and answers from the state the
//! pod's interface was left in; whatever cannot be enforced is undone (file
//! removed or restored, interface detached) before the refusal goes back.
//! Runs on the agent's loop, so it never races a sync.

use std::io::Write as _;
use std::path::Path;

use meshguard_cni::protocol::{self, CheckPod, DelPod, Refusal, Request, Response};
use meshguard_common::cluster::{ClusterView, LocalEndpoint};
use meshguard_ebpf::{DatapathApi, Interface};

use super::{EnforceError, Enforcer, PodState};
use crate::enforce::endpoints::read_endpoints;
use crate::enforce::pods::HoldReason;

/// At most this many addresses per pod (one of each family is enforced).
const MAX_IPS: usize = 16;
/// A container ID is for the log only; runtimes use 64 hex digits.
const MAX_CONTAINER_ID: usize = 256;

/// How a hand-off syncs the endpoints: against the view, or — before the
/// first view was applied — holding every pod closed that is not adopted.
#[derive(Debug, Clone, Copy)]
pub enum SyncMode<'a> {
    View(&'a ClusterView),
    BeforeView,
}

type Verdict = Result<Response, (Refusal, String)>;

/// Checks everything a request says before anything is touched: names that
/// become a file name, the interface, MAC and addresses.
pub fn validate(request: &Request) -> Result<(), String> {
    let ifname = |s: &str| crate::io::tun::validate_ifname(s).map_err(|e| e.to_string());
    let container = |s: &str| {
        if s.is_empty() || s.len() > MAX_CONTAINER_ID {
            return Err(format!("containerId must be 1 to {MAX_CONTAINER_ID} bytes"));
        }
        Ok(())
    };
    match request {
        Request::Add(a) => {
            let ep = &a.endpoint;
            container(&a.container_id)?;
            protocol::validate_name("namespace", &ep.namespace)?;
            protocol::validate_name("pod name", &ep.name)?;
            ifname(&ep.interface)?;
            if ep.mac_bytes().is_none() {
                return Err(format!("MAC {:?} is not six hex pairs", ep.mac));
            }
            if ep.ips.is_empty() || ep.ips.len() > MAX_IPS {
                return Err(format!("a pod needs 1 to {MAX_IPS} addresses, not {}", ep.ips.len()));
            }
        }
        Request::Del(d) => {
            container(&d.container_id)?;
            protocol::validate_name("namespace", &d.namespace)?;
            protocol::validate_name("pod name", &d.name)?;
            d.interface.as_deref().map(ifname).transpose()?;
        }
        Request::Check(c) => {
            container(&c.container_id)?;
            protocol::validate_name("namespace", &c.namespace)?;
            protocol::validate_name("pod name", &c.name)?;
            ifname(&c.interface)?;
        }
        Request::Status => {}
    }
    Ok(())
}

/// DEL's file removal: `<dir>/<namespace>_<name>.yaml` goes unless it names
/// another interface than DEL's (a newer sandbox of the same pod wrote it).
/// Returns the interface the removed file named, if it could be read.
pub fn remove_endpoint_file(dir: &Path, d: &DelPod) -> Result<Option<Option<String>>, String> {
    let path = dir.join(file_name(&d.namespace, &d.name));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let named = meshguard_common::yaml::from_str::<LocalEndpoint>(&text).ok().map(|ep| ep.interface);
    if let (Some(want), Some(have)) = (&d.interface, &named)
        && want != have
    {
        tracing::info!(pod = %format!("{}/{}", d.namespace, d.name), interface = %want, file_names = %have, "DEL for an older sandbox: the newer one's endpoint file stays");
        return Ok(None);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(named)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

fn file_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}.yaml")
}

/// Temp file, fsync, rename, fsync the directory: the file is whole or
/// absent, also across a crash, and the pod's record survives a reboot.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Not `*.yaml`: the enforcer never reads a half-written file.
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("endpoint")));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// === impl Enforcer ===

impl<D: DatapathApi> Enforcer<D> {
    /// Serves one request from the CNI plugin.
    pub fn hand_off(&mut self, request: &Request, mode: SyncMode<'_>) -> Response {
        if let Err(e) = validate(request) {
            return Response::refused(Refusal::InvalidRequest, e);
        }
        let verdict = match request {
            Request::Add(a) => self.add_pod(&a.endpoint, mode),
            Request::Del(d) => self.del_pod(d, mode),
            Request::Check(c) => self.check_pod(c),
            Request::Status => Ok(Response::Ready),
        };
        verdict.unwrap_or_else(|(reason, message)| Response::refused(reason, message))
    }

    fn sync(&mut self, mode: SyncMode<'_>) -> Result<(), EnforceError> {
        match mode {
            SyncMode::View(view) => self.sync_endpoints(view),
            SyncMode::BeforeView => self.close_all_but_adopted(),
        }
    }

    fn add_pod(&mut self, ep: &LocalEndpoint, mode: SyncMode<'_>) -> Verdict {
        let io = |e: &dyn std::fmt::Display| (Refusal::Io, e.to_string());
        let file = ep.file_name();
        let path = self.endpoints_dir.join(&file);
        // Refused before anything is written: another pod's interface, or
        // this pod still on a live interface of an older sandbox (taking its
        // file would detach that interface while it may pass traffic).
        let files = read_endpoints(&self.endpoints_dir).map_err(|e| io(&e))?;
        for f in &files {
            let Ok(other) = &f.endpoint else { continue };
            if f.file != file && other.interface == ep.interface {
                return Err((Refusal::ConflictingEndpoint, format!("endpoint file {} already names interface {}", f.file, ep.interface)));
            }
            if f.file == file && other.interface != ep.interface && self.dp.enforced(&Interface::Name(other.interface.clone())).is_ok() {
                return Err((
                    Refusal::ConflictingEndpoint,
                    format!(
                        "pod {} is still on interface {}, which exists: its old sandbox must be deleted first",
                        ep.key(),
                        other.interface
                    ),
                ));
            }
        }
        let previous = std::fs::read(&path).ok();
        let text = meshguard_common::yaml::to_string(ep).map_err(|e| io(&e))?;
        write_atomic(&path, text.as_bytes()).map_err(|e| io(&format!("cannot write {}: {e}", path.display())))?;
        let verdict = match self.sync(mode) {
            Ok(()) => self.judge(&ep.key(), &ep.interface),
            Err(e) => Err(io(&e)),
        };
        if verdict.is_err() {
            let undone = match &previous {
                Some(bytes) => write_atomic(&path, bytes),
                None => std::fs::remove_file(&path),
            };
            if let Err(error) = undone {
                tracing::error!(file = %path.display(), %error, "cannot undo a refused pod's endpoint file");
            }
            if let Err(error) = self.sync(mode) {
                tracing::error!(%error, "cannot sync local endpoints");
            }
            self.release(&ep.interface);
        }
        verdict
    }

    fn del_pod(&mut self, d: &DelPod, mode: SyncMode<'_>) -> Verdict {
        let named = match remove_endpoint_file(&self.endpoints_dir, d) {
            Err(e) => return Err((Refusal::Io, e)),
            Ok(None) => return Ok(Response::Removed { existed: false }),
            Ok(Some(named)) => named,
        };
        if let Err(error) = self.sync(mode) {
            tracing::error!(%error, "cannot sync local endpoints");
        }
        // An unreadable file named the interface it named when last read.
        let known = self.known_files.get(&file_name(&d.namespace, &d.name)).cloned();
        if let Some(iface) = named.or(known).or_else(|| d.interface.clone()) {
            self.release(&iface);
        }
        Ok(Response::Removed { existed: true })
    }

    fn check_pod(&self, c: &CheckPod) -> Verdict {
        let path = self.endpoints_dir.join(file_name(&c.namespace, &c.name));
        let unknown = |why: String| (Refusal::UnknownPod, why);
        let text = std::fs::read_to_string(&path).map_err(|e| unknown(format!("no endpoint file {}: {e}", path.display())))?;
        let ep: LocalEndpoint =
            meshguard_common::yaml::from_str(&text).map_err(|e| unknown(format!("{} is unreadable: {e}", path.display())))?;
        if ep.interface != c.interface {
            return Err(unknown(format!("pod {} is on interface {}, not {}", ep.key(), ep.interface, c.interface)));
        }
        self.judge(&ep.key(), &c.interface)
    }

    /// What the interface was left in: enforced, or held closed only
    /// because the view does not name the pod yet, is a success.
    fn judge(&self, pod: &str, iface: &str) -> Verdict {
        let Some(p) = self.pods.get(iface) else {
            return Err((Refusal::NotEnforced, format!("the enforcer did not take up interface {iface}")));
        };
        if p.want.pod != pod {
            return Err((Refusal::ConflictingEndpoint, format!("interface {iface} is enforced for {}", p.want.pod)));
        }
        let interface = iface.to_owned();
        match &p.state {
            PodState::Enforced { identity } => Ok(Response::Enforced { interface, identity: *identity }),
            PodState::Closed { reason: HoldReason::UnknownWorkload, detail } => {
                Ok(Response::HeldClosed { interface, detail: detail.clone() })
            }
            PodState::Closed { reason: HoldReason::ConflictingEndpoints, detail } => Err((Refusal::ConflictingEndpoint, detail.clone())),
            PodState::Closed { reason, detail } => Err((Refusal::NotEnforced, format!("{}: {detail}", reason.as_str()))),
            PodState::Failed { detail } => Err((Refusal::NotEnforced, format!("attach_failed_down: {detail}"))),
        }
    }

    /// Detaches `iface` and forgets it, unless an endpoint file still names
    /// it. (A sync against the view does this for a removed file; before the
    /// view, syncs only ever add.)
    fn release(&mut self, iface: &str) {
        let named = read_endpoints(&self.endpoints_dir)
            .map(|files| files.iter().any(|f| f.endpoint.as_ref().is_ok_and(|ep| ep.interface == iface)))
            .unwrap_or(true);
        if named {
            return;
        }
        self.known_files.retain(|_, i| i != iface);
        let Some(p) = self.pods.remove(iface) else { return };
        if let Some(ifindex) = p.ifindex
            && let Err(error) = self.dp.detach(&Interface::Index(ifindex))
        {
            tracing::warn!(interface = %iface, %error, "detach failed (interface already gone?)");
        }
        tracing::info!(pod = %p.want.pod, interface = %iface, "pod detached");
        self.publish_pods();
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use meshguard_cni::protocol::AddPod;
    use meshguard_common::cluster::Workload;
    use meshguard_common::spiffe::SpiffeId;
    use meshguard_ebpf::testing::{Enforcement, FakeDatapath};

    use super::*;

    const NODE: &str = "node-1";
    const WEB: u32 = 300;

    struct Node {
        dir: tempfile::TempDir,
        view: ClusterView,
        enforcer: Enforcer<FakeDatapath>,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut view = ClusterView::default();
        view.identities.insert(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap(), WEB);
        let mut enforcer = Enforcer::new(FakeDatapath::default(), NODE, dir.path()).unwrap();
        for (i, name) in ["veth-web", "veth-old", "veth-api"].iter().enumerate() {
            enforcer.dp.add_interface(name, 10 + i as u32);
        }
        Node { dir, view, enforcer }
    }

    fn web(iface: &str) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "shop".into(),
            name: "web".into(),
            interface: iface.into(),
            mac: "02:00:00:00:00:07".into(),
            ips: vec!["10.244.1.7".parse().unwrap()],
        }
    }

    fn add(ep: LocalEndpoint) -> Request {
        Request::Add(AddPod { container_id: "c1".into(), endpoint: ep })
    }

    fn del(iface: Option<&str>) -> Request {
        Request::Del(DelPod {
            container_id: "c1".into(),
            namespace: "shop".into(),
            name: "web".into(),
            interface: iface.map(str::to_owned),
        })
    }

    fn check(iface: &str) -> Request {
        Request::Check(CheckPod { container_id: "c1".into(), namespace: "shop".into(), name: "web".into(), interface: iface.into() })
    }

    impl Node {
        fn serve(&mut self, r: &Request) -> Response {
            let view = self.view.clone();
            self.enforcer.hand_off(r, SyncMode::View(&view))
        }

        fn names_web(&mut self) {
            let w = Workload {
                name: "web".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
                node: NODE.into(),
                ips: vec![],
                labels: Default::default(),
            };
            self.view.workloads.insert(w.key(), w);
        }

        fn files(&self) -> Vec<String> {
            let mut v: Vec<String> =
                std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }

        fn reason(r: &Response) -> Refusal {
            match r {
                Response::Refused { reason, .. } => *reason,
                other => panic!("not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn a_new_pod_is_held_closed_until_the_view_names_it_then_enforced() {
        let mut n = node();
        let r = n.serve(&add(web("veth-web")));
        assert!(matches!(&r, Response::HeldClosed { interface, .. } if interface == "veth-web"), "{r:?}");
        assert_eq!(n.enforcer.dp.enforcement("veth-web"), Enforcement::Closed, "programs on before ADD returns");
        assert_eq!(n.files(), ["shop_web.yaml"], "no temp file left");
        n.names_web();
        n.enforcer.sync_endpoints(&n.view.clone()).unwrap();
        assert_eq!(n.serve(&check("veth-web")), Response::Enforced { interface: "veth-web".into(), identity: WEB });
        // ADD again (a retried ADD): the same answer, nothing re-attached.
        assert_eq!(n.serve(&add(web("veth-web"))), Response::Enforced { interface: "veth-web".into(), identity: WEB });
    }

    #[test]
    fn del_detaches_and_is_idempotent() {
        let mut n = node();
        n.names_web();
        assert!(matches!(n.serve(&add(web("veth-web"))), Response::Enforced { identity: WEB, .. }));
        assert_eq!(n.serve(&del(Some("veth-web"))), Response::Removed { existed: true });
        assert_eq!(n.enforcer.dp.enforcement("veth-web"), Enforcement::Open, "detached");
        assert!(n.enforcer.dp.endpoints.is_empty() && n.files().is_empty());
        assert_eq!(n.serve(&del(Some("veth-web"))), Response::Removed { existed: false });
        assert_eq!(Node::reason(&n.serve(&check("veth-web"))), Refusal::UnknownPod, "CHECK after DEL fails");
    }

    #[test]
    fn a_pod_that_cannot_be_enforced_is_refused_and_undone() {
        let mut n = node();
        n.names_web();
        // The programs cannot be attached: the interface is set down.
        n.enforcer.dp.failing_links.insert("veth-web".into());
        let r = n.serve(&add(web("veth-web")));
        assert_eq!(Node::reason(&r), Refusal::NotEnforced, "{r:?}");
        assert!(n.files().is_empty(), "the file it wrote is gone");
        assert_eq!(n.enforcer.dp.enforcement("veth-web"), Enforcement::Down);
        assert!(!n.enforcer.state.lock().pods.contains_key("veth-web"), "nothing left to report");
        // Programs on, but no endpoint slot for the ifindex: closed, refused, detached.
        n.enforcer.dp.failing_links.clear();
        n.enforcer.dp.endpoint_slots = 5;
        let r = n.serve(&add(web("veth-web")));
        assert!(matches!(&r, Response::Refused { reason: Refusal::NotEnforced, message } if message.starts_with("attach_failed")), "{r:?}");
        assert!(n.files().is_empty());
        assert!(n.enforcer.dp.links.is_empty(), "detached");
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut n = node();
        let mut bad = Vec::new();
        for (field, value) in
            [("namespace", "../etc"), ("name", "web_1"), ("name", ""), ("interface", "veth/x"), ("mac", "02:00:00:00:00"), ("ips", "")]
        {
            let mut ep = web("veth-web");
            match field {
                "namespace" => ep.namespace = value.into(),
                "name" => ep.name = value.into(),
                "interface" => ep.interface = value.into(),
                "mac" => ep.mac = value.into(),
                _ => ep.ips = Vec::<IpAddr>::new(),
            }
            bad.push(add(ep));
        }
        bad.push(Request::Add(AddPod { container_id: String::new(), endpoint: web("veth-web") }));
        bad.push(Request::Del(DelPod { container_id: "c".into(), namespace: "shop".into(), name: "a/b".into(), interface: None }));
        bad.push(Request::Check(CheckPod {
            container_id: "c".into(),
            namespace: "Shop".into(),
            name: "web".into(),
            interface: "veth-web".into(),
        }));
        for r in &bad {
            assert_eq!(Node::reason(&n.serve(r)), Refusal::InvalidRequest, "{r:?}");
        }
        assert!(n.files().is_empty());
        assert!(n.enforcer.dp.links.is_empty() && n.enforcer.dp.endpoints.is_empty());
        assert!(n.enforcer.state.lock().pods.is_empty());
    }

    #[test]
    fn an_interface_another_pod_holds_is_refused_before_anything_is_written() {
        let mut n = node();
        let mut api = web("veth-web");
        api.name = "api".into();
        assert!(matches!(n.serve(&add(api)), Response::HeldClosed { .. }));
        let r = n.serve(&add(web("veth-web")));
        assert_eq!(Node::reason(&r), Refusal::ConflictingEndpoint, "{r:?}");
        assert_eq!(n.files(), ["shop_api.yaml"]);
        assert_eq!(n.enforcer.state.lock().pods["veth-web"].pod, "shop/api", "the other pod is untouched");
    }

    #[test]
    fn a_new_sandbox_waits_for_the_old_ones_interface_to_go() {
        let mut n = node();
        n.names_web();
        assert!(matches!(n.serve(&add(web("veth-old"))), Response::Enforced { .. }));
        let r = n.serve(&add(web("veth-web")));
        assert_eq!(Node::reason(&r), Refusal::ConflictingEndpoint, "the old interface would be left open");
        assert!(matches!(n.enforcer.dp.enforcement("veth-old"), Enforcement::Enforced(_)));
        // A late DEL for the old sandbox, carrying the new interface, leaves the file.
        assert_eq!(n.serve(&del(Some("veth-web"))), Response::Removed { existed: false });
        // The old sandbox is torn down (its veth goes): the new one takes over.
        n.enforcer.dp.remove_interface("veth-old");
        assert!(matches!(n.serve(&add(web("veth-web"))), Response::Enforced { .. }));
        assert_eq!(Node::reason(&n.serve(&check("veth-old"))), Refusal::UnknownPod);
    }

    #[test]
    fn before_the_view_a_pod_is_held_closed_and_del_still_detaches() {
        let mut n = node();
        let r = n.enforcer.hand_off(&add(web("veth-web")), SyncMode::BeforeView);
        assert!(matches!(&r, Response::HeldClosed { detail, .. } if detail.contains("not arrived")), "{r:?}");
        assert_eq!(n.enforcer.dp.enforcement("veth-web"), Enforcement::Closed);
        assert_eq!(n.enforcer.hand_off(&del(None), SyncMode::BeforeView), Response::Removed { existed: true });
        assert_eq!(n.enforcer.dp.enforcement("veth-web"), Enforcement::Open);
        assert!(n.enforcer.state.lock().pods.is_empty());
    }

    #[test]
    fn del_while_loading_removes_only_the_sandboxs_own_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shop_web.yaml"), meshguard_common::yaml::to_string(&web("veth-new")).unwrap()).unwrap();
        let d = |i: Option<&str>| DelPod {
            container_id: "c".into(),
            namespace: "shop".into(),
            name: "web".into(),
            interface: i.map(Into::into),
        };
        assert_eq!(remove_endpoint_file(dir.path(), &d(Some("veth-old"))), Ok(None));
        assert_eq!(remove_endpoint_file(dir.path(), &d(Some("veth-new"))), Ok(Some(Some("veth-new".into()))));
        assert_eq!(remove_endpoint_file(dir.path(), &d(None)), Ok(None));
    }
}
