//! `auth-handshake run [--config FILE]` and `auth-handshake healthcheck`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use meshguard_auth_handshake::{agent::Agent, config};

#[derive(Parser)]
#[command(name = "auth-handshake", version, about = "meshguard's per-node identity agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attest, keep this node's workload SVIDs, serve the Workload API.
    Run {
        #[arg(long, default_value_os_t = meshguard_common::config::default_path("auth-handshake"))]
        config: PathBuf,
    },
    /// Ask the running agent's /readyz (on the config's metricsAddress); exit 0 when ready.
    Healthcheck {
        #[arg(long, default_value_os_t = meshguard_common::config::default_path("auth-handshake"))]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    meshguard_common::logging::init();
    let cmd = Cli::parse().cmd;
    if let Cmd::Healthcheck { config } = &cmd {
        let cfg = config::load_without_secrets(config).with_context(|| format!("loading {}", config.display()))?;
        return Ok(meshguard_common::telemetry::healthcheck(cfg.metrics_address).await);
    }
    let Cmd::Run { config } = &cmd else { unreachable!("healthcheck returned") };
    let cfg = config::load(config).with_context(|| format!("loading {}", config.display()))?;
    let agent = Agent::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
