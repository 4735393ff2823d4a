//! A userspace WireGuard device: boringtun's noise protocol with meshguard's
//! own I/O. Three threads move packets (TUN → wire, wire → TUN, timers);
//! configuration changes arrive as [`DeviceUpdate`]s, applied all or nothing.
//!
//! Lock order, everywhere: `state` before any peer's `tunn`. The packet loops
//! never take `state` while they hold a `tunn`.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use meshguard_common::key::PublicKey;
use parking_lot::RwLock;

use crate::allowed_ips::AllowedIps;
use crate::io::{Network, TunIo, UdpIo};

pub mod config;
mod loops;
mod peer;
pub mod stats;

pub use config::{DeviceSnapshot, DeviceUpdate, PeerSnapshot, PeerUpdate};
pub use stats::{Batching, DropReason, Stats};

use peer::{DeviceKey, Peer};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot bind UDP port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot set fwmark {mark}: {source}")]
    Fwmark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start device thread: {0}")]
    Thread(#[source] io::Error),
}

/// A running device. Dropping it stops its threads.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

pub(crate) struct Shared {
    state: RwLock<State>,
    tun: Arc<dyn TunIo>,
    network: Arc<dyn Network>,
    socket: RwLock<Arc<dyn UdpIo>>,
    /// Bumped on every socket swap so the receive loop picks up the new one.
    socket_generation: AtomicU64,
    /// Serialises `apply` calls, so "validate, then commit" is atomic.
    apply_lock: parking_lot::Mutex<()>,
    pub stats: Stats,
    shutdown: AtomicBool,
    /// Set when the TUN device disappeared; the owner should exit.
    closed: AtomicBool,
    epoch: Instant,
}

pub(crate) struct State {
    key: Option<DeviceKey>,
    /// As configured; 0 means "any", and the bound port is the socket's.
    listen_port: u16,
    fwmark: u32,
    peers: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
}

// === impl Device ===

