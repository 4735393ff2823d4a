//! The auth map on its own: (local identity, remote identity, remote node)
//! → expiry. auth-handshake opens the pinned map with [`AuthTable::open`]
//! without loading any program; the node agent reaches the same map through
//! its `Datapath`.

use std::time::{Duration, SystemTime};

use aya::maps::{HashMap, Map, MapData, MapError};

use crate::abi::{self, AuthKey, AuthValue};
use crate::datapath::{DatapathError, map_err};
use crate::pin::PinLayout;
use crate::sys;

/// (local identity, remote identity, remote node): what auth-handshake proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthPair {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
}

/// The pinned auth map.
pub struct AuthTable {
    pub(crate) map: HashMap<MapData, AuthKey, AuthValue>,
}

// === impl AuthTable ===

impl AuthTable {
    /// Opens an instance's pinned auth map (for auth-handshake).
    pub fn open(pin: &PinLayout) -> Result<Self, DatapathError> {
        let path = pin.map(abi::MAP_AUTH);
        let data = MapData::from_pin(&path).map_err(map_err(abi::MAP_AUTH))?;
        Ok(Self { map: HashMap::try_from(Map::HashMap(data)).map_err(map_err(abi::MAP_AUTH))? })
    }

    /// Admits the pair until `expires` (wall clock, converted to the
    /// kernel's boot clock now; an expiry in the past stores an expired entry).
    pub fn set(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError> {
        let boot_now = sys::boot_ns();
        let expires_boot_ns = match expires.duration_since(SystemTime::now()) {
            Ok(left) => boot_now.saturating_add(left.as_nanos().min(u128::from(u64::MAX)) as u64),
            Err(_) => 0,
        };
        self.map.insert(auth_key(pair), AuthValue { expires_boot_ns }, 0).map_err(map_err(abi::MAP_AUTH))
    }

    pub fn remove(&mut self, pair: AuthPair) -> Result<(), DatapathError> {
        match self.map.remove(&auth_key(pair)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(abi::MAP_AUTH)(e)),
        }
    }

    /// Every entry with its remaining lifetime (zero when expired).
    pub fn entries(&self) -> Result<Vec<(AuthPair, Duration)>, DatapathError> {
        let now = sys::boot_ns();
        self.map
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(map_err(abi::MAP_AUTH))?;
                let pair = AuthPair { local_identity: k.local_identity, remote_identity: k.remote_identity, remote_node: k.remote_node };
                Ok((pair, Duration::from_nanos(v.expires_boot_ns.saturating_sub(now))))
            })
            .collect()
    }
}

fn auth_key(p: AuthPair) -> AuthKey {
    AuthKey { local_identity: p.local_identity, remote_identity: p.remote_identity, remote_node: p.remote_node, pad: 0 }
}
