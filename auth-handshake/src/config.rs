//! auth-handshake's configuration: one YAML file, parsed separately from the
//! pure [`construct_config`] that fills in defaults and validates.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshguard_common::config::parse_duration;
use meshguard_common::spiffe::{TrustDomain, validate_segment};
use serde::Deserialize;

/// The Workload API socket; `SPIFFE_ENDPOINT_SOCKET=unix:///run/meshguard/workload-api.sock`.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/meshguard/workload-api.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshguard/auth-handshake";
/// Where the simulated cluster (and `ip netns`) keeps pod network namespaces.
pub const DEFAULT_POD_NETNS_PATH: &str = "/run/netns/{namespace}_{name}";
/// How often the trust bundle is re-read from the CA (shared with wg-agent).
pub const DEFAULT_BUNDLE_REFRESH: Duration = meshguard_ca_client::registry::DEFAULT_BUNDLE_REFRESH;

/// The node-to-node handshake port, the same on every node (peers are
/// dialled at their node record's endpoint address on this port).
pub const DEFAULT_HANDSHAKE_PORT: u16 = 4801;
/// bpffs root of this node's pinned datapath when `pinDir` is not given:
/// wg-agent's default (`/sys/fs/bpf/meshguard/<nodeName>`).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/meshguard";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file is not valid YAML for auth-handshake: {source}")]
    Yaml {
        #[source]
        source: meshguard_common::yaml::YamlError,
    },
    #[error("config key {key} = {value:?} is invalid: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub trust_domain: String,
    /// Absent or empty: `$NODE_NAME` (the downward API on Kubernetes).
    #[serde(default)]
    pub node_name: String,
    /// `host:port` of identity-ca.
    pub ca_address: String,
    /// PEM file with the CA certificates to trust when first contacting the
    /// CA (`identity-ca bundle show`). Never trust-on-first-use.
    pub trust_bundle_file: PathBuf,
    /// The join token, or a file holding it (preferred: keeps it out of the config).
    pub join_token: Option<String>,
    pub join_token_file: Option<PathBuf>,
    /// Kubernetes: the agent's projected service-account token (audience
    /// identity-ca's `kubernetes.audience`), re-read at every attestation
    /// because the kubelet rotates it. Instead of a join token.
    pub service_account_token_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub workload_api_socket: Option<PathBuf>,
    /// Path of each pod's network namespace, with `{namespace}`, `{name}` and `{node}`.
    pub pod_netns_path: Option<String>,
    /// e.g. `10s`.
    pub bundle_refresh: Option<String>,
    /// The handshake port (TCP), on every node; `0` turns handshakes off.
    pub handshake_port: Option<u16>,
    /// The node's pinned datapath (auth map, auth-required signal ring).
    pub pin_dir: Option<PathBuf>,
    /// `host:port` for `/metrics`; none by default.
    pub metrics_address: Option<String>,
    /// Prove ahead the pairs `authentication: required` policies admit
    /// between placed workloads (default true). Off, every pair is proved
    /// on its first packet, which the datapath holds meanwhile: fewer
    /// handshakes in a large cluster, a few milliseconds on first contact.
    pub prove_ahead: Option<bool>,
}

/// The mutual-authentication handshakes (`handshakePort` not 0).
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    pub port: u16,
    /// Where the port listens: every address of the node.
    pub listen: SocketAddr,
    pub pin_dir: PathBuf,
    pub prove_ahead: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub node_name: String,
    pub ca_address: String,
    pub trust_bundle_file: PathBuf,
    pub join_token: Option<String>,
    pub service_account_token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub workload_api_socket: PathBuf,
    pub pod_netns_path: String,
    pub bundle_refresh: Duration,
    /// `/metrics`, `/healthz`, `/readyz`; off when absent.
    pub metrics_address: Option<SocketAddr>,
    /// `None`: the agent only keeps SVIDs and serves the Workload API.
    pub handshake: Option<HandshakeConfig>,
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, true)
}

/// The configuration without reading the join token file: what
/// `auth-handshake healthcheck` needs, after the token file is gone.
pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, false)
}

