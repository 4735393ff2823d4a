//! One WireGuard peer: its noise state (boringtun's `Tunn`), where to send,
//! what it may claim as source addresses, and its counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use ipnet::IpNet;
use meshguard_common::key::{PublicKey, SecretKey};
use parking_lot::{Mutex, RwLock};

pub(crate) struct Peer {
    pub public_key: PublicKey,
    /// Our 24-bit index for this peer: the top bits of every receiver index
    /// we hand out, so incoming messages find their peer in O(1).
    pub index: u32,
    /// `None` while the device has no private key.
    pub tunn: Mutex<Option<Tunn>>,
    endpoint: RwLock<Option<SocketAddr>>,
    pub cfg: Mutex<PeerConfig>,
    /// Persistent keepalive in seconds, mirrored for the timer loop.
    keepalive: AtomicU16,
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    /// Milliseconds since the device epoch at which we last sent anything.
    last_sent_ms: AtomicU64,
    last_handshake: Mutex<Option<SystemTime>>,
}

#[derive(Default)]
pub(crate) struct PeerConfig {
    pub preshared_key: Option<SecretKey>,
    pub allowed_ips: Vec<IpNet>,
}

/// The device key material every peer's `Tunn` is built from.
pub(crate) struct DeviceKey {
    pub secret: SecretKey,
    pub static_secret: x25519::StaticSecret,
    pub public: x25519::PublicKey,
    pub rate_limiter: Arc<RateLimiter>,
}

/// Handshakes per second a device accepts before it asks for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

// === impl DeviceKey ===

impl DeviceKey {
    pub fn new(secret: SecretKey) -> Self {
        let static_secret = x25519::StaticSecret::from(*secret.as_bytes());
        let public = x25519::PublicKey::from(&static_secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self { secret, static_secret, public, rate_limiter }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }
}

// === impl Peer ===

impl Peer {
    pub fn new(public_key: PublicKey, index: u32) -> Self {
        Self {
            public_key,
            index,
            tunn: Mutex::new(None),
            endpoint: RwLock::new(None),
            cfg: Mutex::new(PeerConfig::default()),
            keepalive: AtomicU16::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            last_sent_ms: AtomicU64::new(0),
            last_handshake: Mutex::new(None),
        }
    }

    /// Builds fresh noise state (dropping any sessions) from the device key.
    pub fn rekey(&self, key: Option<&DeviceKey>) {
        let psk = self.cfg.lock().preshared_key.as_ref().map(|k| *k.as_bytes());
        *self.tunn.lock() = key.map(|k| {
            Tunn::new(
                k.static_secret.clone(),
                x25519::PublicKey::from(self.public_key.0),
                psk,
                // Persistent keepalive is driven by the device so it can change live.
                None,
                self.index,
                Some(k.rate_limiter.clone()),
            )
        });
    }

    #[inline]
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read()
    }

    /// Records where an authenticated message came from (roaming).
    #[inline]
    pub fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            *self.endpoint.write() = Some(addr);
        }
    }

    pub fn keepalive(&self) -> u16 {
        self.keepalive.load(Ordering::Relaxed)
    }

    pub fn set_keepalive(&self, secs: u16) {
        self.keepalive.store(secs, Ordering::Relaxed);
    }

    #[inline]
    pub fn note_sent(&self, bytes: usize, now_ms: u64) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_sent_ms.store(now_ms, Ordering::Relaxed);
    }

    #[inline]
    pub fn note_received(&self, bytes: usize) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn last_sent_ms(&self) -> u64 {
        self.last_sent_ms.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> (u64, u64) {
        (self.tx_bytes.load(Ordering::Relaxed), self.rx_bytes.load(Ordering::Relaxed))
    }

    /// Refreshes and returns the wall-clock time of the latest handshake. The
    /// noise layer only knows "how long ago, while a session is live", so the
    /// absolute time is kept here and survives the session's expiry.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let since = self.tunn.lock().as_ref().and_then(|t| t.time_since_last_handshake());
        let mut last = self.last_handshake.lock();
        if let Some(since) = since {
            let at = SystemTime::now() - since;
            // Sub-second jitter between calls must not look like a new handshake.
            if last.is_none_or(|prev| at.duration_since(prev).unwrap_or_default() > Duration::from_secs(1)) {
                *last = Some(at);
            }
        }
        *last
    }
}
