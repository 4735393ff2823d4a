//! The simulated cluster: nodes and pods as network namespaces, real agents.
//!
//! ```text
//!   underlay netns: bridge br0, 192.168.100.0/24
//!     ├── node-1 netns: eth0 192.168.100.1, wg-agent, pod CIDR 10.244.1.0/24
//!     │     ├── pod netns: eth0 10.244.1.10/32, default via 169.254.1.1 (the node's veth)
//!     │     └── ...
//!     └── node-2 ...
//! ```
//!
//! Every name carries the run id (`mg-<pid>-<hex>`), so runs proceed in
//! parallel; dropping the [`Cluster`] — also while a test panics — kills
//! every process it started and deletes every namespace. Namespaces left by
//! a run that was SIGKILLed are swept by the next run (their pid is gone).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshguard_common::cluster::Workload;
use meshguard_common::cluster::file::ClusterFile;
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::TrustDomain;
use serde::{Deserialize, Serialize};

use crate::sim::bins::{bin_path, require_root};
use crate::sim::cmd::{self, CmdError, ip, ip_in, sysctl};
use crate::sim::uapi::{self, WgDevice};

/// Prefix of every namespace a run creates.
pub const NETNS_PREFIX: &str = "mg-";
/// Prefix of a persistent cluster's names (`meshctl up`): it outlives the
/// process that built it, so the stale-run sweep (which keys on the pid in
/// `mg-<pid>-…`) must never match it.
pub const PERSISTENT_PREFIX: &str = "mgc-";
/// Where runs keep configs, keys, logs and captures.
pub const RUN_ROOT: &str = "/tmp/meshguard-runs";
/// Keep namespaces and files after the run (for debugging): `MESHGUARD_KEEP=1`.
pub const KEEP_ENV: &str = "MESHGUARD_KEEP";

pub const UNDERLAY_BRIDGE: &str = "br0";
pub const NODE_UNDERLAY_IF: &str = "eth0";
pub const TUNNEL_IF: &str = "mg0";
pub const WG_PORT: u16 = 51820;
/// The pod's next hop: a link-local address answered by the node's veth.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// Pods use the tunnel's MTU, as CNIs do, so no packet needs fragmenting.
pub const POD_MTU: u16 = 1420;
pub const METRICS_PORT: u16 = 9401;
/// Node addresses are 192.168.100.1-200 (.254 is identity-ca's).
pub const MAX_NODES: usize = 200;
/// Pod addresses on a node are 10.244.N.10-254.
pub const MAX_PODS_PER_NODE: usize = 245;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{what} did not happen within {secs}s")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// A prose-like fixture: `cluster().nodes(3).pod("shop/web").on("node-1").build()`.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
    trust_domain: String,
    policies: Vec<MeshPolicy>,
    run_root: PathBuf,
    persistent: bool,
}

pub struct PodBuilder {
    cluster: ClusterBuilder,
    spec: PodSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub dir: PathBuf,
    /// The agent's pid, kept in the saved state of a persistent cluster.
    #[serde(default)]
    pub agent_pid: Option<u32>,
    #[serde(skip)]
    agent: Mutex<Option<Child>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The node-side end of the pod's veth.
    pub host_if: String,
    pub mac: String,
}

/// Renders a node agent's `cluster:` source (a YAML flow mapping) for a node.
type AgentSource = Box<dyn Fn(&str) -> String + Send>;

pub struct Cluster {
    pub run_id: String,
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub trust_domain: TrustDomain,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    policies: Vec<MeshPolicy>,
    children: Mutex<Vec<Child>>,
    keep: bool,
    /// Opened from a saved state ([`Cluster::open`]): its processes are not
    /// our children.
    opened: bool,
    /// Detached, opened or removed: dropping this value touches nothing.
    handed_over: bool,
    /// Renders the agents' `cluster:` source for a node; the shared
    /// directory when unset.
    agent_source: Mutex<Option<AgentSource>>,
    /// The agents' `datapath.attachMode` (`auto` unless a test forces one).
    attach_mode: Mutex<&'static str>,
}

