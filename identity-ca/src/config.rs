//! identity-ca's configuration: one YAML file, parsed separately from the
//! pure [`construct_config`] that fills in defaults and validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshguard_common::config::{Deprecations, parse_duration};
use meshguard_common::spiffe::TrustDomain;
use serde::Deserialize;

/// Where nodes reach the CA. 8443 is free on every platform we run on and
/// says "TLS" to whoever reads a port list.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8443";
/// Root-only directory next to the other meshguard runtime sockets.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/meshguard/identity-ca/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshguard/identity-ca";
/// The X509-SVID lifetime: one hour, as SPIRE's default, renewed at half-life.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Node SVIDs live as long; a node away for longer needs a new join token.
pub const DEFAULT_NODE_SVID_TTL: Duration = Duration::from_secs(3600);
/// A CA certificate lives a year; rotate well before that.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// JWT-SVIDs are bearer tokens: short by default.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// A join token not used within an hour is probably lost.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Clock skew tolerated between the CA and the verifiers: certificates are
/// back-dated by this much.
pub const BACKDATE: Duration = Duration::from_secs(30);

pub const DB_FILE: &str = "identity-ca.redb";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file is not valid YAML for identity-ca: {source}")]
    Yaml {
        #[source]
        source: meshguard_common::yaml::YamlError,
    },
    #[error("config key {key} = {value:?} is invalid: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
}

/// The file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub trust_domain: String,
    pub listen_addr: Option<String>,
    pub admin_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub svid_ttl: Option<String>,
    pub node_svid_ttl: Option<String>,
    pub ca_ttl: Option<String>,
    pub jwt_svid_ttl: Option<String>,
    pub join_token_ttl: Option<String>,
    /// Plain-HTTP `/metrics`, `/healthz` and `/readyz`; off when absent.
    pub metrics_address: Option<String>,
    /// Deprecated name of `metricsAddress`.
    pub metrics_addr: Option<String>,
    /// Kubernetes node attestation (TokenReview); off when absent.
    pub kubernetes: Option<KubernetesFile>,
}

/// `kubernetes:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesFile {
    pub audience: Option<String>,
    pub agent_namespace: Option<String>,
    pub agent_service_account: Option<String>,
    /// Outside a cluster: the kubeconfig to reach the API server with.
    pub kubeconfig: Option<PathBuf>,
}

/// Nodes attest with their agent's projected service-account token, which
/// the CA checks with the API server's TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesAttestation {
    /// The audience the agents' projected tokens are minted for.
    pub audience: String,
    pub agent_namespace: String,
    pub agent_service_account: String,
    /// `None`: the pod's service account in a cluster, else `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
}

pub const DEFAULT_AGENT_NAMESPACE: &str = "meshguard";
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "meshguard-agent";

/// The configuration the CA runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub listen_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub svid_ttl: Duration,
    pub node_svid_ttl: Duration,
    pub ca_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    pub join_token_ttl: Duration,
    pub metrics_address: Option<SocketAddr>,
    pub kubernetes: Option<KubernetesAttestation>,
    /// Renamed keys the file used; logged by [`load`].
    pub deprecations: Deprecations,
}

impl Config {
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join(DB_FILE)
    }

    /// A configuration for tests: loopback on an ephemeral port, state in `dir`.
    pub fn for_test(trust_domain: &str, dir: &Path) -> Self {
        Self {
            trust_domain: TrustDomain::new(trust_domain).expect("test trust domain"),
            listen_addr: "127.0.0.1:0".parse().expect("loopback"),
            admin_socket: dir.join("admin.sock"),
            state_dir: dir.join("state"),
            svid_ttl: DEFAULT_SVID_TTL,
            node_svid_ttl: DEFAULT_NODE_SVID_TTL,
            ca_ttl: DEFAULT_CA_TTL,
            jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            join_token_ttl: DEFAULT_JOIN_TOKEN_TTL,
            metrics_address: None,
            kubernetes: None,
            deprecations: Deprecations::default(),
        }
    }
}

/// Reads and constructs the configuration from `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let file: ConfigFile = meshguard_common::yaml::from_str(&text).map_err(|source| ConfigError::Yaml { source })?;
    let cfg = construct_config(file)?;
    cfg.deprecations.warn();
    Ok(cfg)
}

/// Fills in defaults and validates; touches nothing outside its argument.
pub fn construct_config(f: ConfigFile) -> Result<Config, ConfigError> {
    let trust_domain = TrustDomain::new(&f.trust_domain).map_err(|e| ConfigError::Invalid {
        key: "trustDomain",
        value: f.trust_domain.clone(),
        reason: e.to_string(),
    })?;
    let addr = |key: &'static str, v: &str| {
        v.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid { key, value: v.to_owned(), reason: e.to_string() })
    };
    let dur = |key: &'static str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|reason| ConfigError::Invalid { key, value: s.clone(), reason }),
    };
    let mut deprecations = Deprecations::default();
    let old = f.metrics_addr.clone().unwrap_or_default();
    let metrics_address = deprecations
        .pick("metricsAddress", f.metrics_address, "metricsAddr", f.metrics_addr)
        .map_err(|reason| ConfigError::Invalid { key: "metricsAddr", value: old, reason })?;
    let cfg = Config {
        trust_domain,
        listen_addr: addr("listenAddr", f.listen_addr.as_deref().unwrap_or(DEFAULT_LISTEN_ADDR))?,
        admin_socket: f.admin_socket.unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
        state_dir: f.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        svid_ttl: dur("svidTtl", &f.svid_ttl, DEFAULT_SVID_TTL)?,
        node_svid_ttl: dur("nodeSvidTtl", &f.node_svid_ttl, DEFAULT_NODE_SVID_TTL)?,
        ca_ttl: dur("caTtl", &f.ca_ttl, DEFAULT_CA_TTL)?,
        jwt_svid_ttl: dur("jwtSvidTtl", &f.jwt_svid_ttl, DEFAULT_JWT_SVID_TTL)?,
        join_token_ttl: dur("joinTokenTtl", &f.join_token_ttl, DEFAULT_JOIN_TOKEN_TTL)?,
        metrics_address: metrics_address.as_deref().map(|v| addr("metricsAddress", v)).transpose()?,
        kubernetes: f.kubernetes.map(kubernetes).transpose()?,
        deprecations,
    };
    for (key, ttl) in [("svidTtl", cfg.svid_ttl), ("nodeSvidTtl", cfg.node_svid_ttl)] {
        if ttl < Duration::from_secs(10) || ttl * 2 > cfg.ca_ttl {
            return Err(ConfigError::Invalid {
                key,
                value: format!("{}s", ttl.as_secs()),
                reason: "must be at least 10s and at most half of caTtl".into(),
            });
        }
    }
    Ok(cfg)
}

