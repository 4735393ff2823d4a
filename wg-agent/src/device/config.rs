//! What can be asked of a device (an update, applied all or nothing) and
//! what it reports back (a snapshot). Both map one-to-one onto the
//! cross-platform UAPI `set` and `get` operations.

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use meshguard_common::key::{PublicKey, SecretKey};

/// A change to a device's configuration. Validated and applied atomically:
/// either all of it takes effect or none of it does.
#[derive(Debug, Default, Clone)]
pub struct DeviceUpdate {
    /// `Some(None)` removes the key (the UAPI all-zero key).
    pub private_key: Option<Option<SecretKey>>,
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the mark.
    pub fwmark: Option<u32>,
    /// Remove every peer not named in `peers` (a fresh peer list).
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

#[derive(Debug, Clone)]
pub struct PeerUpdate {
    pub public_key: PublicKey,
    pub remove: bool,
    /// Only change the peer if it exists; never create it.
    pub update_only: bool,
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<SecretKey>>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; `Some(0)` turns persistent keepalive off.
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerUpdate {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// The device as `wg show` sees it.
#[derive(Debug, Clone)]
pub struct DeviceSnapshot {
    pub private_key: Option<SecretKey>,
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerSnapshot>,
}

#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}
