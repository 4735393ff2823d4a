//! Events from the datapath's ring buffers: policy and anti-spoofing drops
//! (`mg_events`, for the node agent) and auth-required signals
//! (`mg_auth_events`, for auth-handshake). Each ring has a single consumer
//! position, hence one ring per reader.
//!
//! The rings are pinned, so any process of the node opens them by the
//! instance's pin layout. Read it blocking
//! ([`EventReader::next_timeout`]) or async ([`EventReader::into_async`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::{Map, MapData};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::abi::{self, DropReason, ForwardReason, RawEvent};
use crate::pin::PinLayout;
use crate::policy::Direction;
use crate::ringbuf::Ring;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot open the pinned event ring buffer {path}: {source}; is the datapath loaded for this instance?")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("event ring buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("event ring buffer: {0}")]
    Map(#[from] aya::maps::MapError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Drop(DropReason),
    /// No live auth entry for (subject, peer, peer node): handshake, please.
    AuthRequired,
    /// A new flow was admitted (once per conntrack entry), and why.
    Flow(ForwardReason),
    /// A type or reason this build does not know.
    Unknown {
        r#type: u16,
        reason: u16,
    },
}

/// One event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub direction: Direction,
    pub ifindex: u32,
    /// The pod's identity.
    pub subject: u32,
    pub peer: u32,
    pub peer_node: u32,
    /// The cookie of the policy entry that decided, for explicit denies.
    pub cookie: u32,
    pub protocol: u8,
    /// `None` when the packet was not parsed that far.
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: u16,
    pub dport: u16,
    /// CLOCK_BOOTTIME nanoseconds.
    pub timestamp_boot_ns: u64,
    /// Auth-required signals: the frame that raised it, Ethernet header
    /// first, as the program saw it (empty when it was too long to hold).
    pub frame: Vec<u8>,
}

/// Reads events from one instance's ring buffer.
pub struct EventReader {
    ring: Ring,
}

/// The async form, for a tokio runtime.
pub struct AsyncEventReader {
    ring: AsyncFd<Ring>,
}

// === impl Event ===

impl Event {
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<RawEvent>() {
            return None;
        }
        let raw: RawEvent = read_raw(bytes);
        let kind = match raw.r#type {
            abi::MG_EVENT_DROP => match u8::try_from(raw.reason).ok().and_then(DropReason::from_code) {
                Some(r) => EventKind::Drop(r),
                None => EventKind::Unknown { r#type: raw.r#type, reason: raw.reason },
            },
            abi::MG_EVENT_AUTH_REQUIRED => EventKind::AuthRequired,
            abi::MG_EVENT_FLOW => match u8::try_from(raw.reason).ok().and_then(ForwardReason::from_code) {
                Some(r) => EventKind::Flow(r),
                None => EventKind::Unknown { r#type: raw.r#type, reason: raw.reason },
            },
            t => EventKind::Unknown { r#type: t, reason: raw.reason },
        };
        let addr = |a: [u8; 16]| -> Option<IpAddr> {
            match raw.family {
                abi::MG_FAMILY_IPV4 => Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()),
                abi::MG_FAMILY_IPV6 => Some(Ipv6Addr::from(a).into()),
                _ => None,
            }
        };
        Some(Self {
            kind,
            direction: Direction::from_abi(raw.direction),
            ifindex: raw.ifindex,
            subject: raw.subject_identity,
            peer: raw.peer_identity,
            peer_node: raw.peer_node,
            cookie: raw.cookie,
            protocol: raw.protocol,
            src: addr(raw.saddr),
            dst: addr(raw.daddr),
            sport: u16::from_be(raw.sport),
            dport: u16::from_be(raw.dport),
            timestamp_boot_ns: raw.timestamp_ns,
            frame: held_frame(bytes),
        })
    }
}

