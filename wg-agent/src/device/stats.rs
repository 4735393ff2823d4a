//! Device-wide counters: every packet the device refuses is counted by
//! reason, and logged — rate-limited, so a flood of garbage cannot turn into
//! a flood of log lines.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a packet was dropped. Names are stable: they are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Outgoing packet whose destination no peer's allowed IPs cover (in
    /// managed strict mode: pod traffic to a node we have no tunnel to).
    NoPeer,
    /// The peer has no endpoint to send to yet.
    NoEndpoint,
    /// The device has no private key.
    NoPrivateKey,
    /// An IP packet from the TUN that is not IPv4/IPv6, or a super-packet
    /// whose virtio-net header or headers do not add up.
    MalformedIp,
    /// A datagram that is not a WireGuard message.
    MalformedDatagram,
    /// A handshake message with a wrong MAC1 (not for us, or forged).
    BadMac,
    /// A valid handshake initiation from a key that is not a peer.
    UnknownPeer,
    /// A message for a receiver index we never issued.
    UnknownIndex,
    /// A replayed data packet or handshake initiation.
    Replay,
    /// Authentication or decryption failed.
    DecryptFailed,
    /// No session for the message (expired, or never established).
    NoSession,
    /// A decrypted packet whose inner source is outside the sending peer's
    /// allowed IPs (cryptokey routing).
    SourceNotAllowed,
    /// Handshake refused because the device is under load (a cookie was sent).
    UnderLoad,
    /// The kernel refused a write to the TUN or the socket.
    IoError,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        Self::NoPeer,
        Self::NoEndpoint,
        Self::NoPrivateKey,
        Self::MalformedIp,
        Self::MalformedDatagram,
        Self::BadMac,
        Self::UnknownPeer,
        Self::UnknownIndex,
        Self::Replay,
        Self::DecryptFailed,
        Self::NoSession,
        Self::SourceNotAllowed,
        Self::UnderLoad,
        Self::IoError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoPeer => "no_peer",
            Self::NoEndpoint => "no_endpoint",
            Self::NoPrivateKey => "no_private_key",
            Self::MalformedIp => "malformed_ip",
            Self::MalformedDatagram => "malformed_datagram",
            Self::BadMac => "bad_mac",
            Self::UnknownPeer => "unknown_peer",
            Self::UnknownIndex => "unknown_index",
            Self::Replay => "replay",
            Self::DecryptFailed => "decrypt_failed",
            Self::NoSession => "no_session",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::UnderLoad => "under_load",
            Self::IoError => "io_error",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }

    /// Maps a protocol error from the noise layer to a reason.
    pub fn from_wg(e: &boringtun::noise::errors::WireGuardError) -> Self {
        use boringtun::noise::errors::WireGuardError as E;
        match e {
            E::DuplicateCounter | E::WrongTai64nTimestamp | E::InvalidCounter => Self::Replay,
            E::InvalidMac => Self::BadMac,
            E::WrongIndex => Self::UnknownIndex,
            E::NoCurrentSession | E::ConnectionExpired => Self::NoSession,
            E::UnderLoad => Self::UnderLoad,
            E::InvalidPacket | E::IncorrectPacketLength | E::WrongPacketType | E::UnexpectedPacket => Self::MalformedDatagram,
            E::InvalidAeadTag | E::WrongKey | E::InvalidTai64nTimestamp => Self::DecryptFailed,
            E::DestinationBufferTooSmall | E::LockFailed => Self::IoError,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often a given reason may log. The counter carries the exact numbers.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Stats {
    drops: [AtomicU64; DropReason::ALL.len()],
    last_log_ms: [AtomicU64; DropReason::ALL.len()],
    epoch: Instant,
    pub handshakes_completed: AtomicU64,
    /// What the offloads did, by [`Batching`]: whether they are at work
    /// shows here (all zero: the kernel or the flags left them off).
    batched: [AtomicU64; Batching::ALL.len()],
}

/// Where the device moved many packets as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// A super-packet read from the TUN and cut into packets (TSO/USO).
    TunSegmented,
    /// A super-packet written to the TUN, merged from decrypted packets.
    TunCoalesced,
    /// A receive slot that held several datagrams (UDP GRO).
    UdpGro,
}

impl Batching {
    pub const ALL: [Batching; 3] = [Self::TunSegmented, Self::TunCoalesced, Self::UdpGro];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TunSegmented => "tun_segmented",
            Self::TunCoalesced => "tun_coalesced",
            Self::UdpGro => "udp_gro",
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            drops: Default::default(),
            last_log_ms: Default::default(),
            epoch: Instant::now(),
            handshakes_completed: AtomicU64::new(0),
            batched: Default::default(),
        }
    }
}

impl Stats {
    /// Counts a drop and logs it unless this reason logged recently.
    #[inline]
    pub fn drop(&self, reason: DropReason, detail: impl FnOnce() -> String) {
        let total = self.drops[reason.index()].fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.epoch.elapsed().as_millis() as u64 + LOG_EVERY.as_millis() as u64;
        let last = &self.last_log_ms[reason.index()];
        let prev = last.load(Ordering::Relaxed);
        if now.saturating_sub(prev) >= LOG_EVERY.as_millis() as u64
            && last.compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(reason = %reason, total, detail = %detail(), "dropped packet");
        }
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    #[inline]
    pub fn batched(&self, what: Batching, n: u64) {
        self.batched[what as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn batches(&self, what: Batching) -> u64 {
        self.batched[what as usize].load(Ordering::Relaxed)
    }

    pub fn all_drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_the_list() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let s = Stats::default();
        s.drop(DropReason::Replay, || "x".into());
        s.drop(DropReason::Replay, || "x".into());
        assert_eq!(s.drops(DropReason::Replay), 2);
        assert_eq!(s.drops(DropReason::NoPeer), 0);
    }
}
