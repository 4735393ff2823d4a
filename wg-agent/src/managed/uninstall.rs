//! `wg-agent uninstall --config FILE`: removes what the agent leaves on a
//! node on purpose (it fails closed, so all of it outlives the agent): its
//! routes (protocol 201: tunnel routes, the strict blackhole), the pinned
//! datapath (unpinning the links detaches every pod's programs; the maps go
//! with the last holder), and the persistent tunnel interface. The node key
//! in the state directory stays, so a re-install keeps the node's identity;
//! delete it by hand to forget the node.
//!
//! Stop the agent first (a running agent would put everything back). Pod
//! traffic is no longer encrypted or policed afterwards: that is what
//! uninstalling means.

use super::config::AgentConfig;
use super::routes::Routes;

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub routes: bool,
    pub datapath: bool,
    pub interface: bool,
}

/// Removes the agent's routes, pinned datapath and tunnel interface; each
/// step runs even when an earlier one failed, and every failure is
/// reported.
pub async fn uninstall(cfg: &AgentConfig) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    let mut errors = Vec::new();
    let ifindex = crate::io::tun::if_index(&cfg.interface).ok();
    let routes = Routes::new(ifindex.unwrap_or(0))?;
    match routes.sync(&Default::default()).await {
        Ok(()) => removed.routes = true,
        Err(e) => errors.push(format!("routes: {e}")),
    }
    if let Some(dp) = &cfg.datapath {
        let pin = meshguard_ebpf::PinLayout::new(&dp.pin_dir);
        match meshguard_ebpf::datapath::remove_instance(&pin) {
            Ok(()) => removed.datapath = true,
            Err(e) => errors.push(format!("pinned datapath {}: {e}", dp.pin_dir.display())),
        }
    }
    if let Some(ifindex) = ifindex {
        match routes.delete_link(ifindex).await {
            Ok(()) => removed.interface = true,
            Err(e) => errors.push(format!("interface {}: {e}", cfg.interface)),
        }
    }
    tracing::info!(?removed, "uninstalled");
    anyhow::ensure!(errors.is_empty(), "uninstall left something behind: {}", errors.join("; "));
    Ok(removed)
}
