//! `identity-ca run --config FILE`, and the admin subcommands that talk to
//! a running CA over its root-only unix socket.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use meshguard_ca_client::registry::proto;
use meshguard_common::output::{self, Output, Table};
use meshguard_identity_ca::{admin, config, server::CaServer, spiffe_bundle};

#[derive(Parser)]
#[command(name = "identity-ca", version, about = "meshguard's SPIFFE CA and standalone registry")]
struct Cli {
    /// The running CA's admin socket.
    #[arg(long, global = true, default_value = config::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// How listings print: table, json or yaml.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the CA.
    Run {
        #[arg(long, default_value_os_t = meshguard_common::config::default_path("identity-ca"))]
        config: PathBuf,
    },
    /// The state database's file format, with the CA stopped.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Ask the running CA's /readyz (on the config's metricsAddress); exit 0 when ready.
    Healthcheck {
        #[arg(long, default_value_os_t = meshguard_common::config::default_path("identity-ca"))]
        config: PathBuf,
    },
    /// Join tokens for node attestation.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Attested and registered nodes.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Workload identities and the nodes hosting them.
    Identity {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Issued X.509-SVIDs.
    Svid {
        #[command(subcommand)]
        cmd: SvidCmd,
    },
    /// CA authorities and their rotation.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// The trust bundle.
    Bundle {
        #[command(subcommand)]
        cmd: BundleCmd,
    },
    /// Workloads (standalone mode).
    Workload {
        #[command(subcommand)]
        cmd: WorkloadCmd,
    },
    /// MeshPolicies (standalone mode).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Print the Prometheus metrics.
    Metrics,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a single-use join token for a node; prints the token.
    Create {
        #[arg(long)]
        node: String,
        /// e.g. 10m, 1h (default: the CA's joinTokenTtl).
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    List,
    /// Forget a node: its SVID stops working and its record leaves the registry.
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum ListOnly {
    List,
}

#[derive(Subcommand)]
enum SvidCmd {
    List {
        /// Include expired SVIDs still on record.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    List,
    /// Add a new authority to the bundle (it signs nothing yet).
    Prepare,
    /// Make the prepared authority sign; the old one stays in the bundle.
    Activate,
    /// Drop the previous authority from the bundle.
    Retire {
        /// Even though SVIDs it signed are still valid.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Rewrite identity-ca.redb in redb's newest file format (v3), ahead of
    /// a release built on redb 3. Stop the CA and back up stateDir first.
    Upgrade {
        #[arg(long, default_value_os_t = meshguard_common::config::default_path("identity-ca"))]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    Show {
        /// pem (X.509 authorities), jwks, json (everything), or spiffe (the
        /// SPIFFE bundle format a SPIRE server or SPIFFE library imports)
        #[arg(long, default_value = "pem")]
        format: String,
    },
}

#[derive(Subcommand)]
enum WorkloadCmd {
    Put {
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long)]
        node: String,
        #[arg(long = "ip")]
        ips: Vec<String>,
        /// key=value
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// NAMESPACE/NAME
    Delete {
        key: String,
    },
    List,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Apply a MeshPolicy YAML file ("-" for stdin).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// NAMESPACE/NAME
    Delete {
        key: String,
    },
    List,
}

fn split_key(key: &str) -> Result<(String, String)> {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.to_owned(), name.to_owned())),
        _ => bail!("expected NAMESPACE/NAME, got {key:?}"),
    }
}

fn time(unix: i64) -> String {
    if unix == 0 {
        return "-".into();
    }
    let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second())
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode> {
    meshguard_common::logging::init();
    let cli = Cli::parse();
    let load = |path: &std::path::Path| config::load(path).with_context(|| format!("loading {}", path.display()));
    if let Cmd::Store { cmd: StoreCmd::Upgrade { config } } = &cli.cmd {
        let cfg = load(config)?;
        let upgraded = meshguard_identity_ca::store::Store::upgrade_format(&cfg.state_dir, config::DB_FILE)
            .with_context(|| format!("upgrading {} (is the CA stopped?)", cfg.db_path().display()))?;
        println!(
            "{}: {}",
            cfg.db_path().display(),
            if upgraded { "upgraded to redb file format v3" } else { "already in redb file format v3" }
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Cmd::Healthcheck { config } = &cli.cmd {
        let cfg = load(config)?;
        return Ok(meshguard_common::telemetry::healthcheck(cfg.metrics_address).await);
    }
    if let Cmd::Run { config } = &cli.cmd {
        let cfg = load(config)?;
        let server = CaServer::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        server
            .run_until(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut c = admin::connect(&cli.admin_socket).await.with_context(|| {
        format!("cannot reach identity-ca's admin socket {} (is it running, and are you root?)", cli.admin_socket.display())
    })?;
    let output = if cli.json { Output::Json } else { cli.output };
    let show = |rows: Vec<serde_json::Value>, table: Table| output::print(output, &rows, || table).map_err(anyhow::Error::msg);
    match cli.cmd {
        Cmd::Run { .. } | Cmd::Healthcheck { .. } | Cmd::Store { .. } => unreachable!("handled above"),
        Cmd::Token { cmd: TokenCmd::Create { node, ttl } } => {
            let ttl_seconds = match ttl {
                Some(t) => meshguard_common::config::parse_duration(&t).map_err(anyhow::Error::msg)?.as_secs() as i64,
                None => 0,
            };
            let r = c.create_join_token(proto::CreateJoinTokenRequest { node_name: node, ttl_seconds }).await?.into_inner();
            if output == Output::Table {
                // Bare, for `$(identity-ca token create ...)`.
                println!("{}", r.token);
            } else {
                output::print(output, &serde_json::json!({"token": r.token, "expiresAt": time(r.expires_at)}), Table::default)
                    .map_err(anyhow::Error::msg)?;
            }
        }
        Cmd::Node { cmd: NodeCmd::List } => {
            let r = c.list_nodes(proto::ListNodesRequest {}).await?.into_inner();
            let mut t = Table::new(&["NODE", "NODE ID", "ATTESTED", "SVID EXPIRES", "ENDPOINT", "POD CIDRS"]);
            let mut rows = Vec::new();
            for n in &r.nodes {
                let (ep, cidrs) = n.record.as_ref().map(|r| (r.endpoint.clone(), r.pod_cidrs.join(","))).unwrap_or_default();
                t.row(vec![n.name.clone(), n.node_id.to_string(), time(n.attested_at), time(n.svid_expires_at), ep, cidrs]);
                rows.push(serde_json::json!({
                    "name": n.name, "nodeId": n.node_id, "spiffeId": n.spiffe_id, "attestedAt": time(n.attested_at),
                    "svidExpiresAt": time(n.svid_expires_at),
                    "endpoint": n.record.as_ref().map(|r| r.endpoint.clone()),
                    "publicKey": n.record.as_ref().and_then(|r| {
                        <[u8; 32]>::try_from(r.public_key.as_slice()).ok().map(|k| meshguard_common::key::PublicKey(k).to_base64())
                    }),
                    "podCidrs": n.record.as_ref().map(|r| r.pod_cidrs.clone()),
                }));
            }
            show(rows, t)?;
        }
        Cmd::Node { cmd: NodeCmd::Delete { name } } => {
            c.delete_node(proto::DeleteNodeRequest { name: name.clone() }).await?;
            println!("node {name} removed");
        }
        Cmd::Identity { cmd: ListOnly::List } => {
            let r = c.list_identities(proto::ListIdentitiesRequest {}).await?.into_inner();
            let mut t = Table::new(&["SPIFFE ID", "NUMBER", "NODES"]);
            let mut rows = Vec::new();
            for i in &r.identities {
                t.row(vec![i.spiffe_id.clone(), i.number.to_string(), i.nodes.join(",")]);
                rows.push(serde_json::json!({"spiffeId": i.spiffe_id, "number": i.number, "nodes": i.nodes, "workloads": i.workloads}));
            }
            show(rows, t)?;
        }
        Cmd::Svid { cmd: SvidCmd::List { all } } => {
            let r = c.list_svids(proto::ListSvidsRequest { include_expired: all }).await?.into_inner();
            let mut t = Table::new(&["SERIAL", "SPIFFE ID", "NODE", "EXPIRES", "AUTHORITY"]);
            let mut rows = Vec::new();
            for s in &r.svids {
                t.row(vec![s.serial.clone(), s.spiffe_id.clone(), s.node.clone(), time(s.expires_at), s.authority_id.clone()]);
                rows.push(serde_json::json!({"serial": s.serial, "spiffeId": s.spiffe_id, "node": s.node, "issuedAt": time(s.issued_at), "expiresAt": time(s.expires_at), "authority": s.authority_id}));
            }
            show(rows, t)?;
        }
        Cmd::Ca { cmd } => {
            let list = match cmd {
                CaCmd::List => c.list_authorities(proto::ListAuthoritiesRequest {}).await?.into_inner().authorities,
                CaCmd::Prepare => vec![c.prepare_authority(proto::PrepareAuthorityRequest {}).await?.into_inner()],
                CaCmd::Activate => vec![c.activate_authority(proto::ActivateAuthorityRequest {}).await?.into_inner()],
                CaCmd::Retire { force } => vec![c.retire_authority(proto::RetireAuthorityRequest { force }).await?.into_inner()],
            };
            let mut t = Table::new(&["AUTHORITY", "STATE", "NOT BEFORE", "NOT AFTER"]);
            let mut rows = Vec::new();
            for a in &list {
                t.row(vec![a.id.clone(), a.state.clone(), time(a.not_before), time(a.not_after)]);
                rows.push(
                    serde_json::json!({"id": a.id, "state": a.state, "notBefore": time(a.not_before), "notAfter": time(a.not_after)}),
                );
            }
            show(rows, t)?;
        }
        Cmd::Bundle { cmd: BundleCmd::Show { format } } => {
            let b = c.get_bundle(proto::GetBundleRequest {}).await?.into_inner();
            match format.as_str() {
                "pem" => b.x509_authorities.iter().for_each(|d| print!("{}", pem("CERTIFICATE", d))),
                "jwks" => println!("{}", String::from_utf8_lossy(&b.jwt_authorities_jwks)),
                "json" => {
                    let jwks: serde_json::Value =
                        serde_json::from_slice(&b.jwt_authorities_jwks).context("the CA's JWT key set is not JSON")?;
                    println!(
                        "{:#}",
                        serde_json::json!({
                            "trustDomain": b.trust_domain, "sequence": b.sequence,
                            "x509Authorities": b.x509_authorities.iter().map(|d| pem("CERTIFICATE", d)).collect::<Vec<_>>(),
                            "jwtAuthorities": jwks,
                        })
                    );
                }
                "spiffe" => println!(
                    "{}",
                    spiffe_bundle::render(&b.x509_authorities, &b.jwt_authorities_jwks, b.sequence, spiffe_bundle::REFRESH_HINT)?
                ),
                other => bail!("unknown bundle format {other:?}: use pem, jwks, json or spiffe"),
            }
        }
        Cmd::Workload { cmd: WorkloadCmd::Put { name, namespace, service_account, node, ips, labels } } => {
            let labels = labels
                .iter()
                .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).context("labels are key=value"))
                .collect::<Result<_>>()?;
            let w = proto::Workload { name, namespace, service_account, node, ips, labels };
            c.put_workload(proto::PutWorkloadRequest { workload: Some(w) }).await?;
        }
        Cmd::Workload { cmd: WorkloadCmd::Delete { key } } => {
            let (namespace, name) = split_key(&key)?;
            c.delete_workload(proto::DeleteWorkloadRequest { namespace, name }).await?;
        }
        Cmd::Workload { cmd: WorkloadCmd::List } => {
            let r = c.list_workloads(proto::ListWorkloadsRequest {}).await?.into_inner();
            let mut t = Table::new(&["WORKLOAD", "SERVICE ACCOUNT", "NODE", "IPS"]);
            let mut rows = Vec::new();
            for w in &r.workloads {
                t.row(vec![format!("{}/{}", w.namespace, w.name), w.service_account.clone(), w.node.clone(), w.ips.join(",")]);
                rows.push(serde_json::json!({
                    "namespace": w.namespace, "name": w.name, "serviceAccount": w.service_account, "node": w.node, "ips": w.ips, "labels": w.labels,
                }));
            }
            show(rows, t)?;
        }
        Cmd::Policy { cmd: PolicyCmd::Apply { file } } => {
            let yaml = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let r = c.put_policy(proto::PutPolicyRequest { yaml }).await?.into_inner();
            for key in r.keys {
                println!("meshpolicy {key} applied");
            }
        }
        Cmd::Policy { cmd: PolicyCmd::Delete { key } } => {
            let (namespace, name) = split_key(&key)?;
            c.delete_policy(proto::DeletePolicyRequest { namespace, name }).await?;
        }
        Cmd::Policy { cmd: PolicyCmd::List } => {
            let r = c.list_policies(proto::ListPoliciesRequest {}).await?.into_inner();
            let mut t = Table::new(&["POLICY"]);
            let mut rows = Vec::new();
            for p in &r.policies {
                t.row(vec![format!("{}/{}", p.namespace, p.name)]);
                // The resource itself, as `kubectl get -o json` prints it.
                rows.push(
                    serde_json::from_str::<serde_json::Value>(&p.json).with_context(|| format!("policy {}/{}", p.namespace, p.name))?,
                );
            }
            show(rows, t)?;
        }
        Cmd::Metrics => print!("{}", c.metrics(proto::MetricsRequest {}).await?.into_inner().text),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