impl Device {
    /// Starts a device on `tun`, with a socket bound to `listen_port` (0 = any).
    pub fn start(tun: Arc<dyn TunIo>, network: Arc<dyn Network>, listen_port: u16) -> Result<Self, DeviceError> {
        let socket = network.bind(listen_port, 0).map_err(|source| DeviceError::Bind { port: listen_port, source })?;
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                key: None,
                listen_port,
                fwmark: 0,
                peers: HashMap::new(),
                by_index: HashMap::new(),
                routes: AllowedIps::default(),
            }),
            tun,
            network,
            socket: RwLock::new(socket),
            socket_generation: AtomicU64::new(0),
            apply_lock: parking_lot::Mutex::new(()),
            stats: Stats::default(),
            shutdown: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let mut threads = Vec::new();
        for (name, f) in [("wg-tun-rx", loops::tun_loop as fn(&Shared)), ("wg-net-rx", loops::net_loop), ("wg-timers", loops::timer_loop)] {
            let s = shared.clone();
            let t = std::thread::Builder::new().name(name.into()).spawn(move || f(&s));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.shutdown.store(true, Ordering::SeqCst);
                    return Err(DeviceError::Thread(e));
                }
            }
        }
        Ok(Self { shared, threads })
    }

    /// Applies `update` atomically: on error nothing has changed.
    pub fn apply(&self, update: &DeviceUpdate) -> Result<(), DeviceError> {
        let _serial = self.shared.apply_lock.lock();
        // Everything that can fail happens before the state is touched.
        let new_socket = match update.listen_port {
            Some(port) if port != self.shared.state.read().listen_port => {
                let mark = update.fwmark.unwrap_or(self.shared.state.read().fwmark);
                Some(self.shared.network.bind(port, mark).map_err(|source| DeviceError::Bind { port, source })?)
            }
            _ => None,
        };
        if let (Some(mark), None) = (update.fwmark, &new_socket) {
            self.shared.socket.read().set_fwmark(mark).map_err(|source| DeviceError::Fwmark { mark, source })?;
        }

        let mut st = self.shared.state.write();
        if let Some(socket) = new_socket {
            st.listen_port = update.listen_port.unwrap_or(0);
            *self.shared.socket.write() = socket;
            self.shared.socket_generation.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(mark) = update.fwmark {
            st.fwmark = mark;
        }
        if let Some(key) = &update.private_key {
            st.set_key(key.clone().map(DeviceKey::new));
        }
        if update.replace_peers {
            let all: Vec<PublicKey> = st.peers.keys().copied().collect();
            for pk in all {
                st.remove_peer(&pk);
            }
        }
        for p in &update.peers {
            st.apply_peer(p);
        }
        Ok(())
    }

    pub fn snapshot(&self) -> DeviceSnapshot {
        let st = self.shared.state.read();
        let mut peers: Vec<PeerSnapshot> = st
            .peers
            .values()
            .map(|p| {
                let cfg = p.cfg.lock();
                let (tx_bytes, rx_bytes) = p.counters();
                let preshared_key = cfg.preshared_key.clone();
                let allowed_ips = cfg.allowed_ips.clone();
                drop(cfg);
                PeerSnapshot {
                    public_key: p.public_key,
                    preshared_key,
                    endpoint: p.endpoint(),
                    last_handshake: p.last_handshake(),
                    tx_bytes,
                    rx_bytes,
                    persistent_keepalive: p.keepalive(),
                    allowed_ips,
                }
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        DeviceSnapshot {
            private_key: st.key.as_ref().map(|k| k.secret.clone()),
            public_key: st.key.as_ref().map(DeviceKey::public_key),
            listen_port: self.shared.socket.read().local_port(),
            fwmark: st.fwmark,
            peers,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.shared.state.read().key.as_ref().map(DeviceKey::public_key)
    }

    /// Sends a handshake initiation to every peer with an endpoint, so
    /// sessions exist before the first packet needs one (used at start-up
    /// and after the device key changes).
    pub fn initiate_handshakes(&self) {
        loops::initiate_all(&self.shared);
    }

    /// True once the TUN interface has been deleted from under the device.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("public_key", &self.public_key()).finish_non_exhaustive()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
    }
}

// === impl State ===

impl State {
    fn set_key(&mut self, key: Option<DeviceKey>) {
        // Re-setting the same key (as `wg syncconf` and `wg setconf` do) must
        // not cost the sessions: a no-op, as in wireguard-go and the kernel.
        if self.key.as_ref().map(|k| &k.secret) == key.as_ref().map(|k| &k.secret) {
            return;
        }
        if let Some(k) = &key {
            // A peer with our own public key makes no sense; wireguard-go drops it too.
            let own = k.public_key();
            if self.peers.contains_key(&own) {
                self.remove_peer(&own);
            }
        }
        self.key = key;
        for p in self.peers.values() {
            p.rekey(self.key.as_ref());
        }
    }

    fn remove_peer(&mut self, pk: &PublicKey) {
        let Some(peer) = self.peers.remove(pk) else { return };
        self.by_index.remove(&peer.index);
        for net in std::mem::take(&mut peer.cfg.lock().allowed_ips) {
            if self.routes.get_exact(&net).is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                self.routes.remove(&net);
            }
        }
        *peer.tunn.lock() = None;
    }

    fn new_index(&self) -> u32 {
        use rand::Rng as _;
        let mut rng = rand::thread_rng();
        loop {
            // 24 bits: boringtun shifts the index left by 8 for its session ids.
            let i = rng.gen_range(1..(1u32 << 24));
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    fn apply_peer(&mut self, u: &PeerUpdate) {
        if u.remove {
            self.remove_peer(&u.public_key);
            return;
        }
        if self.key.as_ref().is_some_and(|k| k.public_key() == u.public_key) {
            return;
        }
        let peer = match self.peers.get(&u.public_key) {
            Some(p) => p.clone(),
            None if u.update_only => return,
            None => {
                let p = Arc::new(Peer::new(u.public_key, self.new_index()));
                self.peers.insert(u.public_key, p.clone());
                self.by_index.insert(p.index, p.clone());
                p.rekey(self.key.as_ref());
                p
            }
        };
        if let Some(psk) = &u.preshared_key {
            let changed = {
                let mut cfg = peer.cfg.lock();
                let changed = cfg.preshared_key != *psk;
                cfg.preshared_key = psk.clone();
                changed
            };
            if changed {
                peer.rekey(self.key.as_ref());
            }
        }
        if let Some(ep) = u.endpoint {
            peer.set_endpoint(ep);
        }
        if let Some(ka) = u.persistent_keepalive {
            peer.set_keepalive(ka);
        }
        if u.replace_allowed_ips {
            for net in std::mem::take(&mut peer.cfg.lock().allowed_ips) {
                if self.routes.get_exact(&net).is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                    self.routes.remove(&net);
                }
            }
        }
        for net in &u.allowed_ips {
            let net = net.trunc();
            if let Some(prev) = self.routes.insert(net, peer.clone())
                && !Arc::ptr_eq(&prev, &peer)
            {
                // A prefix belongs to one peer: it moves, as in WireGuard.
                prev.cfg.lock().allowed_ips.retain(|n| *n != net);
            }
            let mut cfg = peer.cfg.lock();
            if !cfg.allowed_ips.contains(&net) {
                cfg.allowed_ips.push(net);
            }
        }
    }
}