fn load_with(path: &Path, secrets: bool) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let mut file: ConfigFile = meshguard_common::yaml::from_str(&text).map_err(|source| ConfigError::Yaml { source })?;
    if file.join_token.is_some() && file.join_token_file.is_some() {
        return Err(ConfigError::Invalid {
            key: "joinTokenFile",
            value: String::new(),
            reason: "give joinToken or joinTokenFile, not both".into(),
        });
    }
    if file.service_account_token_file.is_some() && (file.join_token.is_some() || file.join_token_file.is_some()) {
        return Err(ConfigError::Invalid {
            key: "serviceAccountTokenFile",
            value: String::new(),
            reason: "a node attests with a join token or a service-account token, not both".into(),
        });
    }
    if let Some(p) = file.join_token_file.take().filter(|_| secrets) {
        let t = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
        file.join_token = Some(t.trim().to_owned());
    }
    construct_config(file)
}

pub fn construct_config(f: ConfigFile) -> Result<Config, ConfigError> {
    let invalid = |key, value: &str, reason: String| ConfigError::Invalid { key, value: value.to_owned(), reason };
    let trust_domain = TrustDomain::new(&f.trust_domain).map_err(|e| invalid("trustDomain", &f.trust_domain, e.to_string()))?;
    let node_name = meshguard_common::config::node_name_or_env(Some(f.node_name.clone()).filter(|n| !n.is_empty()))
        .ok_or_else(|| invalid("nodeName", "", "give nodeName, or set $NODE_NAME (on Kubernetes from spec.nodeName)".into()))?;
    validate_segment(&node_name).map_err(|e| invalid("nodeName", &node_name, e.to_string()))?;
    if !f.ca_address.contains(':') {
        return Err(invalid("caAddress", &f.ca_address, "expected host:port".into()));
    }
    let pod_netns_path = f.pod_netns_path.unwrap_or_else(|| DEFAULT_POD_NETNS_PATH.into());
    check_netns_template(&pod_netns_path).map_err(|reason| invalid("podNetnsPath", &pod_netns_path, reason))?;
    let bundle_refresh = match &f.bundle_refresh {
        None => DEFAULT_BUNDLE_REFRESH,
        Some(s) => parse_duration(s).map_err(|reason| invalid("bundleRefresh", s, reason))?,
    };
    let metrics_address = match &f.metrics_address {
        None => None,
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| invalid("metricsAddress", a, format!("expected host:port ({e})")))?),
    };
    let port = f.handshake_port.unwrap_or(DEFAULT_HANDSHAKE_PORT);
    let handshake = (port != 0).then(|| HandshakeConfig {
        port,
        listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        pin_dir: f.pin_dir.clone().unwrap_or_else(|| Path::new(DEFAULT_PIN_ROOT).join(&node_name)),
        prove_ahead: f.prove_ahead.unwrap_or(true),
    });
    Ok(Config {
        trust_domain,
        node_name,
        ca_address: f.ca_address,
        trust_bundle_file: f.trust_bundle_file,
        join_token: f.join_token.filter(|t| !t.is_empty()),
        service_account_token_file: f.service_account_token_file,
        state_dir: f.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        workload_api_socket: f.workload_api_socket.unwrap_or_else(|| DEFAULT_WORKLOAD_API_SOCKET.into()),
        pod_netns_path,
        bundle_refresh,
        metrics_address,
        handshake,
    })
}

