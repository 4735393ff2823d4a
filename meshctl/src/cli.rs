//! The command line: what each subcommand takes, its examples, and the exit
//! codes. Each subcommand's work lives in its own module beside this one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::sim::cluster::ClusterError;

pub mod cluster;
pub mod demo;
pub mod observe;
pub mod policies;
pub mod state;
pub mod status;

/// Where meshctl keeps the running cluster (one per directory). Namespaces do
/// not survive a reboot, so neither does this: it lives under /run.
pub const DEFAULT_STATE_DIR: &str = "/run/meshctl";
pub const STATE_DIR_ENV: &str = "MESHCTL_STATE_DIR";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed (a component did not start, a request was refused)
  2  invalid input: arguments, spec or policy file, unknown pod
  3  cluster state: no cluster is up, or one is already up
  4  demo: what was observed differs from what was expected
  exec passes on the command's own exit code.";

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Run, inspect and observe a meshguard cluster",
    long_about = "meshctl builds a meshguard cluster of network namespaces on this machine \
                  (nodes, pods, identity-ca, and on every node wg-agent and auth-handshake, all real), \
                  shows what it does, and changes its policies.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Directory holding the running cluster's state; one cluster per directory.
    #[arg(long, global = true, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Build a three-node cluster, apply a sample policy, run a traffic matrix and print it.
    #[command(
        after_help = "Example:\n  meshctl demo            # prints the table, removes the cluster\n  meshctl demo --keep     # leaves it up: try `meshctl status`, then `meshctl down`"
    )]
    Demo {
        /// Leave the cluster running (as `meshctl up` would) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Build a cluster and leave it running.
    #[command(
        after_help = "Examples:\n  meshctl up                       # 2 nodes, 2 pods\n  meshctl up --nodes 3 --pods 6\n  meshctl up --spec cluster.yaml   # nodes and workloads from a file (see docs/first-ten-minutes.md)"
    )]
    Up {
        /// Number of nodes (ignored with --spec).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=200))]
        nodes: u8,
        /// Number of pods, spread over the nodes (ignored with --spec).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=2000))]
        pods: u16,
        /// A cluster spec: trustDomain, nodes and workloads.
        #[arg(long, conflicts_with_all = ["nodes", "pods"])]
        spec: Option<PathBuf>,
    },
    /// Remove the cluster: processes, namespaces, links, routes, pinned maps, files.
    #[command(after_help = "Example:\n  meshctl down")]
    Down,
    /// Run a command in a pod's network namespace, with its node's Workload API socket.
    #[command(
        after_help = "Examples:\n  meshctl exec shop/web -- ping -c1 10.244.2.10\n  meshctl exec shop/web -- sh -c 'echo $SPIFFE_ENDPOINT_SOCKET'"
    )]
    Exec {
        /// The pod, as NAMESPACE/NAME.
        pod: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Components, nodes and their WireGuard peers, pods, policies, auth entries, drops.
    #[command(after_help = "Examples:\n  meshctl status\n  meshctl status --json | jq '.pods[] | {name, ip, spiffeId}'")]
    Status {
        /// table, or the documented, stable shape as json or yaml.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The same as `-o json`.
        #[arg(long)]
        json: bool,
    },
    /// Apply, show or delete MeshPolicy objects (the same YAML `kubectl apply` takes).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Follow every node's datapath events live: new flows, drops and auth signals, with identities.
    #[command(
        after_help = "Examples:\n  meshctl observe\n  meshctl observe --pod shop/api --verdict dropped -o json\n  meshctl observe --identity spiffe://cluster.local/ns/shop/sa/web --protocol UDP"
    )]
    Observe(ObserveArgs),
    /// Print meshguard's CustomResourceDefinitions (MeshPolicy, MeshNode), generated from its types.
    #[command(after_help = "Example:\n  meshctl crds | kubectl apply -f -")]
    Crds,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Create or replace every policy in a file, all or nothing.
    #[command(after_help = "Example:\n  meshctl policy apply -f docs/examples/shop-policy.yaml")]
    Apply {
        /// A YAML file of one or more MeshPolicy documents ("-" for stdin).
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Print policies (all, or NAMESPACE/NAME).
    #[command(after_help = "Examples:\n  meshctl policy get\n  meshctl policy get shop/api-ingress -o yaml")]
    Get {
        /// NAMESPACE/NAME; all policies when absent.
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete the policies a file names, or one NAMESPACE/NAME.
    #[command(after_help = "Examples:\n  meshctl policy delete -f shop-policy.yaml\n  meshctl policy delete shop/api-ingress")]
    Delete {
        #[arg(short = 'f', long, conflicts_with = "name", required_unless_present = "name")]
        file: Option<PathBuf>,
        name: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct ObserveArgs {
    /// Only events of this pod (NAMESPACE/NAME), either side.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only events with this SPIFFE ID on either side.
    #[arg(long)]
    pub identity: Option<String>,
    /// Only this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    /// Only this protocol (TCP, UDP, SCTP, ICMP, ICMPv6 or a number).
    #[arg(long)]
    pub protocol: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

pub use meshguard_common::output::Output;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verdict {
    /// A new flow the datapath admitted.
    Forwarded,
    Dropped,
    AuthRequired,
}

/// Everything a subcommand can fail with, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

// === impl CliError ===

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Failed(_) | Self::Cluster(_) | Self::Io(_) => 1,
            Self::Input(_) => 2,
            Self::State(_) => 3,
            Self::Mismatch(_) => 4,
        }
    }
}

/// Runs one invocation.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let dir = cli.state_dir;
    match cli.cmd {
        Cmd::Demo { keep } => demo::run(&dir, keep),
        Cmd::Up { nodes, pods, spec } => cluster::up(&dir, nodes, pods, spec.as_deref()),
        Cmd::Down => cluster::down(&dir),
        Cmd::Exec { pod, command } => cluster::exec(&dir, &pod, &command),
        Cmd::Status { output, json } => status::run(&dir, if json { Output::Json } else { output }),
        Cmd::Policy { cmd } => policies::run(&dir, cmd),
        Cmd::Observe(args) => observe::run(&dir, &args),
        Cmd::Crds => {
            let docs: Vec<String> =
                meshguard_common::cluster::crds::all().iter().map(|(_, crd)| meshguard_common::cluster::crds::to_yaml(crd)).collect();
            print!("{}", docs.join("---\n"));
            Ok(ExitCode::SUCCESS)
        }
    }
}
