//! `auth-handshake run --config FILE`.

use std::path::PathBuf;

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
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    meshguard_common::logging::init();
    let Cmd::Run { config } = Cli::parse().cmd;
    let cfg = config::load(&config).with_context(|| format!("loading {}", config.display()))?;
    let agent = Agent::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}
