//! `wg-agent`: the meshguard node agent.
//!
//! - `wg-agent device <IFNAME>`: a plain WireGuard interface for the `wg` tool.
//! - `wg-agent <IFNAME>`: the same, invoked as wireguard-go is (by `wg-quick`
//!   with `WG_QUICK_USERSPACE_IMPLEMENTATION=wg-agent`): in the background,
//!   returning once the interface and its socket are up.
//! - `wg-agent run [--config FILE]`: the managed node agent
//!   (default `/etc/meshguard/wg-agent.yaml`).
//! - `wg-agent healthcheck`: asks the running agent's `/readyz`.

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
#[command(
    name = "wg-agent",
    version,
    about = "meshguard node agent: userspace WireGuard and node-to-node encryption",
    allow_external_subcommands = true
)]
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
        /// One packet per TUN read and write: no segmentation offload from
        /// the kernel and no coalescing back to it (for comparison; the
        /// kernel's support is detected and used by default).
        #[arg(long)]
        no_tun_offload: bool,
        /// One datagram per socket receive slot: no UDP GRO.
        #[arg(long)]
        no_udp_gro: bool,
    },
    /// `wg-agent IFNAME`, as wireguard-go is run (wg-quick): the device in
    /// the background (`WG_PROCESS_FOREGROUND=1`: in the foreground).
    #[command(external_subcommand)]
    Userspace(Vec<String>),
    /// Run the managed node agent.
    Run {
        #[arg(long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Replace the node key with a fresh one; a running agent picks it up
    /// and its peers follow through the cluster source.
    RotateKey {
        #[arg(long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Print the node's public key (creating the key on first use).
    PublicKey {
        #[arg(long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Remove the agent from this node: its routes, pinned datapath (pods'
    /// programs detach) and tunnel interface. Stop the agent first. The
    /// node key stays.
    Uninstall {
        #[arg(long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Ask the running agent's /readyz (on the config's metricsAddress);
    /// exit 0 when ready, print why not otherwise.
    Healthcheck {
        #[arg(long, default_value_os_t = default_config())]
        config: PathBuf,
    },
}

fn default_config() -> PathBuf {
    meshguard_common::config::default_path("wg-agent")
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    logging::init();
    let cli = Cli::parse();
    if let Command::Healthcheck { config } = &cli.command {
        let cfg = managed::config::load(config)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
        return Ok(rt.block_on(meshguard_common::telemetry::healthcheck(cfg.metrics_address)));
    }
    run(cli.command).map(|()| std::process::ExitCode::SUCCESS)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Healthcheck { .. } => unreachable!("handled in main"),
        Command::Device { ifname, mtu, socket_dir, no_tun_offload, no_udp_gro } => {
            run_device(&ifname, mtu, &socket_dir, DataPath { tun_offload: !no_tun_offload, udp_gro: !no_udp_gro })
        }
        Command::Userspace(args) => {
            let [ifname] = args.as_slice() else {
                anyhow::bail!("usage: wg-agent IFNAME (as wireguard-go), or wg-agent device IFNAME; see wg-agent --help")
            };
            let socket_dir = PathBuf::from(DEFAULT_SOCKET_DIR);
            if std::env::var_os("WG_PROCESS_FOREGROUND").is_some_and(|v| v == "1") {
                run_device(ifname, managed::config::DEFAULT_MTU, &socket_dir, DataPath::default())
            } else {
                background_device(ifname, &socket_dir)
            }
        }
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

/// wireguard-go's contract with wg-quick: start the device, return 0 once
/// it can be configured (its socket answers), leave it running.
fn background_device(ifname: &str, socket_dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !ifname.is_empty() && ifname.len() <= 15 && !ifname.contains(['/', ' ']),
        "{ifname:?} is not an interface name (1-15 bytes, no '/' or space)"
    );
    let socket = socket_dir.join(format!("{ifname}.sock"));
    let mut child = std::process::Command::new(std::env::current_exe().context("cannot find this executable")?)
        .args(["device", ifname])
        .arg("--socket-dir")
        .arg(socket_dir)
        // Like wireguard-go's daemon: detached from the caller's stdio (a
        // caller reading our output to its end must not wait for the device).
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start the device")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the device for {ifname} exited before it was ready ({status})");
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    anyhow::bail!("the device for {ifname} was not ready within 10 s")
}

/// Which kernel offloads the device asks for (each still only where the
/// kernel has it).
struct DataPath {
    tun_offload: bool,
    udp_gro: bool,
}

impl Default for DataPath {
    fn default() -> Self {
        Self { tun_offload: true, udp_gro: true }
    }
}

fn run_device(ifname: &str, mtu: u16, socket_dir: &std::path::Path, path: DataPath) -> anyhow::Result<()> {
    anyhow::ensure!(mtu >= 576, "mtu {mtu} is below the IPv4 minimum of 576");
    let tun = LinuxTun::open_with(ifname, false, path.tun_offload)?;
    tun.set_mtu(mtu)?;
    let device = Arc::new(Device::start(Arc::new(tun), Arc::new(HostNetwork { gro: path.udp_gro }), 0)?);
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