/// The frame after an auth signal's event (`struct mg_auth_signal`), if the
/// record is one and holds a frame.
fn held_frame(b: &[u8]) -> Vec<u8> {
    let at = std::mem::offset_of!(abi::AuthSignal, frame_len);
    let start = std::mem::offset_of!(abi::AuthSignal, frame);
    let Some(len) = b.get(at..at + 4).map(|l| u32::from_ne_bytes(l.try_into().unwrap()) as usize) else {
        return Vec::new();
    };
    if len > abi::MG_HOLD_BYTES {
        return Vec::new();
    }
    b.get(start..start + len).map(<[u8]>::to_vec).unwrap_or_default()
}

/// Reads a `RawEvent` from possibly unaligned bytes, field by field.
fn read_raw(b: &[u8]) -> RawEvent {
    let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    let mut e = RawEvent {
        timestamp_ns: u64::from_ne_bytes(b[0..8].try_into().unwrap()),
        r#type: u16_at(8),
        reason: u16_at(10),
        direction: b[12],
        family: b[13],
        protocol: b[14],
        pad: 0,
        ifindex: u32_at(16),
        subject_identity: u32_at(20),
        peer_identity: u32_at(24),
        peer_node: u32_at(28),
        cookie: u32_at(32),
        ..Default::default()
    };
    e.saddr.copy_from_slice(&b[36..52]);
    e.daddr.copy_from_slice(&b[52..68]);
    // Ports stay in network order here, as in the kernel struct.
    e.sport = u16::from_ne_bytes([b[68], b[69]]);
    e.dport = u16::from_ne_bytes([b[70], b[71]]);
    e
}

// === impl EventReader ===

impl EventReader {
    /// Opens an instance's pinned drop-event ring.
    pub fn open(pin: &PinLayout) -> Result<Self, EventError> {
        Self::open_ring(pin, abi::MAP_EVENTS)
    }

    /// Opens an instance's pinned auth-required signal ring (auth-handshake).
    pub fn open_auth_signals(pin: &PinLayout) -> Result<Self, EventError> {
        Self::open_ring(pin, abi::MAP_AUTH_EVENTS)
    }

    fn open_ring(pin: &PinLayout, name: &str) -> Result<Self, EventError> {
        let path = pin.map(name);
        let data = MapData::from_pin(&path).map_err(|source| EventError::Open { path: path.display().to_string(), source })?;
        Self::from_map(Map::RingBuf(data))
    }

    pub(crate) fn from_map(map: Map) -> Result<Self, EventError> {
        match map {
            Map::RingBuf(data) => Ok(Self { ring: Ring::new(data)? }),
            _ => Err(EventError::Io(std::io::Error::other("the events map is not a ring buffer"))),
        }
    }

    /// The next event already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = Event::decode(&item) {
                return Some(e);
            }
        }
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, EventError> {
        if let Some(e) = self.try_next() {
            return Ok(Some(e));
        }
        // The fd belongs to self.ring, which outlives the call.
        sys::poll_readable(self.ring.as_raw_fd(), timeout.as_millis().min(i32::MAX as u128) as i32)?;
        Ok(self.try_next())
    }

    /// Every event queued now.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    /// Async reading; needs a tokio runtime with I/O enabled.
    #[allow(unsafe_code)]
    pub fn into_async(self) -> Result<AsyncEventReader, EventError> {
        // SAFETY: the RingBuf owns its map's descriptor, which stays open
        // and unchanged until the AsyncFd (its owner from now on) drops it.
        let ring = unsafe { AsyncFd::register_with_interest(self.ring, Interest::READABLE) }.map_err(std::io::Error::from)?;
        Ok(AsyncEventReader { ring })
    }
}

impl AsyncEventReader {
    /// The next event, waiting as long as it takes.
    pub async fn next(&mut self) -> Result<Event, EventError> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            while let Some(item) = guard.get_inner_mut().next() {
                if let Some(e) = Event::decode(&item) {
                    return Ok(e);
                }
            }
            guard.clear_ready();
        }
    }
}
