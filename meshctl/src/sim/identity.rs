//! Workload identity on the simulated cluster: identity-ca, one
//! auth-handshake per node, the cluster's pods registered as workloads, and
//! a standard SPIFFE client (`mg-spiffe`) to run inside any namespace.
//!
//! ```text
//!   underlay netns: br0 192.168.100.254/24 ── identity-ca (node API :8443, mTLS)
//!     ├── node-1 netns: auth-handshake ──► <run>/node-1/workload-api.sock
//!     │     └── pod netns: mg-spiffe, SPIFFE_ENDPOINT_SOCKET=unix://<that socket>
//!     └── node-2 ...
//!   host: identity-ca admin CLI ──► <run>/identity/ca/admin.sock (root only)
//! ```
//!
//! identity-ca runs in the underlay namespace, on an extra address of the
//! bridge, so it is no node's process: every agent reaches it over its
//! node's underlay link, as it would reach a CA on another machine. The
//! agents name their pods' namespace files with the cluster's own naming
//! (`podNetnsPath: /run/netns/<run id>-{namespace}_{name}`), so the Workload
//! API resolves a caller by the network namespace it really runs in.
//!
//! Every process is started with [`Cluster::spawn_in`] and every file lives
//! under the run directory: dropping the [`Cluster`] — also on panic — kills
//! and removes them all.
//!
//! ```no_run
//! use std::time::Duration;
//! use meshguard_meshctl::sim::cluster::cluster;
//! let c = cluster().nodes(2).pod("shop/web").on("node-1").build().unwrap();
//! let id = c.identity().svid_ttl(Duration::from_secs(10)).start().unwrap();
//! let svid = id.fetch("shop/web").unwrap().svid().unwrap();
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

use crate::sim::bins::bin_path;
use crate::sim::cluster::{Cluster, ClusterError, Result, UNDERLAY_BRIDGE, log_tail, wait_until};
use crate::sim::cmd::{self, ip_in};

/// identity-ca's address on the underlay bridge (nodes are .1 to .200).
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
pub const CA_PORT: u16 = 8443;
/// Where each node's agent serves the Workload API, inside the node's directory.
pub const WORKLOAD_API_SOCKET: &str = "workload-api.sock";
/// The standard variable SPIFFE clients read the endpoint from.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The CA's default, one hour; tests of rotation set it to seconds.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Short, so a change of the bundle reaches the agents quickly.
pub const DEFAULT_BUNDLE_REFRESH: Duration = Duration::from_secs(2);
/// auth-handshake's node-to-node handshake port (its default), on every node.
pub const AUTH_HANDSHAKE_PORT: u16 = 4801;
/// auth-handshake's `/metrics`, on each node's loopback (wg-agent's is 9401).
pub const AUTH_METRICS_PORT: u16 = 9402;
/// Starting the CA and the agents, and the first SVIDs, take about a second;
/// this leaves room for a loaded CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One result of `mg-spiffe`, one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Svid(SvidReport),
    Jwt(JwtReport),
    /// `validate`: the Workload API accepted the token, issued to `spiffe_id`.
    Valid {
        spiffe_id: String,
    },
    /// `validate`: the Workload API rejected the token (InvalidArgument).
    Invalid {
        message: String,
    },
    /// The Workload API refused (gRPC PermissionDenied): `reason` is
    /// `no_identity_issued` or `permission_denied`.
    Refused {
        reason: String,
        message: String,
    },
}

/// A JWT-SVID as a standard client received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtReport {
    pub spiffe_id: String,
    pub audience: Vec<String>,
    /// Unix seconds.
    pub expiry: i64,
    pub token: String,
}

/// An X.509-SVID as a standard client received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SvidReport {
    pub spiffe_id: String,
    /// Lowercase hex of the leaf's serial (as `identity-ca svid list` prints it).
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Base64 DER, leaf first.
    pub chain: Vec<String>,
    /// Base64 DER: the X.509 authorities served for the SVID's trust domain.
    pub bundle: Vec<String>,
    /// The private key served with the SVID is the leaf's.
    pub key_matches_leaf: bool,
    /// When the client had it (unix milliseconds).
    pub received_at_ms: u64,
}

/// Options of [`Identity`]; start it with [`IdentityBuilder::start`].
pub struct IdentityBuilder<'c> {
    cluster: &'c Cluster,
    svid_ttl: Duration,
    node_svid_ttl: Duration,
    bundle_refresh: Duration,
    prove_ahead: bool,
}