/// What a persistent cluster saves in its state directory, so that later
/// `meshctl` invocations can find, inspect and remove it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedCluster {
    pub run_id: String,
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub trust_domain: TrustDomain,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub policies: Vec<MeshPolicy>,
    /// Everything else the run started (identity-ca, auth-handshake, servers).
    pub pids: Vec<u32>,
    /// The identity stack, when one was started (see [`crate::sim::identity`]).
    pub identity: Option<crate::sim::identity::SavedIdentity>,
}

pub fn cluster() -> ClusterBuilder {
    ClusterBuilder {
        nodes: vec!["node-1".into(), "node-2".into()],
        pods: Vec::new(),
        trust_domain: "cluster.local".into(),
        policies: Vec::new(),
        run_root: PathBuf::from(RUN_ROOT),
        persistent: false,
    }
}

// === impl ClusterBuilder ===

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        assert!((1..=MAX_NODES).contains(&n), "1 to {MAX_NODES} nodes");
        self.nodes = (1..=n).map(|i| format!("node-{i}")).collect();
        self
    }

    /// Nodes with these names, in this order (node `i` gets underlay address
    /// 192.168.100.`i` and pod CIDR 10.244.`i`.0/24).
    pub fn named_nodes(mut self, names: Vec<String>) -> Self {
        assert!((1..=MAX_NODES).contains(&names.len()), "1 to {MAX_NODES} nodes");
        self.nodes = names;
        self
    }

    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = td.into();
        self
    }

    /// A pod `<namespace>/<name>`; its service account defaults to its name.
    pub fn pod(self, key: &str) -> PodBuilder {
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        PodBuilder {
            spec: PodSpec {
                namespace: namespace.into(),
                name: name.into(),
                node: String::new(),
                service_account: name.into(),
                labels: BTreeMap::new(),
            },
            cluster: self,
        }
    }

    pub fn policy(mut self, yaml: &str) -> Self {
        self.policies.extend(MeshPolicy::all_from_yaml(yaml).expect("fixture policy is valid"));
        self
    }

    /// Adds an already parsed pod (e.g. from a `meshctl up --spec` file).
    pub fn pod_spec(mut self, spec: PodSpec) -> Self {
        self.pods.push(spec);
        self
    }

    /// Keeps the run's files under `dir/<run id>` instead of [`RUN_ROOT`].
    pub fn run_root(mut self, dir: &Path) -> Self {
        self.run_root = dir.to_owned();
        self
    }

    /// A cluster that outlives this process (`meshctl up`): names start with
    /// [`PERSISTENT_PREFIX`] so no other run sweeps it, and
    /// [`Cluster::detach`] hands it over to its saved state.
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Creates every namespace, link, address and route. Agents are started
    /// separately ([`Cluster::start_agents`]) so tests can act before that.
    pub fn build(self) -> Result<Cluster> {
        require_root();
        sweep_stale_runs();
        mount_bpffs_if_needed();
        let run_id = if self.persistent {
            format!("{PERSISTENT_PREFIX}{:08x}", rand::random::<u32>())
        } else {
            format!("{NETNS_PREFIX}{}-{:04x}", std::process::id(), rand::random::<u16>())
        };
        let dir = self.run_root.join(&run_id);
        std::fs::create_dir_all(&dir)?;
        let trust_domain = TrustDomain::new(&self.trust_domain).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        let mut c = Cluster {
            underlay_ns: format!("{run_id}-underlay"),
            run_id,
            dir,
            trust_domain,
            nodes: Vec::new(),
            pods: Vec::new(),
            policies: self.policies,
            children: Mutex::new(Vec::new()),
            keep: std::env::var_os(KEEP_ENV).is_some(),
            opened: false,
            handed_over: false,
            agent_source: Mutex::new(None),
            attach_mode: Mutex::new("auto"),
        };
        // From here on, Drop cleans up whatever was created.
        c.create_underlay()?;
        for (i, name) in self.nodes.iter().enumerate() {
            c.create_node(i as u8 + 1, name)?;
        }
        for spec in self.pods {
            if !c.nodes.iter().any(|n| n.name == spec.node) {
                return Err(ClusterError::Invalid(format!("pod {}/{} is on unknown node {}", spec.namespace, spec.name, spec.node)));
            }
            c.create_pod(spec)?;
        }
        c.write_cluster_file()?;
        Ok(c)
    }
}