fn kubernetes(k: KubernetesFile) -> Result<KubernetesAttestation, ConfigError> {
    let name = |key: &'static str, v: Option<String>, default: &str| {
        let v = v.unwrap_or_else(|| default.to_owned());
        meshguard_common::spiffe::validate_segment(&v).map(|()| v.clone()).map_err(|e| ConfigError::Invalid {
            key,
            value: v,
            reason: e.to_string(),
        })
    };
    let audience = k.audience.unwrap_or_else(|| crate::attest::k8s::DEFAULT_AUDIENCE.to_owned());
    if audience.is_empty() {
        return Err(ConfigError::Invalid { key: "kubernetes.audience", value: audience, reason: "must not be empty".into() });
    }
    Ok(KubernetesAttestation {
        audience,
        agent_namespace: name("kubernetes.agentNamespace", k.agent_namespace, DEFAULT_AGENT_NAMESPACE)?,
        agent_service_account: name("kubernetes.agentServiceAccount", k.agent_service_account, DEFAULT_AGENT_SERVICE_ACCOUNT)?,
        kubeconfig: k.kubeconfig,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_attestation_defaults_and_bad_names() {
        let text = "trustDomain: cluster.local\nkubernetes: {}\n";
        let f: ConfigFile = meshguard_common::yaml::from_str(text).unwrap();
        let k = construct_config(f).unwrap().kubernetes.unwrap();
        assert_eq!(k.audience, crate::attest::k8s::DEFAULT_AUDIENCE);
        assert_eq!(
            (k.agent_namespace.as_str(), k.agent_service_account.as_str()),
            (DEFAULT_AGENT_NAMESPACE, DEFAULT_AGENT_SERVICE_ACCOUNT)
        );
        let f: ConfigFile = meshguard_common::yaml::from_str("trustDomain: cluster.local\nkubernetes: {agentNamespace: a/b}\n").unwrap();
        assert!(matches!(construct_config(f), Err(ConfigError::Invalid { key: "kubernetes.agentNamespace", .. })));
        assert!(meshguard_common::yaml::from_str::<ConfigFile>("trustDomain: td\nkubernetes: {audiences: x}\n").is_err());
        let plain = construct_config(ConfigFile { trust_domain: "cluster.local".into(), ..Default::default() }).unwrap();
        assert_eq!(plain.kubernetes, None);
    }

    #[test]
    fn defaults_and_validation() {
        let cfg = construct_config(ConfigFile { trust_domain: "cluster.local".into(), ..Default::default() }).unwrap();
        assert_eq!(cfg.svid_ttl, DEFAULT_SVID_TTL);
        assert_eq!(cfg.listen_addr, DEFAULT_LISTEN_ADDR.parse().unwrap());
        let bad = construct_config(ConfigFile { trust_domain: "Bad".into(), ..Default::default() });
        assert!(matches!(bad, Err(ConfigError::Invalid { key: "trustDomain", .. })));
        let bad = construct_config(ConfigFile { trust_domain: "td".into(), svid_ttl: Some("1s".into()), ..Default::default() });
        assert!(matches!(bad, Err(ConfigError::Invalid { key: "svidTtl", .. })));
        let yaml = "trustDomain: td\nbogus: 1\n";
        assert!(meshguard_common::yaml::from_str::<ConfigFile>(yaml).is_err());
    }

    #[test]
    fn durations_are_human_and_the_old_metrics_key_still_works() {
        let f = |yaml: &str| construct_config(meshguard_common::yaml::from_str::<ConfigFile>(yaml).unwrap());
        let cfg = f("trustDomain: td\nsvidTtl: 1h30m\njwtSvidTtl: 5m\nmetricsAddress: 127.0.0.1:9090\n").unwrap();
        assert_eq!((cfg.svid_ttl, cfg.jwt_svid_ttl), (Duration::from_secs(5400), Duration::from_secs(300)));
        assert!(cfg.deprecations.messages().is_empty());
        assert!(matches!(f("trustDomain: td\nsvidTtl: \"3600\"\n"), Err(ConfigError::Invalid { key: "svidTtl", .. })));
        let old = f("trustDomain: td\nmetricsAddr: 127.0.0.1:9090\n").unwrap();
        assert_eq!(old.metrics_address, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(old.deprecations.messages().len(), 1);
        assert!(f("trustDomain: td\nmetricsAddr: 127.0.0.1:1\nmetricsAddress: 127.0.0.1:2\n").is_err());
    }
}