/// identity-ca and the node agents of one cluster.
pub struct Identity<'c> {
    cluster: &'c Cluster,
    pub dir: PathBuf,
    pub ca_addr: SocketAddr,
    pub admin_socket: PathBuf,
    /// PEM, as `identity-ca bundle show` printed it when the CA started.
    pub bundle_file: PathBuf,
    pub svid_ttl: Duration,
    ca_pid: u32,
    agents: Vec<(String, u32)>,
}

/// What a persistent cluster saves of its identity stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedIdentity {
    pub dir: PathBuf,
    pub ca_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub bundle_file: PathBuf,
    pub svid_ttl: Duration,
    pub ca_pid: u32,
    /// (node, auth-handshake pid)
    pub agents: Vec<(String, u32)>,
}

/// One SVID on the CA's record (`identity-ca svid list --json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedSvid {
    pub serial: String,
    pub spiffe_id: String,
    pub node: String,
}

// === impl Cluster ===

impl Cluster {
    /// identity for this cluster: `c.identity().svid_ttl(..).start()`.
    pub fn identity(&self) -> IdentityBuilder<'_> {
        IdentityBuilder {
            cluster: self,
            svid_ttl: DEFAULT_SVID_TTL,
            node_svid_ttl: DEFAULT_SVID_TTL,
            bundle_refresh: DEFAULT_BUNDLE_REFRESH,
            prove_ahead: true,
        }
    }

    /// The identity stack of a cluster opened from its saved state.
    pub fn identity_from(&self, saved: SavedIdentity) -> Identity<'_> {
        Identity {
            cluster: self,
            dir: saved.dir,
            ca_addr: saved.ca_addr,
            admin_socket: saved.admin_socket,
            bundle_file: saved.bundle_file,
            svid_ttl: saved.svid_ttl,
            ca_pid: saved.ca_pid,
            agents: saved.agents,
        }
    }

    /// The Workload API socket of `node`'s agent.
    pub fn workload_api_socket(&self, node: &str) -> PathBuf {
        self.node(node).dir.join(WORKLOAD_API_SOCKET)
    }

    /// `podNetnsPath` for the agents: the cluster's pod namespace naming.
    pub fn pod_netns_template(&self) -> String {
        format!("/run/netns/{}-{{namespace}}_{{name}}", self.run_id)
    }
}

// === impl IdentityBuilder ===

impl<'c> IdentityBuilder<'c> {
    /// Workload X.509-SVID lifetime (the CA's minimum is 10 s); agents renew at half-life.
    pub fn svid_ttl(mut self, ttl: Duration) -> Self {
        self.svid_ttl = ttl;
        self
    }

    pub fn node_svid_ttl(mut self, ttl: Duration) -> Self {
        self.node_svid_ttl = ttl;
        self
    }

    pub fn bundle_refresh(mut self, every: Duration) -> Self {
        self.bundle_refresh = every;
        self
    }

    /// auth-handshake's `proveAhead` (default on): off, every pair is
    /// proved on its first packet, which the datapath holds meanwhile.
    pub fn prove_ahead(mut self, on: bool) -> Self {
        self.prove_ahead = on;
        self
    }