impl PodBuilder {
    pub fn service_account(mut self, sa: &str) -> Self {
        self.spec.service_account = sa.into();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.spec.labels.insert(k.into(), v.into());
        self
    }

    pub fn on(mut self, node: &str) -> ClusterBuilder {
        self.spec.node = node.into();
        self.cluster.pods.push(self.spec);
        self.cluster
    }
}

// === impl Cluster ===

impl Cluster {
    fn create_underlay(&mut self) -> Result<()> {
        ip(&["netns", "add", &self.underlay_ns])?;
        ip_in(&self.underlay_ns, &["link", "set", "lo", "up"])?;
        ip_in(&self.underlay_ns, &["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        ip_in(&self.underlay_ns, &["link", "set", UNDERLAY_BRIDGE, "up"])?;
        Ok(())
    }

    fn create_node(&mut self, index: u8, name: &str) -> Result<()> {
        let name = name.to_owned();
        let netns = format!("{}-{name}", self.run_id);
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        ip(&["netns", "add", &netns])?;
        let node = Node {
            name,
            index,
            underlay_ip: Ipv4Addr::new(192, 168, 100, index),
            pod_cidr: format!("10.244.{index}.0/24"),
            dir,
            netns,
            agent_pid: None,
            agent: Mutex::new(None),
        };
        let ns = node.netns.clone();
        let port = format!("n{index}");
        self.nodes.push(node);
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        ip_in(&ns, &["link", "add", NODE_UNDERLAY_IF, "type", "veth", "peer", "name", &port, "netns", &self.underlay_ns])?;
        ip_in(&self.underlay_ns, &["link", "set", &port, "master", UNDERLAY_BRIDGE, "up"])?;
        ip_in(&ns, &["addr", "add", &format!("192.168.100.{index}/24"), "dev", NODE_UNDERLAY_IF])?;
        ip_in(&ns, &["link", "set", NODE_UNDERLAY_IF, "up"])?;
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    fn create_pod(&mut self, spec: PodSpec) -> Result<()> {
        let node = self.node(&spec.node);
        let k = self.pods.iter().filter(|p| p.node == spec.node).count();
        if k >= MAX_PODS_PER_NODE {
            return Err(ClusterError::Invalid(format!("node {} cannot hold more than {MAX_PODS_PER_NODE} pods", spec.node)));
        }
        if self.pods.iter().any(|p| p.namespace == spec.namespace && p.name == spec.name) {
            return Err(ClusterError::Invalid(format!("pod {}/{} is defined twice", spec.namespace, spec.name)));
        }
        let k = k as u8;
        let pod_ip = Ipv4Addr::new(10, 244, node.index, 10 + k);
        // `_` cannot occur in a Kubernetes namespace or pod name: no two pods share a name.
        let netns = format!("{}-{}_{}", self.run_id, spec.namespace, spec.name);
        let host_if = format!("lxc{}", 10 + k);
        let node_ns = node.netns.clone();
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            namespace: spec.namespace,
            name: spec.name,
            node: spec.node,
            service_account: spec.service_account,
            labels: spec.labels,
            netns: netns.clone(),
            ip: pod_ip,
            host_if: host_if.clone(),
            mac: String::new(),
        };
        self.pods.push(pod);
        let mtu = POD_MTU.to_string();
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&node_ns, &["link", "add", &host_if, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu, "netns", &netns])?;
        ip_in(&node_ns, &["link", "set", &host_if, "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        let host_mac = link_mac(&node_ns, &host_if)?;
        let pod_mac = link_mac(&netns, "eth0")?;
        ip_in(&netns, &["neigh", "replace", POD_GATEWAY, "lladdr", &host_mac, "dev", "eth0", "nud", "permanent"])?;
        ip_in(&netns, &["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
        ip_in(&netns, &["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
        ip_in(&node_ns, &["route", "add", &format!("{pod_ip}/32"), "dev", &host_if])?;
        let pod = self.pods.last_mut().expect("just pushed");
        pod.mac = pod_mac;
        // Tell the node agent about its pod, as a CNI plugin would.
        let ep = meshguard_common::cluster::LocalEndpoint {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            interface: host_if,
            mac: pod.mac.clone(),
            ips: vec![pod_ip.into()],
        };
        let node = pod.node.clone();
        let dir = self.endpoints_dir(&node);
        std::fs::create_dir_all(&dir)?;
        let text = meshguard_common::yaml::to_string(&ep).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        std::fs::write(dir.join(ep.file_name()), text)?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// A pod by `<namespace>/<name>`.
    pub fn pod(&self, key: &str) -> &Pod {
        self.pods.iter().find(|p| p.key() == key).unwrap_or_else(|| panic!("no pod {key}"))
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// The operator part of the file source: workloads (from the pods) and policies.
    pub fn write_cluster_file(&self) -> Result<()> {
        let file = ClusterFile {
            trust_domain: Some(self.trust_domain.clone()),
            workloads: self
                .pods
                .iter()
                .map(|p| Workload {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    node: p.node.clone(),
                    ips: vec![p.ip.into()],
                    labels: p.labels.clone(),
                })
                .collect(),
            policies: self.policies.clone(),
        };
        let dir = self.cluster_dir();
        std::fs::create_dir_all(&dir)?;
        let text = meshguard_common::yaml::to_string(&file).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        let tmp = dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, dir.join("cluster.yaml"))?;
        Ok(())
    }

    /// Replaces the policies in the cluster file (agents see it within ~100 ms).
    pub fn set_policies(&mut self, yaml: &str) -> Result<()> {
        self.policies = MeshPolicy::all_from_yaml(yaml).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        self.write_cluster_file()
    }

    pub fn agent_config_path(&self, node: &str) -> PathBuf {
        self.node(node).dir.join("agent.yaml")
    }

    pub fn uapi_dir(&self, node: &str) -> PathBuf {
        self.node(node).dir.join("run")
    }

    /// Where the node's pods are described for its agent (the CNI's job).
    pub fn endpoints_dir(&self, node: &str) -> PathBuf {
        self.node(node).dir.join("endpoints")
    }

    /// Where the node agent streams its datapath events (`meshctl observe`).
    pub fn events_socket(&self, node: &str) -> PathBuf {
        self.uapi_dir(node).join("events.sock")
    }

    /// Where the node agent takes pods from the CNI plugin (`meshguard-cni`'s `agentSocket`).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.uapi_dir(node).join("cni.sock")
    }

    /// Every entry of `node`'s pinned auth map with the time it has left
    /// (zero: expired); empty while the datapath is not loaded.
    pub fn auth_entries(&self, node: &str) -> Vec<(meshguard_ebpf::AuthPair, Duration)> {
        meshguard_ebpf::AuthTable::open(&meshguard_ebpf::PinLayout::new(self.pin_dir(node))).and_then(|t| t.entries()).unwrap_or_default()
    }

    /// The live (unexpired) auth entries of `node`.
    pub fn live_auth_pairs(&self, node: &str) -> Vec<meshguard_ebpf::AuthPair> {
        self.auth_entries(node).into_iter().filter(|(_, left)| !left.is_zero()).map(|(p, _)| p).collect()
    }

    /// The node's pinned datapath in bpffs (per run, so runs stay apart).
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(BPF_PIN_ROOT).join(format!("{}-{node}", self.run_id))
    }

    /// Makes agents started from now on use the source `f(node)` renders
    /// (a YAML flow mapping for the `cluster:` key), e.g. the registry.
    pub fn set_agent_source(&self, f: impl Fn(&str) -> String + Send + 'static) {
        *self.agent_source.lock().expect("source lock") = Some(Box::new(f));
    }

    /// How the agents attach their programs from their next start: `auto`,
    /// `tcx` or `tc` (the fallback for kernels before 6.6, forced).
    pub fn set_attach_mode(&self, mode: &'static str) {
        *self.attach_mode.lock().expect("attach mode lock") = mode;
    }

    pub fn write_agent_config(&self, node: &str, strict: bool) -> Result<PathBuf> {
        let n = self.node(node);
        let source = match self.agent_source.lock().expect("source lock").as_ref() {
            Some(f) => f(node),
            None => format!("{{dir: {}}}", self.cluster_dir().display()),
        };
        let cfg = format!(
            "nodeName: {name}\nstateDir: {state}\ninterface: {TUNNEL_IF}\nlistenPort: {WG_PORT}\n\
             endpoint: {ip}:{WG_PORT}\npodCidrs: [{cidr}]\nclusterCidrs: [10.244.0.0/16]\nstrict: {strict}\n\
             uapiSocketDir: {uapi}\ncniSocket: {cni}\nmetricsAddress: 127.0.0.1:{METRICS_PORT}\ncluster: {source}\n\
             datapath: {{pinDir: {pin}, endpointsDir: {endpoints}, eventsSocket: {events}, attachMode: {attach}}}\n",
            name = n.name,
            state = n.dir.join("state").display(),
            ip = n.underlay_ip,
            cidr = n.pod_cidr,
            uapi = self.uapi_dir(node).display(),
            cni = self.cni_socket(node).display(),
            pin = self.pin_dir(node).display(),
            endpoints = self.endpoints_dir(node).display(),
            events = self.events_socket(node).display(),
            attach = self.attach_mode.lock().expect("attach mode lock"),
        );
        let path = self.agent_config_path(node);
        std::fs::write(&path, cfg)?;
        Ok(path)
    }

    /// Starts `wg-agent run` on every node and waits for a full mesh.
    pub fn start_agents(&self) -> Result<()> {
        // All at once: each agent's start (datapath load, first sync) is
        // mostly waiting, so the nodes overlap instead of queueing.
        for n in &self.nodes {
            self.spawn_agent(&n.name)?;
        }
        for n in &self.nodes {
            self.wait_agent(&n.name)?;
        }
        self.wait_mesh()
    }

    /// Starts (or restarts) the node agent of `node` and waits until it is ready.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.spawn_agent(node)?;
        self.wait_agent(node)
    }

    fn spawn_agent(&self, node: &str) -> Result<()> {
        let config = self.write_agent_config(node, true)?;
        let n = self.node(node);
        let log = OpenOptions::new().create(true).append(true).open(n.dir.join("agent.log"))?;
        // nsenter, not `ip netns exec`: the latter gives the process a private
        // /sys, which would hide the host's bpffs and with it the pinned
        // datapath a restarted agent must adopt.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", n.netns))
            .arg("--")
            .arg(bin_path("wg-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // Its own process group: a terminal's Ctrl-C to meshctl (or to a
            // test run) does not reach the agents; the cluster stops them.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut slot = n.agent.lock().expect("agent lock");
        if let Some(mut old) = slot.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        *slot = Some(child);
        Ok(())
    }

    /// Waits until `node`'s agent serves its UAPI socket and says it is ready.
    fn wait_agent(&self, node: &str) -> Result<()> {
        let sock = uapi::socket_path(&self.uapi_dir(node), TUNNEL_IF);
        wait_until(&format!("{node}'s agent to serve {}", sock.display()), Duration::from_secs(20), || {
            self.agent_alive(node) && uapi::get(&sock).is_ok()
        })
        .map_err(|e| self.with_log(node, e))?;
        // Ready: peers applied, the policy datapath loaded (or adopted) and pods attached.
        wait_until(&format!("{node}'s agent to be ready"), Duration::from_secs(60), || {
            self.agent_alive(node) && self.http_get(node, "/readyz").is_ok()
        })
        .map_err(|e| self.with_log(node, e))
    }

    /// Whether `node`'s wg-agent runs.
    pub fn agent_alive(&self, node: &str) -> bool {
        let n = self.node(node);
        let mut slot = n.agent.lock().expect("agent lock");
        match slot.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => n.agent_pid.is_some_and(pid_alive),
        }
    }

    /// Stops the agent: `graceful` sends SIGTERM, otherwise SIGKILL (a crash).
    pub fn stop_agent(&self, node: &str, graceful: bool) -> Result<()> {
        let Some(mut child) = self.node(node).agent.lock().expect("agent lock").take() else { return Ok(()) };
        if graceful {
            signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        // `ip netns exec` replaces itself with the agent, so the child is the agent.
        Ok(())
    }

    /// The node's WireGuard device as `wg show` would print it.
    pub fn wg(&self, node: &str) -> Result<WgDevice> {
        uapi::get(&uapi::socket_path(&self.uapi_dir(node), TUNNEL_IF)).map_err(ClusterError::Io)
    }

    /// Waits until every node has a peer for every other node and a handshake with each.
    pub fn wait_mesh(&self) -> Result<()> {
        let want = self.nodes.len() - 1;
        for n in &self.nodes {
            wait_until(&format!("{} to have {want} peers with handshakes", n.name), Duration::from_secs(20), || {
                self.wg(&n.name).is_ok_and(|d| d.peers.len() == want && d.peers.iter().all(|p| p.last_handshake_sec > 0))
            })
            .map_err(|e| self.with_log(&n.name, e))?;
        }
        Ok(())
    }

    /// Runs a command in a pod's network namespace and returns its output.
    pub fn exec(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        Ok(cmd::in_ns_output(&self.pod(pod).netns, program, args)?)
    }

    /// Runs `mg-probe <args>` in a pod; true if it did what it was asked
    /// (e.g. `["tcp", "10.244.2.10:7000", "hello"]`: the echo came back).
    pub fn probe(&self, pod: &str, args: &[&str]) -> bool {
        let probe = bin_path("mg-probe");
        self.exec(pod, probe.to_str().expect("utf-8 path"), args).is_ok_and(|o| o.status.success())
    }

    /// Runs a command in a node's network namespace.
    pub fn exec_node(&self, node: &str, program: &str, args: &[&str]) -> Result<Output> {
        Ok(cmd::in_ns_output(&self.node(node).netns, program, args)?)
    }

    /// Starts a long-running command in a pod; it is killed with the cluster.
    pub fn spawn_in_pod(&self, pod: &str, program: &Path, args: &[&str]) -> Result<u32> {
        let ns = self.pod(pod).netns.clone();
        self.spawn_in(&ns, program, args, &[], "pods.log")
    }

    /// Starts a long-running command in any of the run's namespaces, its
    /// output appended to `<run dir>/<log>`; it is killed with the cluster.
    pub fn spawn_in(&self, netns: &str, program: &Path, args: &[&str], env: &[(&str, &str)], log: &str) -> Result<u32> {
        let mut launcher = Command::new("ip");
        launcher.args(["netns", "exec", netns]);
        self.spawn_logged(launcher, program, args, env, log)
    }

    /// [`Cluster::spawn_in`] for a node's own daemons: `nsenter --net` rather
    /// than `ip netns exec`, so the process shares the host's /sys and with
    /// it the bpffs where the node's datapath is pinned (auth-handshake
    /// opens the auth map and signal ring there).
    pub fn spawn_in_node(&self, netns: &str, program: &Path, args: &[&str], env: &[(&str, &str)], log: &str) -> Result<u32> {
        let mut launcher = Command::new("nsenter");
        launcher.arg(format!("--net=/run/netns/{netns}")).arg("--");
        self.spawn_logged(launcher, program, args, env, log)
    }

    /// Runs `launcher program args` in its own process group, its output
    /// appended to `<run dir>/<log>`, and keeps the child.
    fn spawn_logged(&self, mut launcher: Command, program: &Path, args: &[&str], env: &[(&str, &str)], log: &str) -> Result<u32> {
        let log = OpenOptions::new().create(true).append(true).open(self.dir.join(log))?;
        let child = launcher
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Runs `program` in a pod in the background with its own log file;
    /// [`Cluster::wait_child`] collects the exit status, the log the output.
    pub fn background_in_pod(&self, pod: &str, program: &Path, args: &[&str], log: &str) -> Result<(u32, PathBuf)> {
        let ns = self.pod(pod).netns.clone();
        let pid = self.spawn_in(&ns, program, args, &[], log)?;
        Ok((pid, self.dir.join(log)))
    }

    /// Waits for a process started with [`Cluster::spawn_in`] to exit.
    pub fn wait_child(&self, pid: u32, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut children = self.children.lock().expect("children lock");
                let child = children.iter_mut().find(|c| c.id() == pid).ok_or_else(|| ClusterError::Invalid(format!("no child {pid}")))?;
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout { what: format!("process {pid} to exit"), secs: timeout.as_secs() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a process started with [`Cluster::spawn_in`] still runs
    /// (for a cluster opened from its saved state: whether the pid lives).
    pub fn is_running(&self, pid: u32) -> bool {
        let mut children = self.children.lock().expect("children lock");
        match children.iter_mut().find(|c| c.id() == pid) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.opened && pid_alive(pid),
        }
    }

    /// Starts an echo server (TCP and UDP on `port`) in a pod and waits until it listens.
    pub fn start_echo(&self, pod: &str, port: u16) -> Result<()> {
        let p = port.to_string();
        self.spawn_in_pod(pod, &bin_path("mg-probe"), &["serve", "--port", &p])?;
        let ns = self.pod(pod).netns.clone();
        wait_until(&format!("echo server in {pod}"), Duration::from_secs(10), || {
            cmd::in_ns(&ns, "ss", &["-Hltn", &format!("sport = :{port}")]).is_ok_and(|o| !o.trim().is_empty())
        })
    }

    /// Fetches the node agent's Prometheus metrics.
    pub fn metrics(&self, node: &str) -> Result<String> {
        self.http_get(node, "/metrics")
    }

    /// GET on the node agent's metrics port; an error unless 200.
    pub fn http_get(&self, node: &str, path: &str) -> Result<String> {
        let out = self.exec_node(
            node,
            bin_path("mg-probe").to_str().expect("utf-8 path"),
            &["http-get", &format!("127.0.0.1:{METRICS_PORT}"), path],
        )?;
        if !out.status.success() {
            return Err(ClusterError::Invalid(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One metric's value: `name{labels}` exactly as exposed, e.g.
    /// `meshguard_wg_dropped_packets_total{reason="no_peer"}`.
    pub fn metric(&self, node: &str, series: &str) -> Result<f64> {
        let text = self.metrics(node)?;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .ok_or_else(|| ClusterError::Invalid(format!("{node} exposes no {series}")))
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node(node).dir.join("agent.log")).unwrap_or_default()
    }

    fn with_log(&self, node: &str, e: ClusterError) -> ClusterError {
        let tail = log_tail(&self.node(node).dir.join("agent.log"), 30);
        ClusterError::Invalid(format!("{e}\n--- {node} agent log (tail) ---\n{tail}"))
    }

    fn teardown(&mut self) {
        for n in &self.nodes {
            if let Some(mut c) = n.agent.lock().map(|mut s| s.take()).unwrap_or(None) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for mut c in self.children.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut all: Vec<String> = self.pods.iter().map(|p| p.netns.clone()).collect();
        all.extend(self.nodes.iter().map(|n| n.netns.clone()));
        all.push(self.underlay_ns.clone());
        for ns in all {
            delete_netns(&ns);
        }
        remove_bpf_pins(&self.run_id);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("--- {} agent log (tail) ---\n{}", n.name, log_tail(&n.dir.join("agent.log"), 40));
            }
        }
        if self.handed_over {
            return;
        }
        if self.keep {
            eprintln!("{KEEP_ENV} is set: leaving {} and its namespaces in place", self.dir.display());
            return;
        }
        self.teardown();
    }
}

// === impl Pod ===

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// === helpers ===

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: u32, sig: i32) {
    let _ = cmd::run("kill", &[format!("-{sig}"), pid.to_string()]);
}

fn link_mac(ns: &str, ifname: &str) -> Result<String> {
    let out = ip_in(ns, &["-j", "link", "show", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| ClusterError::Invalid(e.to_string()))?;
    v[0]["address"].as_str().map(str::to_owned).ok_or_else(|| ClusterError::Invalid(format!("no MAC for {ifname} in {ns}")))
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout { what: what.into(), secs: timeout.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn delete_netns(ns: &str) {
    // Whatever still runs inside (a server that outlived its parent) goes first.
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = cmd::run("kill", &["-9", pid]);
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes namespaces and files of runs whose process no longer exists.
fn sweep_stale_runs() {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    for line in list.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        // Names are `mg-<pid>-<hex>-...`: the run id is the first three parts.
        let parts: Vec<&str> = ns.splitn(4, '-').collect();
        let [_, pid, hex, ..] = parts.as_slice() else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !ns.starts_with(NETNS_PREFIX) || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_netns(ns);
        let run = format!("{NETNS_PREFIX}{pid}-{hex}");
        let _ = std::fs::remove_dir_all(PathBuf::from(RUN_ROOT).join(&run));
        remove_bpf_pins(&run);
    }
}

/// bpffs holds pinned datapath state per run (see the ebpf crate).
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/meshguard";

fn remove_bpf_pins(run_id: &str) {
    if let Ok(entries) = std::fs::read_dir(BPF_PIN_ROOT) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(run_id) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// bpffs is not mounted at boot on every machine; mount it as Cilium's agent does.
fn mount_bpffs_if_needed() {
    let mounted = cmd::output("mountpoint", &["-q", "/sys/fs/bpf"]).is_ok_and(|o| o.status.success());
    if !mounted {
        let _ = cmd::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// The address other nodes use for `node`'s WireGuard endpoint.
pub fn endpoint_of(node: &Node) -> SocketAddr {
    SocketAddr::new(node.underlay_ip.into(), WG_PORT)
}

// === persistence (meshctl up/down) ===

impl Cluster {
    /// Writes the cluster's description to `state_file` and leaves it
    /// running after this value (and this process) is gone.
    pub fn detach(mut self, identity: Option<crate::sim::identity::SavedIdentity>, state_file: &Path) -> Result<SavedCluster> {
        let mut pids: Vec<u32> = self.children.lock().expect("children lock").iter().map(Child::id).collect();
        pids.sort_unstable();
        let nodes = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(|mut n| {
                n.agent_pid = n.agent.get_mut().expect("agent lock").as_ref().map(Child::id).or(n.agent_pid);
                n
            })
            .collect();
        let saved = SavedCluster {
            run_id: self.run_id.clone(),
            dir: self.dir.clone(),
            underlay_ns: self.underlay_ns.clone(),
            trust_domain: self.trust_domain.clone(),
            nodes,
            pods: std::mem::take(&mut self.pods),
            policies: std::mem::take(&mut self.policies),
            pids,
            identity,
        };
        let text = serde_json::to_vec_pretty(&saved).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        let tmp = state_file.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, state_file)?;
        // std's Child neither kills nor waits on drop: the processes run on.
        self.handed_over = true;
        Ok(saved)
    }

    /// The cluster a saved state describes. Dropping it leaves the cluster
    /// running; [`Cluster::remove`] tears it down.
    pub fn open(saved: SavedCluster) -> Cluster {
        Cluster {
            run_id: saved.run_id,
            dir: saved.dir,
            underlay_ns: saved.underlay_ns,
            trust_domain: saved.trust_domain,
            nodes: saved.nodes,
            pods: saved.pods,
            policies: saved.policies,
            children: Mutex::new(Vec::new()),
            keep: true,
            opened: true,
            handed_over: true,
            agent_source: Mutex::new(None),
            attach_mode: Mutex::new("auto"),
        }
    }

    /// Reads a state file written by [`Cluster::detach`].
    pub fn read_saved(state_file: &Path) -> Result<SavedCluster> {
        let text = std::fs::read(state_file)?;
        serde_json::from_slice(&text)
            .map_err(|e| ClusterError::Invalid(format!("{} is not a meshctl cluster state: {e}", state_file.display())))
    }

    /// Stops every process and removes every namespace, pin and file of the
    /// run, whether this process built it or opened it from its state.
    pub fn remove(mut self) {
        self.teardown();
        self.handed_over = true;
    }

    /// Whether any trace of the run is left on the machine: its namespaces,
    /// its bpffs pins, its run directory. Empty when it is gone.
    pub fn leftovers(run_id: &str, dir: &Path) -> Vec<String> {
        let mut left = Vec::new();
        if let Ok(list) = ip(&["netns", "list"]) {
            left.extend(
                list.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|ns| ns.starts_with(run_id))
                    .map(|ns| format!("netns {ns}")),
            );
        }
        if let Ok(entries) = std::fs::read_dir(BPF_PIN_ROOT) {
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(run_id))
                    .map(|e| format!("bpffs {}", e.path().display())),
            );
        }
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        left
    }
}

// === node records ===

impl Cluster {
    /// The node's current public key (base64), as it published it.
    pub fn node_public_key(&self, node: &str) -> Result<String> {
        let path = self.cluster_dir().join("nodes").join(format!("{node}.yaml"));
        let text = std::fs::read_to_string(&path)?;
        let rec: meshguard_common::cluster::NodeRecord =
            meshguard_common::yaml::from_str(&text).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        Ok(rec.public_key.to_base64())
    }
}