/// A pod's namespace file must name exactly one pod: `{namespace}` and
/// `{name}` both appear, separated by a character that Kubernetes allows in
/// neither (names are lowercase letters, digits, `-` and `.`), or
/// `{ns}-{name}` would give `a-b`/`c` and `a`/`b-c` the same file.
fn check_netns_template(t: &str) -> Result<(), String> {
    let (Some(ns), Some(name)) = (t.find("{namespace}"), t.find("{name}")) else {
        return Err("must contain {namespace} and {name}".into());
    };
    let between = if ns < name { &t[ns + "{namespace}".len()..name] } else { &t[name + "{name}".len()..ns] };
    if !between.chars().any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')) {
        return Err(format!(
            "{{namespace}} and {{name}} are separated by {between:?}, which names can contain: two pods could share a file; use e.g. `_` or `/`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_kind_of_node_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let base = "trustDomain: cluster.local\nnodeName: node-1\ncaAddress: ca:8443\ntrustBundleFile: /b.pem\n";
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, format!("{base}serviceAccountTokenFile: /var/run/secrets/meshguard/token\n")).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.service_account_token_file.as_deref(), Some(Path::new("/var/run/secrets/meshguard/token")));
        assert_eq!(c.join_token, None);
        std::fs::write(&path, format!("{base}serviceAccountTokenFile: /t\njoinToken: abc\n")).unwrap();
        assert!(matches!(load(&path), Err(ConfigError::Invalid { key: "serviceAccountTokenFile", .. })));
    }

    fn base() -> ConfigFile {
        ConfigFile {
            trust_domain: "cluster.local".into(),
            node_name: "node-1".into(),
            ca_address: "127.0.0.1:8443".into(),
            trust_bundle_file: "/b.pem".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_validation() {
        let c = construct_config(base()).unwrap();
        assert_eq!(c.bundle_refresh, DEFAULT_BUNDLE_REFRESH);
        assert_eq!(c.pod_netns_path, DEFAULT_POD_NETNS_PATH);
        assert!(construct_config(ConfigFile { node_name: "a/b".into(), ..base() }).is_err());
        assert!(construct_config(ConfigFile { ca_address: "nohost".into(), ..base() }).is_err());
        assert!(construct_config(ConfigFile { pod_netns_path: Some("/run/netns/x".into()), ..base() }).is_err());
        // Ambiguous: `a-b`/`c` and `a`/`b-c` would share /run/netns/a-b-c.
        for bad in ["/run/netns/{namespace}-{name}", "/run/netns/{namespace}.{name}", "/run/netns/{name}{namespace}", "/run/netns/{name}"] {
            let e = construct_config(ConfigFile { pod_netns_path: Some(bad.into()), ..base() }).unwrap_err();
            assert!(e.to_string().contains("podNetnsPath"), "{bad}: {e}");
        }
        for good in ["/run/netns/{namespace}_{name}", "/var/run/pods/{namespace}/{name}/net", "/run/netns/{node}-{name}:{namespace}"] {
            assert!(construct_config(ConfigFile { pod_netns_path: Some(good.into()), ..base() }).is_ok(), "{good}");
        }
        assert_eq!(
            construct_config(ConfigFile { bundle_refresh: Some("500ms".into()), ..base() }).unwrap().bundle_refresh,
            Duration::from_millis(500)
        );
        let h = c.handshake.expect("handshakes are on by default");
        assert_eq!((h.port, h.pin_dir.as_path()), (DEFAULT_HANDSHAKE_PORT, Path::new("/sys/fs/bpf/meshguard/node-1")));
        assert!(construct_config(ConfigFile { handshake_port: Some(0), ..base() }).unwrap().handshake.is_none());
        assert!(construct_config(ConfigFile { metrics_address: Some("nope".into()), ..base() }).is_err());
        assert!(h.prove_ahead, "proving ahead is the default");
        let off = construct_config(ConfigFile { prove_ahead: Some(false), ..base() }).unwrap();
        assert!(!off.handshake.unwrap().prove_ahead);
    }

    /// The configuration deploy/ ships in its ConfigMap is one this agent
    /// takes (nodeName from $NODE_NAME in the pod).
    #[test]
    fn the_kubernetes_manifests_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/config/auth-handshake.yaml");
        let mut file: ConfigFile = meshguard_common::yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(file.node_name, "", "one ConfigMap for every node");
        file.node_name = "node-1".into();
        let c = construct_config(file).unwrap();
        assert!(c.service_account_token_file.is_some() && c.join_token.is_none(), "Kubernetes nodes attest with their pod's token");
        assert!(c.handshake.is_some());
    }
}
