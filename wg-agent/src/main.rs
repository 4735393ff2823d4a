//! `wg-agent`: the meshguard node agent.
//!
//! - `wg-agent device <IFNAME>`: a plain WireGuard interface for the `wg` tool.
//! - `wg-agent run --config FILE`: the managed node agent.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshguard_common::logging;
use meshguard_wg_agent::device::Device;
use meshguard_wg_agent::io::tun::LinuxTun;
use meshguard_wg_agent::io::udp::HostNetwork;
use meshguard_wg_agent::managed;
use meshguard_wg_agent::uapi::server::{Access, DEFAULT_SOCKET_DIR, UapiServer};

#[derive(Parser)]
#[command(name = "wg-agent", version, about = "meshguard node agent: userspace WireGuard and node-to-node encryption")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a WireGuard interface and serve the standard configuration
    /// socket, so `wg set`, `wg show`, `wg syncconf` work as with wireguard-go.
    Device {
        /// Interface name (at most 15 bytes).
        ifname: String,
        /// Interface MTU.
        #[arg(long, default_value_t = managed::config::DEFAULT_MTU)]
        mtu: u16,
        /// Directory of the UAPI socket.
        #[arg(long, default_value = DEFAULT_SOCKET_DIR)]
        socket_dir: PathBuf,
    },
    /// Run the managed node agent.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Replace the node key with a fresh one; a running agent picks it up
    /// and its peers follow through the cluster source.
    RotateKey {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the node's public key (creating the key on first use).
    PublicKey {
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove the agent from this node: its routes, pinned datapath (pods'
    /// programs detach) and tunnel interface. Stop the agent first. The
    /// node key stays.
    Uninstall {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    logging::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Device { ifname, mtu, socket_dir } => run_device(&ifname, mtu, &socket_dir),
        Command::Run { config } => {
            let cfg = managed::config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(managed::run(cfg))
        }
        Command::RotateKey { config } => {
            let cfg = managed::config::load(&config)?;
            let key = managed::node_key::rotate(&cfg.key_path())?;
            println!("{key}");
            Ok(())
        }
        Command::Uninstall { config } => {
            let cfg = managed::config::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
            let removed = rt.block_on(managed::uninstall::uninstall(&cfg))?;
            println!(
                "removed: routes {}, datapath {}, interface {}",
                removed.routes,
                removed.datapath,
                if removed.interface { cfg.interface.as_str() } else { "(none)" }
            );
            Ok(())
        }
        Command::PublicKey { config } => {
            let cfg = managed::config::load(&config)?;
            let (_, key) = managed::node_key::load_or_create(&cfg.key_path())?;
            println!("{key}");
            Ok(())
        }
    }
}

fn run_device(ifname: &str, mtu: u16, socket_dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(mtu >= 576, "mtu {mtu} is below the IPv4 minimum of 576");
    let tun = LinuxTun::open(ifname, false)?;
    tun.set_mtu(mtu)?;
    let device = Arc::new(Device::start(Arc::new(tun), Arc::new(HostNetwork), 0)?);
    let _uapi = UapiServer::start(socket_dir, ifname, device.clone(), Access::ReadWrite)?;
    tracing::info!(interface = ifname, mtu, "device ready; configure it with `wg`");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let stop = managed::signals::terminated();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => if device.is_closed() { break },
            }
        }
    });
    tracing::info!(interface = ifname, "shutting down");
    Ok(())
}