    /// Starts identity-ca, registers every pod, attests every node with a
    /// fresh join token, starts its agent, and waits until every pod's SVID
    /// has been issued to the pod's node.
    pub fn start(self) -> Result<Identity<'c>> {
        let c = self.cluster;
        let dir = c.dir.join("identity");
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&ca_dir)?;
        ip_in(&c.underlay_ns, &["addr", "add", &format!("{CA_IP}/24"), "dev", UNDERLAY_BRIDGE])?;
        let ca_addr = SocketAddr::new(CA_IP.into(), CA_PORT);
        let admin_socket = ca_dir.join("admin.sock");
        let config = ca_dir.join("identity-ca.yaml");
        std::fs::write(
            &config,
            format!(
                "trustDomain: {td}\nlistenAddr: {ca_addr}\nadminSocket: {admin}\nstateDir: {state}\n\
                 svidTtl: {svid}s\nnodeSvidTtl: {node}s\njoinTokenTtl: 10m\n",
                td = c.trust_domain,
                admin = admin_socket.display(),
                state = ca_dir.join("state").display(),
                svid = self.svid_ttl.as_secs(),
                node = self.node_svid_ttl.as_secs(),
            ),
        )?;
        let ca_pid =
            c.spawn_in(&c.underlay_ns, &bin_path("identity-ca"), &["run", "--config", path_str(&config)], &log_env(), "identity/ca.log")?;
        let mut id = Identity {
            cluster: c,
            bundle_file: dir.join("bundle.pem"),
            dir,
            ca_addr,
            admin_socket,
            svid_ttl: self.svid_ttl,
            ca_pid,
            agents: Vec::new(),
        };
        wait_until("identity-ca to answer on its admin socket", START_TIMEOUT, || {
            c.is_running(ca_pid) && id.admin(&["ca", "list"]).is_ok()
        })
        .map_err(|e| id.with_logs(e))?;
        std::fs::write(&id.bundle_file, id.admin(&["bundle", "show", "--format", "pem"])?)?;

        for p in &c.pods {
            let ip = p.ip.to_string();
            let mut args = vec![
                "workload",
                "put",
                "--name",
                &p.name,
                "--namespace",
                &p.namespace,
                "--service-account",
                &p.service_account,
                "--node",
                &p.node,
                "--ip",
                &ip,
            ];
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for l in &labels {
                args.extend(["--label", l.as_str()]);
            }
            id.admin(&args)?;
        }
        for n in &c.nodes {
            let pid = id.start_agent(&n.name, self.bundle_refresh, self.prove_ahead)?;
            id.agents.push((n.name.clone(), pid));
        }
        id.wait_ready()?;
        Ok(id)
    }
}

// === impl Identity ===

