//! `wg-agent run --config FILE`: the node agent's configuration.
//!
//! Parsing (`load`) is separate from the pure `construct_config`, which
//! tests call without touching files or the environment. Every key has its
//! default beside it, with the reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use meshguard_common::config::{Deprecations, parse_duration};

use crate::io::tun::validate_ifname;

/// WireGuard's customary MTU: 1500 minus the largest (IPv6) encapsulation overhead.
pub const DEFAULT_MTU: u16 = 1420;
/// The port WireGuard deployments conventionally use.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// One tunnel interface per node; a short name that is easy to spot in `ip link`.
pub const DEFAULT_INTERFACE: &str = "mg0";
/// The directory the stock `wg` tool reads.
pub const DEFAULT_UAPI_DIR: &str = crate::uapi::server::DEFAULT_SOCKET_DIR;
/// Where the node key lives when `stateDir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshguard";
/// Strict by default: pod traffic never leaves a node in plaintext.
pub const DEFAULT_STRICT: bool = true;
/// The key file's name inside `stateDir`.
pub const KEY_FILE: &str = "node.key";
/// Where the CNI plugin hands pods over; the plugin's `agentSocket` default.
/// Served with or without a datapath: an agent that enforces no pod says so
/// to the plugin rather than look unreachable.
pub const DEFAULT_CNI_SOCKET: &str = meshguard_cni::protocol::DEFAULT_AGENT_SOCKET;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid YAML for wg-agent: {source}")]
    Parse {
        path: String,
        #[source]
        source: meshguard_common::yaml::YamlError,
    },
    #[error("config: {0}")]
    Invalid(String),
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawConfig {
    /// Absent: `$NODE_NAME` (the downward API on Kubernetes).
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// `IP` or `IP:port` other nodes send to. On Kubernetes it may be left
    /// out: the Node's first InternalIP and `listenPort`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// On Kubernetes it may be left out: the Node's `spec.podCIDRs`.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub cluster_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub strict: Option<bool>,
    /// TUN segmentation offload and coalescing (default on, where the
    /// kernel has them): an operator's way out of a kernel that mishandles them.
    #[serde(default)]
    pub tun_offload: Option<bool>,
    /// UDP GRO on the WireGuard socket (default on).
    #[serde(default)]
    pub udp_gro: Option<bool>,
    #[serde(default)]
    pub uapi_socket_dir: Option<PathBuf>,
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// The CNI plugin's hand-off socket (root only).
    #[serde(default)]
    pub cni_socket: Option<PathBuf>,
    pub cluster: RawSource,
    /// The eBPF policy datapath; absent: encryption only, no policy.
    #[serde(default)]
    pub datapath: Option<RawDatapath>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawDatapath {
    /// Where maps, programs and links are pinned in bpffs.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Node-local pod endpoints (`<namespace>_<name>.yaml`), written by the CNI plugin.
    pub endpoints_dir: PathBuf,
    /// The live event stream `meshctl observe` follows (a unix socket, 0600).
    #[serde(default)]
    pub events_socket: Option<PathBuf>,
    /// `auto` (TCX on Linux >= 6.6, TC clsact before), `tcx` or `tc`.
    #[serde(default)]
    pub attach_mode: RawAttachMode,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawAttachMode {
    #[default]
    Auto,
    Tcx,
    Tc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSource {
    /// A shared directory (see `meshguard_common::cluster::file`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// How often the directory is re-read (a duration, e.g. `100ms`).
    #[serde(default)]
    pub poll_interval: Option<String>,
    /// Deprecated: `pollInterval` in milliseconds.
    #[serde(default)]
    pub poll_interval_ms: Option<u64>,
    /// identity-ca's registry (standalone mode).
    #[serde(default)]
    pub registry: Option<RawRegistry>,
    /// The Kubernetes API server.
    #[serde(default)]
    pub kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawKubernetes {
    /// Absent: in a pod its service account, else `$KUBECONFIG` or `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub trust_domain: Option<meshguard_common::spiffe::TrustDomain>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRegistry {
    /// `host:port` of identity-ca's node API (the same key as auth-handshake's).
    #[serde(default)]
    pub ca_address: Option<String>,
    /// Deprecated name of `caAddress`.
    #[serde(default)]
    pub address: Option<String>,
    /// The node's SVID and key, kept fresh by auth-handshake (`node-svid.json`).
    pub node_credentials: PathBuf,
    /// PEM trust bundle to verify identity-ca with (until the first refresh).
    #[serde(default)]
    pub trust_bundle_file: Option<PathBuf>,
    /// Deprecated name of `trustBundleFile`.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    #[serde(default)]
    pub trust_domain: Option<meshguard_common::spiffe::TrustDomain>,
    /// How often the trust bundle is re-fetched (a duration, e.g. `10s`).
    #[serde(default)]
    pub bundle_refresh: Option<String>,
    /// Deprecated: `bundleRefresh` in milliseconds.
    #[serde(default)]
    pub bundle_refresh_ms: Option<u64>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub interface: String,
    pub mtu: u16,
    pub listen_port: u16,
    pub endpoint: SocketAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub cluster_cidrs: Vec<IpNet>,
    pub strict: bool,
    pub tun_offload: bool,
    pub udp_gro: bool,
    pub uapi_socket_dir: PathBuf,
    pub metrics_address: Option<SocketAddr>,
    pub cni_socket: PathBuf,
    pub source: SourceConfig,
    /// What is read from the node's own Node object at start (Kubernetes,
    /// when the file leaves it out); until then `endpoint` and `pod_cidrs`
    /// are not this node's.
    pub from_node: FromNode,
    pub datapath: Option<DatapathSettings>,
    /// Renamed keys the file used; logged by [`load`].
    pub deprecations: Deprecations,
}

#[derive(Debug, Clone)]
pub struct DatapathSettings {
    pub pin_dir: PathBuf,
    pub endpoints_dir: PathBuf,
    pub events_socket: PathBuf,
    pub attach: meshguard_ebpf::AttachMode,
}

/// Where the event stream is served when `eventsSocket` is not given.
pub const DEFAULT_EVENTS_SOCKET: &str = "/var/run/meshguard/events.sock";

/// bpffs root of this node's pinned datapath when `pinDir` is not given.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/meshguard";

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Dir {
        path: PathBuf,
        poll: Duration,
    },
    Registry {
        address: String,
        node_credentials: PathBuf,
        trust_bundle: PathBuf,
        trust_domain: meshguard_common::spiffe::TrustDomain,
        bundle_refresh: Duration,
    },
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        trust_domain: meshguard_common::spiffe::TrustDomain,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FromNode {
    pub endpoint: bool,
    pub pod_cidrs: bool,
}

/// How often the registry's trust bundle is re-fetched (CA rotations):
/// the same default as auth-handshake's.
pub const DEFAULT_BUNDLE_REFRESH: Duration = meshguard_ca_client::registry::DEFAULT_BUNDLE_REFRESH;

// === impl AgentConfig ===

impl AgentConfig {
    /// Fills in what the file left to the node's Node object: the endpoint
    /// (its first InternalIP, at `listenPort`) and the pod CIDRs, which must
    /// lie inside `clusterCidrs` as written ones must.
    pub fn resolve_from_node(&mut self, pod_cidrs: &[IpNet], internal_ips: &[IpAddr]) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.from_node.endpoint {
            let Some(ip) = internal_ips.first() else {
                return invalid(format!("Node {} has no InternalIP: give endpoint in the configuration", self.node_name));
            };
            self.endpoint = SocketAddr::new(*ip, self.listen_port);
        }
        if self.from_node.pod_cidrs {
            if pod_cidrs.is_empty() {
                return invalid(format!("Node {} has no spec.podCIDRs: give podCidrs in the configuration", self.node_name));
            }
            if let Some(pod) = pod_cidrs.iter().find(|p| !self.cluster_cidrs.iter().any(|c| c.contains(*p))) {
                return invalid(format!("Node {}'s pod CIDR {pod} is outside every clusterCidr", self.node_name));
            }
            self.pod_cidrs = pod_cidrs.iter().map(IpNet::trunc).collect();
        }
        self.from_node = FromNode::default();
        Ok(())
    }

    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join(KEY_FILE)
    }
}

pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let raw: RawConfig =
        meshguard_common::yaml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
    let cfg = construct_config(raw)?;
    cfg.deprecations.warn();
    Ok(cfg)
}

pub fn construct_config(raw: RawConfig) -> Result<AgentConfig, ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    let Some(node_name) = meshguard_common::config::node_name_or_env(raw.node_name) else {
        return invalid("give nodeName, or set $NODE_NAME (on Kubernetes from the downward API's spec.nodeName)".into());
    };
    if meshguard_common::spiffe::validate_segment(&node_name).is_err() {
        return invalid(format!("nodeName {node_name:?} must be a non-empty name of letters, digits, '.', '-', '_'"));
    }
    let on_kubernetes = raw.cluster.kubernetes.is_some();
    let interface = raw.interface.unwrap_or_else(|| DEFAULT_INTERFACE.to_owned());
    if let Err(e) = validate_ifname(&interface) {
        return invalid(e.to_string());
    }
    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    if !(576..=65_535 - 80).contains(&mtu) {
        return invalid(format!("mtu {mtu} must be between 576 and 65455"));
    }
    let listen_port = raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
    if listen_port == 0 {
        return invalid("listenPort must be a fixed port: other nodes are told to send to it".into());
    }
    let from_node = FromNode { endpoint: on_kubernetes && raw.endpoint.is_none(), pod_cidrs: on_kubernetes && raw.pod_cidrs.is_empty() };
    let endpoint = match &raw.endpoint {
        // Filled in from the Node object before anything uses it.
        None if from_node.endpoint => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), listen_port),
        None => return invalid("endpoint is required (IP or IP:port other nodes send to)".into()),
        Some(text) => {
            let endpoint = match text.parse::<SocketAddr>() {
                Ok(ep) => ep,
                Err(_) => match text.parse::<IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, listen_port),
                    Err(_) => return invalid(format!("endpoint {text:?} must be IP or IP:port")),
                },
            };
            if endpoint.ip().is_unspecified() || endpoint.port() == 0 {
                return invalid(format!("endpoint {endpoint} must name a reachable address and port"));
            }
            endpoint
        }
    };
    if raw.pod_cidrs.is_empty() && !from_node.pod_cidrs {
        return invalid("podCidrs must list this node's pod address ranges".into());
    }
    let strict = raw.strict.unwrap_or(DEFAULT_STRICT);
    // Required in both modes: it bounds what another node may claim as its
    // pod CIDRs (without it, a node claiming 8.8.8.0/24 would pull this
    // node's traffic to that range into its tunnel), and in strict mode it
    // is what never leaves in plaintext.
    if raw.cluster_cidrs.is_empty() {
        return invalid(
            "clusterCidrs must list all pod ranges of the cluster: other nodes' pod CIDRs are accepted only inside them (and in strict mode, traffic to them never leaves in plaintext)"
                .into(),
        );
    }
    for pod in &raw.pod_cidrs {
        if !raw.cluster_cidrs.iter().any(|c| c.contains(pod)) {
            return invalid(format!("podCidr {pod} is outside every clusterCidr"));
        }
    }
    let mut deprecations = Deprecations::default();
    let duration = |key: &str, text: Option<String>| {
        text.map(|t| parse_duration(&t).map_err(|e| ConfigError::Invalid(format!("{key} {t:?}: {e}")))).transpose()
    };
    let source = match (raw.cluster.dir, raw.cluster.registry, raw.cluster.kubernetes) {
        (None, None, Some(k)) => SourceConfig::Kubernetes {
            kubeconfig: k.kubeconfig,
            trust_domain: k.trust_domain.unwrap_or_else(|| {
                meshguard_common::spiffe::TrustDomain::new(meshguard_common::cluster::DEFAULT_TRUST_DOMAIN).expect("valid constant")
            }),
        },
        (Some(path), None, None) => {
            let poll = duration("cluster.pollInterval", raw.cluster.poll_interval)?;
            let old = raw.cluster.poll_interval_ms.map(Duration::from_millis);
            let poll = deprecations.pick("cluster.pollInterval", poll, "cluster.pollIntervalMs", old).map_err(ConfigError::Invalid)?;
            SourceConfig::Dir { path, poll: poll.unwrap_or(meshguard_common::cluster::file::DEFAULT_POLL_INTERVAL) }
        }
        (None, Some(r), None) => {
            fn required<T>(v: Option<T>, key: &str) -> Result<T, ConfigError> {
                v.ok_or_else(|| ConfigError::Invalid(format!("cluster.registry.{key} is required")))
            }
            let address = deprecations
                .pick("cluster.registry.caAddress", r.ca_address, "cluster.registry.address", r.address)
                .map_err(ConfigError::Invalid)?;
            let bundle = deprecations
                .pick("cluster.registry.trustBundleFile", r.trust_bundle_file, "cluster.registry.trustBundle", r.trust_bundle)
                .map_err(ConfigError::Invalid)?;
            let refresh = duration("cluster.registry.bundleRefresh", r.bundle_refresh)?;
            let old = r.bundle_refresh_ms.map(Duration::from_millis);
            let refresh = deprecations
                .pick("cluster.registry.bundleRefresh", refresh, "cluster.registry.bundleRefreshMs", old)
                .map_err(ConfigError::Invalid)?;
            SourceConfig::Registry {
                address: required(address, "caAddress")?,
                node_credentials: r.node_credentials,
                trust_bundle: required(bundle, "trustBundleFile")?,
                trust_domain: r.trust_domain.unwrap_or_else(|| {
                    meshguard_common::spiffe::TrustDomain::new(meshguard_common::cluster::DEFAULT_TRUST_DOMAIN).expect("valid constant")
                }),
                bundle_refresh: refresh.unwrap_or(DEFAULT_BUNDLE_REFRESH),
            }
        }
        (None, None, None) => {
            return invalid(
                "cluster: give a source, e.g. `cluster: {dir: /var/lib/meshguard/cluster}`, `cluster: {registry: {...}}` or `cluster: {kubernetes: {}}`"
                    .into(),
            );
        }
        _ => return invalid("cluster: give one source, `dir`, `registry` or `kubernetes`, not several".into()),
    };
    let datapath = raw.datapath.map(|d| DatapathSettings {
        pin_dir: d.pin_dir.unwrap_or_else(|| Path::new(DEFAULT_PIN_ROOT).join(&node_name)),
        endpoints_dir: d.endpoints_dir,
        events_socket: d.events_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_EVENTS_SOCKET)),
        attach: match d.attach_mode {
            RawAttachMode::Auto => meshguard_ebpf::AttachMode::Auto,
            RawAttachMode::Tcx => meshguard_ebpf::AttachMode::Tcx,
            RawAttachMode::Tc => meshguard_ebpf::AttachMode::Tc,
        },
    });
    Ok(AgentConfig {
        datapath,
        node_name,
        state_dir: raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        interface,
        mtu,
        listen_port,
        endpoint,
        pod_cidrs: raw.pod_cidrs.into_iter().map(|n| n.trunc()).collect(),
        cluster_cidrs: raw.cluster_cidrs.into_iter().map(|n| n.trunc()).collect(),
        strict,
        tun_offload: raw.tun_offload.unwrap_or(true),
        udp_gro: raw.udp_gro.unwrap_or(true),
        uapi_socket_dir: raw.uapi_socket_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_UAPI_DIR)),
        metrics_address: raw.metrics_address,
        cni_socket: raw.cni_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_CNI_SOCKET)),
        source,
        from_node,
        deprecations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawConfig {
        meshguard_common::yaml::from_str(yaml).unwrap()
    }

    const BASE: &str =
        "nodeName: node-1\nendpoint: 192.168.50.1\npodCidrs: [10.244.1.0/24]\nclusterCidrs: [10.244.0.0/16]\ncluster: {dir: /tmp/c}\n";

    #[test]
    fn defaults_apply() {
        let c = construct_config(raw(BASE)).unwrap();
        assert_eq!(c.endpoint, "192.168.50.1:51820".parse().unwrap());
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.interface, "mg0");
        assert!(c.strict);
        assert!(c.tun_offload && c.udp_gro, "offloads on unless turned off");
        assert_eq!(c.cni_socket, PathBuf::from("/run/meshguard/cni.sock"));
        assert_eq!(
            construct_config(raw(&format!("{BASE}cniSocket: /run/n1/cni.sock\n"))).unwrap().cni_socket,
            PathBuf::from("/run/n1/cni.sock")
        );
        assert_eq!(c.key_path(), PathBuf::from("/var/lib/meshguard/node.key"));
        let off = construct_config(raw(&format!("{BASE}tunOffload: false\nudpGro: false\n"))).unwrap();
        assert!(!off.tun_offload && !off.udp_gro);
        assert!(meshguard_common::yaml::from_str::<RawConfig>(&format!("{BASE}tunOffload: maybe\n")).is_err());
    }

    #[test]
    fn registry_keys_match_auth_handshakes_and_old_names_still_work_with_a_warning() {
        let reg = |body: &str| BASE.replace("cluster: {dir: /tmp/c}", &format!("cluster: {{registry: {{nodeCredentials: /n, {body}}}}}"));
        let c = construct_config(raw(&reg("caAddress: \"ca:8443\", trustBundleFile: /b, bundleRefresh: 1m30s"))).unwrap();
        let SourceConfig::Registry { address, trust_bundle, bundle_refresh, .. } = &c.source else { panic!("{:?}", c.source) };
        assert_eq!((address.as_str(), trust_bundle.as_path(), *bundle_refresh), ("ca:8443", Path::new("/b"), Duration::from_secs(90)));
        assert!(c.deprecations.messages().is_empty());
        let c = construct_config(raw(&reg("caAddress: \"ca:8443\", trustBundleFile: /b"))).unwrap();
        let SourceConfig::Registry { bundle_refresh, .. } = &c.source else { panic!() };
        assert_eq!(*bundle_refresh, meshguard_ca_client::registry::DEFAULT_BUNDLE_REFRESH, "the same default as auth-handshake");
        let old = construct_config(raw(&reg("address: \"ca:8443\", trustBundle: /b, bundleRefreshMs: 2500"))).unwrap();
        let SourceConfig::Registry { address, trust_bundle, bundle_refresh, .. } = &old.source else { panic!() };
        assert_eq!((address.as_str(), trust_bundle.as_path(), *bundle_refresh), ("ca:8443", Path::new("/b"), Duration::from_millis(2500)));
        assert_eq!(old.deprecations.messages().len(), 3, "{:?}", old.deprecations);
        let both = construct_config(raw(&reg("address: a, caAddress: b, trustBundleFile: /b"))).unwrap_err().to_string();
        assert!(both.contains("caAddress only"), "{both}");
        let missing = construct_config(raw(&reg("trustBundleFile: /b"))).unwrap_err().to_string();
        assert!(missing.contains("caAddress is required"), "{missing}");
        let bad = construct_config(raw(&reg("caAddress: a, trustBundleFile: /b, bundleRefresh: \"10\""))).unwrap_err().to_string();
        assert!(bad.contains("bundleRefresh") && bad.contains("10s"), "{bad}");
        let dir =
            |extra: &str| construct_config(raw(&BASE.replace("cluster: {dir: /tmp/c}", &format!("cluster: {{dir: /tmp/c, {extra}}}"))));
        let SourceConfig::Dir { poll, .. } = dir("pollInterval: 250ms").unwrap().source else { panic!() };
        assert_eq!(poll, Duration::from_millis(250));
        let c = dir("pollIntervalMs: 300").unwrap();
        assert!(matches!(c.source, SourceConfig::Dir { poll, .. } if poll == Duration::from_millis(300)));
        assert_eq!(c.deprecations.messages().len(), 1);
    }

    #[test]
    fn invalid_configs_say_what_to_fix() {
        let cases = [
            (BASE.replace("node-1", "node/1"), "nodeName"),
            (BASE.replace("192.168.50.1", "somewhere"), "endpoint"),
            (BASE.replace("clusterCidrs: [10.244.0.0/16]\n", ""), "clusterCidrs must list"),
            (format!("{}strict: false\n", BASE.replace("clusterCidrs: [10.244.0.0/16]\n", "")), "clusterCidrs must list"),
            (BASE.replace("10.244.0.0/16", "10.245.0.0/16"), "outside every clusterCidr"),
            (BASE.replace("cluster: {dir: /tmp/c}", "cluster: {}"), "give a source"),
            (
                BASE.replace(
                    "cluster: {dir: /tmp/c}",
                    "cluster: {dir: /tmp/c, registry: {address: a, nodeCredentials: c, trustBundle: b}}",
                ),
                "not several",
            ),
            (format!("{BASE}mtu: 100\n"), "mtu"),
            (format!("{BASE}listenPort: 0\n"), "listenPort"),
            (format!("{BASE}interface: much-too-long-name\n"), "interface name"),
        ];
        for (yaml, want) in cases {
            let err = construct_config(raw(&yaml)).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        assert!(meshguard_common::yaml::from_str::<RawConfig>(&format!("{BASE}bogus: 1\n")).is_err());
        let bad_mode = meshguard_common::yaml::from_str::<RawConfig>(&format!("{BASE}datapath: {{endpointsDir: /e, attachMode: xdp}}\n"));
        let err = bad_mode.unwrap_err().to_string();
        assert!(err.contains("attachMode") || err.contains("unknown variant `xdp`"), "{err}");
    }

    #[test]
    fn the_attach_mode_can_be_forced() {
        for (mode, want) in
            [("tc", meshguard_ebpf::AttachMode::Tc), ("tcx", meshguard_ebpf::AttachMode::Tcx), ("auto", meshguard_ebpf::AttachMode::Auto)]
        {
            let c = construct_config(raw(&format!("{BASE}datapath: {{endpointsDir: /e, attachMode: {mode}}}\n"))).unwrap();
            assert_eq!(c.datapath.unwrap().attach, want);
        }
        let c = construct_config(raw(&format!("{BASE}datapath: {{endpointsDir: /e}}\n"))).unwrap();
        assert_eq!(c.datapath.unwrap().attach, meshguard_ebpf::AttachMode::Auto);
    }

    /// On Kubernetes the endpoint and pod CIDRs may come from the Node
    /// object; anywhere else they are required, and what the Node says is
    /// held to the same rules as what a file says.
    #[test]
    fn kubernetes_reads_the_endpoint_and_pod_cidrs_from_the_node() {
        let k8s = "nodeName: node-1\nclusterCidrs: [10.244.0.0/16]\ncluster: {kubernetes: {kubeconfig: /k, trustDomain: example.org}}\n";
        let mut c = construct_config(raw(k8s)).unwrap();
        assert_eq!(c.from_node, FromNode { endpoint: true, pod_cidrs: true });
        let SourceConfig::Kubernetes { kubeconfig, trust_domain } = &c.source else { panic!("{:?}", c.source) };
        assert_eq!((kubeconfig.as_deref(), trust_domain.to_string().as_str()), (Some(Path::new("/k")), "example.org"));
        let (cidrs, ips) = (["10.244.3.7/24".parse().unwrap()], ["192.168.7.3".parse().unwrap()]);
        assert!(c.clone().resolve_from_node(&cidrs, &[]).unwrap_err().to_string().contains("no InternalIP"));
        assert!(c.clone().resolve_from_node(&[], &ips).unwrap_err().to_string().contains("no spec.podCIDRs"));
        let outside = c.clone().resolve_from_node(&["10.9.0.0/24".parse().unwrap()], &ips).unwrap_err().to_string();
        assert!(outside.contains("outside every clusterCidr"), "{outside}");
        c.resolve_from_node(&cidrs, &ips).unwrap();
        assert_eq!(c.endpoint, "192.168.7.3:51820".parse().unwrap());
        assert_eq!(c.pod_cidrs, vec!["10.244.3.0/24".parse::<IpNet>().unwrap()], "truncated like a written one");
        assert_eq!(c.from_node, FromNode::default());

        // What the file gives wins, and is not read from the Node.
        let c = construct_config(raw(&format!("{k8s}endpoint: 192.168.9.9\npodCidrs: [10.244.9.0/24]\n"))).unwrap();
        assert_eq!(c.from_node, FromNode::default());
        // Outside Kubernetes nothing can fill them in.
        let dir = "nodeName: node-1\nclusterCidrs: [10.244.0.0/16]\ncluster: {dir: /tmp/c}\n";
        assert!(
            construct_config(raw(&format!("{dir}podCidrs: [10.244.1.0/24]\n"))).unwrap_err().to_string().contains("endpoint is required")
        );
        assert!(construct_config(raw(&format!("{dir}endpoint: 192.168.1.1\n"))).unwrap_err().to_string().contains("podCidrs"));
        let both = BASE.replace("cluster: {dir: /tmp/c}", "cluster: {dir: /tmp/c, kubernetes: {}}");
        assert!(construct_config(raw(&both)).unwrap_err().to_string().contains("not several"));
        if std::env::var_os(meshguard_common::config::NODE_NAME_ENV).is_none() {
            let err = construct_config(raw(&BASE.replace("nodeName: node-1\n", ""))).unwrap_err().to_string();
            assert!(err.contains("$NODE_NAME"), "{err}");
        }
    }

    /// The configuration deploy/ ships in its ConfigMap is one this agent takes.
    #[test]
    fn the_kubernetes_manifests_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/config/wg-agent.yaml");
        let mut r = raw(&std::fs::read_to_string(path).unwrap());
        // From $NODE_NAME in the pod.
        r.node_name = Some("node-1".into());
        let c = construct_config(r).unwrap();
        assert!(matches!(c.source, SourceConfig::Kubernetes { .. }));
        assert_eq!(c.from_node, FromNode { endpoint: true, pod_cidrs: true });
        assert!(c.datapath.is_some(), "the DaemonSet enforces policy");
    }
}