impl Identity<'_> {
    /// Runs the identity-ca admin CLI against this CA; `Ok(stdout)` on success.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--admin-socket", path_str(&self.admin_socket)];
        all.extend_from_slice(args);
        Ok(cmd::run(path_str(&bin_path("identity-ca")), &all)?)
    }

    /// The SVIDs on the CA's record that are still valid.
    pub fn issued(&self) -> Result<Vec<IssuedSvid>> {
        let out = self.admin(&["--json", "svid", "list"])?;
        serde_json::from_str(&out).map_err(|e| ClusterError::Invalid(format!("svid list: {e}: {out}")))
    }

    /// The CA's current X.509 authorities (DER), read with the admin CLI.
    pub fn ca_bundle(&self) -> Result<Vec<Vec<u8>>> {
        parse_pem_certs(&self.admin(&["bundle", "show", "--format", "pem"])?)
    }

    /// The expected SPIFFE ID of a pod.
    pub fn spiffe_id_of(&self, pod: &str) -> String {
        let p = self.cluster.pod(pod);
        format!("spiffe://{}/ns/{}/sa/{}", self.cluster.trust_domain, p.namespace, p.service_account)
    }

    fn start_agent(&self, node: &str, bundle_refresh: Duration, prove_ahead: bool) -> Result<u32> {
        let c = self.cluster;
        let n = c.node(node);
        let dir = self.dir.join(node);
        std::fs::create_dir_all(&dir)?;
        let token = self.admin(&["token", "create", "--node", node, "--ttl", "10m"])?;
        let token_file = dir.join("join-token");
        write_private(&token_file, token.trim())?;
        let config = dir.join("auth-handshake.yaml");
        std::fs::write(
            &config,
            format!(
                "trustDomain: {td}\nnodeName: {node}\ncaAddress: {ca}\ntrustBundleFile: {bundle}\njoinTokenFile: {token}\n\
                 stateDir: {state}\nworkloadApiSocket: {socket}\npodNetnsPath: {netns}\nbundleRefresh: {refresh}ms\n\
                 handshakePort: {AUTH_HANDSHAKE_PORT}\npinDir: {pin}\nmetricsAddress: 127.0.0.1:{AUTH_METRICS_PORT}\nproveAhead: {prove_ahead}\n",
                td = c.trust_domain,
                ca = self.ca_addr,
                bundle = self.bundle_file.display(),
                token = token_file.display(),
                state = dir.join("state").display(),
                socket = c.workload_api_socket(node).display(),
                netns = c.pod_netns_template(),
                refresh = bundle_refresh.as_millis(),
                // The datapath wg-agent loads for this node: its auth map and signal ring.
                pin = c.pin_dir(node).display(),
            ),
        )?;
        let log = format!("identity/{node}.log");
        c.spawn_in_node(&n.netns, &bin_path("auth-handshake"), &["run", "--config", path_str(&config)], &log_env(), &log)
    }

    /// Applies MeshPolicy YAML (one document or several) on the registry.
    pub fn apply_policy(&self, yaml: &str) -> Result<()> {
        let file = self.dir.join("policy.yaml");
        std::fs::write(&file, yaml)?;
        self.admin(&["policy", "apply", "-f", path_str(&file)])?;
        Ok(())
    }

    /// The numbers the registry gave `namespace/sa`'s identity and `node`
    /// (the datapath's identity and node ids).
    pub fn numbers(&self, namespace: &str, sa: &str, node: &str) -> Result<(u32, u32)> {
        let want = format!("spiffe://{}/ns/{namespace}/sa/{sa}", self.cluster.trust_domain);
        let list = |what: &str| -> Result<Vec<serde_json::Value>> {
            let out = self.admin(&["--json", what, "list"])?;
            serde_json::from_str(&out).map_err(|e| ClusterError::Invalid(format!("{what} list: {e}: {out}")))
        };
        let number = list("identity")?
            .iter()
            .find(|i| i["spiffeId"].as_str() == Some(want.as_str()))
            .and_then(|i| i["number"].as_u64())
            .ok_or_else(|| ClusterError::Invalid(format!("no identity number for {want}")))?;
        let node_id = list("node")?
            .iter()
            .find(|n| n["name"].as_str() == Some(node))
            .and_then(|n| n["nodeId"].as_u64())
            .ok_or_else(|| ClusterError::Invalid(format!("no node id for {node}")))?;
        Ok((number as u32, node_id as u32))
    }

    /// auth-handshake's Prometheus text on `node`.
    pub fn auth_metrics(&self, node: &str) -> Result<String> {
        let c = self.cluster;
        let out =
            c.exec_node(node, path_str(&bin_path("mg-probe")), &["http-get", &format!("127.0.0.1:{AUTH_METRICS_PORT}"), "/metrics"])?;
        if !out.status.success() {
            return Err(ClusterError::Invalid(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The sum of auth-handshake's series on `node` that start with `prefix`
    /// (e.g. `meshguard_auth_handshakes_total{result="ok"`); 0 when none.
    pub fn auth_metric(&self, node: &str, prefix: &str) -> Result<f64> {
        let text = self.auth_metrics(node)?;
        Ok(text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
    }

    /// The node credential file auth-handshake keeps on `node`.
    pub fn node_credentials(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("state").join("node-svid.json")
    }

    /// Points the cluster's node agents (`wg-agent`) at this CA's registry,
    /// authenticated with the node credential auth-handshake keeps fresh.
    pub fn use_registry_for_agents(&self) {
        let c = self.cluster;
        let addr = self.ca_addr;
        let bundle = self.bundle_file.clone();
        let td = c.trust_domain.to_string();
        let creds: std::collections::BTreeMap<String, PathBuf> =
            c.nodes.iter().map(|n| (n.name.clone(), self.node_credentials(&n.name))).collect();
        c.set_agent_source(move |node| {
            format!(
                "{{registry: {{caAddress: \"{addr}\", nodeCredentials: {}, trustBundleFile: {}, trustDomain: {td}}}}}",
                creds[node].display(),
                bundle.display()
            )
        });
    }

    /// Every agent serves its socket, and the CA has issued each pod's
    /// identity to the pod's node.
    fn wait_ready(&self) -> Result<()> {
        let c = self.cluster;
        for (node, pid) in &self.agents {
            let sock = c.workload_api_socket(node);
            wait_until(&format!("{node}'s auth-handshake to serve {}", sock.display()), START_TIMEOUT, || {
                c.is_running(*pid) && sock.exists()
            })
            .map_err(|e| self.with_logs(e))?;
        }
        let want: Vec<(String, String)> = c.pods.iter().map(|p| (self.spiffe_id_of(&p.key()), p.node.clone())).collect();
        wait_until("every pod's SVID to be issued to its node", START_TIMEOUT, || {
            self.issued().is_ok_and(|got| want.iter().all(|(id, node)| got.iter().any(|s| &s.spiffe_id == id && &s.node == node)))
        })
        .map_err(|e| self.with_logs(e))
    }

    /// `mg-spiffe fetch` in the pod's network namespace, against its node's socket.
    pub fn fetch(&self, pod: &str) -> Result<Outcome> {
        let p = self.cluster.pod(pod);
        self.fetch_in(&p.netns, &p.node)
    }

    /// `mg-spiffe fetch` in any namespace of the run, against `node`'s socket.
    pub fn fetch_in(&self, netns: &str, node: &str) -> Result<Outcome> {
        let out = self.spiffe_client(Some(netns), node, &["fetch", "--timeout", "10"])?;
        one_outcome(&out)
    }

    /// `mg-spiffe fetch` in the test's own (host) network namespace, which
    /// is no pod's.
    pub fn fetch_from_host(&self, node: &str) -> Result<Outcome> {
        one_outcome(&self.spiffe_client(None, node, &["fetch", "--timeout", "10"])?)
    }

    /// `mg-spiffe jwt` in the pod: a JWT-SVID for `audience`, of `spiffe_id`
    /// if given (else the pod's own).
    pub fn fetch_jwt(&self, pod: &str, audience: &str, spiffe_id: Option<&str>) -> Result<Outcome> {
        let p = self.cluster.pod(pod);
        let mut args = vec!["jwt", "--audience", audience];
        args.extend(spiffe_id.map(|id| ["--spiffe-id", id]).into_iter().flatten());
        one_outcome(&self.spiffe_client(Some(&p.netns), &p.node, &args)?)
    }

    /// `mg-spiffe jwt` in any namespace of the run, against `node`'s socket.
    pub fn fetch_jwt_in(&self, netns: &str, node: &str, audience: &str) -> Result<Outcome> {
        one_outcome(&self.spiffe_client(Some(netns), node, &["jwt", "--audience", audience])?)
    }

    /// `mg-spiffe validate` in the pod: its node's verdict on `token`.
    pub fn validate_jwt(&self, pod: &str, audience: &str, token: &str) -> Result<Outcome> {
        let p = self.cluster.pod(pod);
        one_outcome(&self.spiffe_client(Some(&p.netns), &p.node, &["validate", "--audience", audience, "--token", token])?)
    }

    /// `mg-spiffe watch` in the pod: the first `count` updates of its
    /// X.509-SVID stream, each as the client received it.
    pub fn watch(&self, pod: &str, count: usize, timeout: Duration) -> Result<Vec<Outcome>> {
        let p = self.cluster.pod(pod);
        let (count, secs) = (count.to_string(), timeout.as_secs().max(1).to_string());
        let out = self.spiffe_client(Some(&p.netns), &p.node, &["watch", "--count", &count, "--timeout", &secs])?;
        let outcomes = outcomes(&out)?;
        if !out.status.success() && !outcomes.iter().any(|o| matches!(o, Outcome::Refused { .. })) {
            return Err(ClusterError::Invalid(format!(
                "mg-spiffe watch in {pod} failed ({}) after {} update(s): {}",
                out.status,
                outcomes.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(outcomes)
    }

    fn spiffe_client(&self, netns: Option<&str>, node: &str, args: &[&str]) -> Result<Output> {
        let endpoint = format!("unix://{}", self.cluster.workload_api_socket(node).display());
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(bin_path("mg-spiffe"));
                cmd
            }
            None => Command::new(bin_path("mg-spiffe")),
        };
        let out = cmd.args(args).env(SPIFFE_ENDPOINT_SOCKET, endpoint).stdin(Stdio::null()).output()?;
        Ok(out)
    }

    /// Appends the tails of the CA's and the agents' logs to `e`.
    fn with_logs(&self, e: ClusterError) -> ClusterError {
        ClusterError::Invalid(format!("{e}\n{}", self.log_tails(30)))
    }

    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut logs = vec![("identity-ca".to_owned(), self.cluster.dir.join("identity/ca.log"))];
        logs.extend(
            self.cluster
                .nodes
                .iter()
                .map(|n| (format!("{} auth-handshake", n.name), self.cluster.dir.join(format!("identity/{}.log", n.name)))),
        );
        for (what, path) in logs {
            out.push_str(&format!("--- {what} log (tail) ---\n{}\n", log_tail(&path, lines)));
        }
        out
    }

    /// The pid of identity-ca (for tests that stop or signal it).
    pub fn ca_pid(&self) -> u32 {
        self.ca_pid
    }

    /// Whether identity-ca and `node`'s auth-handshake run.
    pub fn running(&self) -> (bool, Vec<(String, bool)>) {
        let c = self.cluster;
        (c.is_running(self.ca_pid), self.agents.iter().map(|(n, pid)| (n.clone(), c.is_running(*pid))).collect())
    }

    /// What a persistent cluster keeps of this stack.
    pub fn saved(&self) -> SavedIdentity {
        SavedIdentity {
            dir: self.dir.clone(),
            ca_addr: self.ca_addr,
            admin_socket: self.admin_socket.clone(),
            bundle_file: self.bundle_file.clone(),
            svid_ttl: self.svid_ttl,
            ca_pid: self.ca_pid,
            agents: self.agents.clone(),
        }
    }
}

impl Drop for Identity<'_> {
    fn drop(&mut self) {
        // The processes and files go with the cluster; a failing test gets
        // the logs that say why.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(40));
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// The X.509-SVID, or what came instead.
    pub fn svid(self) -> std::result::Result<SvidReport, String> {
        match self {
            Outcome::Svid(s) => Ok(s),
            other => Err(other.describe()),
        }
    }

    /// The JWT-SVID, or what came instead.
    pub fn jwt(self) -> std::result::Result<JwtReport, String> {
        match self {
            Outcome::Jwt(j) => Ok(j),
            other => Err(other.describe()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Svid(s) => format!("an X.509-SVID for {}", s.spiffe_id),
            Outcome::Jwt(j) => format!("a JWT-SVID for {}", j.spiffe_id),
            Outcome::Valid { spiffe_id } => format!("a valid token of {spiffe_id}"),
            Outcome::Invalid { message } => format!("an invalid token: {message}"),
            Outcome::Refused { reason, message } => format!("refused ({reason}): {message}"),
        }
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, Outcome::Refused { .. })
    }
}

// === impl SvidReport ===

impl SvidReport {
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        self.chain.iter().map(|c| B64.decode(c).expect("mg-spiffe writes base64")).collect()
    }

    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.bundle.iter().map(|c| B64.decode(c).expect("mg-spiffe writes base64")).collect()
    }

    /// Verifies the chain to one of `authorities` (DER) at `at`, as a TLS
    /// peer would (webpki: signatures, validity, CA constraints, and the
    /// clientAuth usage an SVID needs for mutual TLS).
    pub fn verify(&self, authorities: &[Vec<u8>], at: SystemTime) -> std::result::Result<(), String> {
        let chain = self.chain_der();
        let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
        let anchors = authorities
            .iter()
            .map(|a| webpki::anchor_from_trusted_cert(&CertificateDer::from(a.as_slice())).map(|t| t.to_owned()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| format!("bundle certificate unusable: {e:?}"))?;
        let leaf = CertificateDer::from(leaf.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("leaf unusable: {e:?}"))?;
        let intermediates: Vec<CertificateDer<'_>> = intermediates.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?);
        ee.verify_for_usage(&[webpki::ring::ECDSA_P256_SHA256], &anchors, &intermediates, at, webpki::KeyUsage::client_auth(), None, None)
            .map(|_| ())
            .map_err(|e| format!("chain does not verify: {e:?}"))
    }
}

// === helpers ===

fn path_str(p: &Path) -> &str {
    p.to_str().expect("run paths are UTF-8")
}

fn log_env() -> Vec<(&'static str, &'static str)> {
    // Logs are files: no colour codes. The runner's own RUST_LOG, when set, wins.
    let mut env = vec![("NO_COLOR", "1")];
    if std::env::var_os("RUST_LOG").is_none() {
        env.push(("RUST_LOG", "info"));
    }
    env
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn outcomes(out: &Output) -> Result<Vec<Outcome>> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| ClusterError::Invalid(format!("mg-spiffe printed {l:?}: {e}"))))
        .collect()
}

/// Exactly one outcome, or an error carrying what the client said.
fn one_outcome(out: &Output) -> Result<Outcome> {
    let mut all = outcomes(out)?;
    match (all.len(), out.status.code()) {
        (1, Some(0 | 2)) => Ok(all.remove(0)),
        _ => Err(ClusterError::Invalid(format!("mg-spiffe failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))),
    }
}

/// DER certificates from PEM text.
pub fn parse_pem_certs(text: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines().map(str::trim) {
        match line {
            "-----BEGIN CERTIFICATE-----" => cur = Some(String::new()),
            "-----END CERTIFICATE-----" => {
                let b = cur.take().unwrap_or_default();
                out.push(B64.decode(b).map_err(|e| ClusterError::Invalid(format!("bad PEM: {e}")))?);
            }
            _ => cur.iter_mut().for_each(|c| c.push_str(line)),
        }
    }
    if out.is_empty() {
        return Err(ClusterError::Invalid("no CERTIFICATE in PEM".into()));
    }
    Ok(out)
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
