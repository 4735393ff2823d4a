//! The three loops that move packets. Each owns its buffers; nothing on the
//! per-packet path allocates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use meshguard_common::key::PublicKey;

use super::peer::Peer;
use super::stats::{Batching, DropReason};
use super::{Shared, State};
use crate::io::{RecvBatch, is_timeout};
use crate::packet;

/// Largest IP packet a TUN can hand us, plus WireGuard's data overhead.
const MAX_PACKET: usize = 65_535;
const BUF_LEN: usize = MAX_PACKET + 256;

/// boringtun's timers have 250 ms resolution; ticking at that rate is enough.
const TIMER_TICK: Duration = Duration::from_millis(250);

impl Shared {
    #[inline]
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    #[inline]
    fn send(&self, peer: &Peer, bytes: &[u8], to: SocketAddr) {
        match self.socket.read().send_to(bytes, to) {
            Ok(()) => peer.note_sent(bytes.len(), self.now_ms()),
            Err(e) => self.stats.drop(DropReason::IoError, || format!("send to {to}: {e}")),
        }
    }

    /// Sends whatever the noise layer asked for, to the peer's endpoint.
    #[inline]
    fn send_result(&self, peer: &Peer, res: TunnResult<'_>) {
        match res {
            TunnResult::WriteToNetwork(bytes) => match peer.endpoint() {
                Some(ep) => self.send(peer, bytes, ep),
                None => self.stats.drop(DropReason::NoEndpoint, || format!("peer {}", peer.public_key)),
            },
            TunnResult::Err(e) => {
                let reason = DropReason::from_wg(&e);
                // An expired connection is the timers' normal idle state, not a refusal.
                if reason != DropReason::NoSession {
                    self.stats.drop(reason, || format!("peer {}: {e:?}", peer.public_key));
                }
            }
            TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }
}

/// Packets the TUN loop takes per batch: read without waiting after the
/// first, encrypted back to back, handed to the kernel in as few sends as
/// the peers and sizes allow.
const TUN_BATCH: usize = 32;
/// Bytes of datagrams per GSO send: below the 64 KiB a UDP send may carry.
const GSO_BYTES: usize = 60_000;

/// Datagrams encrypted for one peer, waiting in `out[..bytes]` to be sent
/// in one call: every one `seg` bytes except possibly the last.
struct Pending {
    peer: Option<Arc<Peer>>,
    to: Option<SocketAddr>,
    seg: usize,
    count: usize,
    bytes: usize,
    /// The last datagram was shorter than `seg`: nothing may follow it.
    closed: bool,
}

impl Pending {
    fn new() -> Self {
        Self { peer: None, to: None, seg: 0, count: 0, bytes: 0, closed: false }
    }

    fn accepts(&self, peer: &Arc<Peer>, to: SocketAddr) -> bool {
        self.count == 0
            || (!self.closed
                && self.to == Some(to)
                && self.peer.as_ref().is_some_and(|p| Arc::ptr_eq(p, peer))
                && self.count < crate::io::udp::MAX_GSO_SEGMENTS
                && self.bytes + self.seg <= GSO_BYTES)
    }

    fn flush(&mut self, shared: &Shared, out: &[u8]) {
        if self.count > 0
            && let (Some(peer), Some(to)) = (self.peer.take(), self.to.take())
        {
            if self.count == 1 {
                shared.send(&peer, &out[..self.bytes], to);
            } else {
                match shared.socket.read().send_segments(&out[..self.bytes], self.seg, to) {
                    Ok(()) => peer.note_sent(self.bytes, shared.now_ms()),
                    Err(e) => shared.stats.drop(DropReason::IoError, || format!("send to {to}: {e}")),
                }
            }
        }
        *self = Self::new();
    }
}

/// TUN → wire: route by destination, encrypt, send — a batch at a time.
/// A batch is the reads waiting after the first (each read one packet, or
/// a super-packet cut into many), up to `TUN_BATCH` reads.
pub(super) fn tun_loop(shared: &Shared) {
    let mut src = vec![0u8; BUF_LEN];
    // Room for a full GSO batch plus one more datagram of any size.
    let mut out = vec![0u8; GSO_BYTES + BUF_LEN];
    let mut pending = Pending::new();
    while !shared.shutdown.load(Ordering::Relaxed) {
        let mut encrypt = |pkt: &[u8]| encrypt_one(shared, pkt, &mut out, &mut pending);
        match shared.tun.read_packets(&mut src, true, &mut encrypt) {
            Ok(n) => count_read(shared, n),
            Err(e) if is_timeout(&e) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBADFD | libc::ENODEV | libc::EIO)) => {
                // The interface was deleted under us (`ip link del`): the device is over.
                tracing::warn!(error = %e, "tun device is gone; stopping");
                shared.closed.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => refuse_read(shared, &e),
            Err(e) => {
                shared.stats.drop(DropReason::IoError, || format!("tun read: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        for _ in 1..TUN_BATCH {
            match shared.tun.read_packets(&mut src, false, &mut encrypt) {
                Ok(0) => break,
                Ok(n) => count_read(shared, n),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => refuse_read(shared, &e),
                Err(e) => {
                    shared.stats.drop(DropReason::IoError, || format!("tun read: {e}"));
                    break;
                }
            }
        }
        pending.flush(shared, &out);
    }
}

#[inline]
fn count_read(shared: &Shared, packets: usize) {
    if packets > 1 {
        shared.stats.batched(Batching::TunSegmented, 1);
    }
}

/// A super-packet from the TUN that does not add up: nothing of it is sent.
fn refuse_read(shared: &Shared, e: &std::io::Error) {
    shared.stats.drop(DropReason::MalformedIp, || format!("super-packet from the tun: {e}"));
}

/// Encrypts one packet from the TUN into the pending batch (flushing it
/// first when the packet goes elsewhere or would not fit).
fn encrypt_one(shared: &Shared, pkt: &[u8], out: &mut [u8], pending: &mut Pending) {
    let Some(to_ip) = packet::dst_addr(pkt) else {
        shared.stats.drop(DropReason::MalformedIp, || format!("{}-byte packet from the tun", pkt.len()));
        return;
    };
    let peer = match shared.state.read().routes.lookup(to_ip) {
        Some(p) => p.clone(),
        None => {
            shared.stats.drop(DropReason::NoPeer, || format!("no peer for destination {to_ip}"));
            return;
        }
    };
    let endpoint = peer.endpoint();
    let fits = endpoint.is_some_and(|ep| pending.accepts(&peer, ep));
    if !fits {
        pending.flush(shared, out);
    }
    let off = pending.bytes;
    let res = {
        let mut guard = peer.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            shared.stats.drop(DropReason::NoPrivateKey, || "device has no private key".into());
            return;
        };
        tunn.encapsulate(pkt, &mut out[off..])
    };
    let len = match res {
        TunnResult::WriteToNetwork(d) => d.len(),
        other => {
            shared.send_result(&peer, other);
            return;
        }
    };
    let Some(to) = endpoint else {
        shared.stats.drop(DropReason::NoEndpoint, || format!("peer {}", peer.public_key));
        return;
    };
    if pending.count > 0 && len > pending.seg {
        // Longer than the batch's segments (a handshake, say): send what is
        // pending, then start a new batch with this datagram.
        pending.flush(shared, &out[..off]);
        out.copy_within(off..off + len, 0);
    }
    if pending.count == 0 {
        pending.peer = Some(peer);
        pending.to = Some(to);
        pending.seg = len;
    } else if len < pending.seg {
        pending.closed = true;
    }
    pending.count += 1;
    pending.bytes += len;
}

/// Wire → TUN: authenticate, find the peer, decrypt, check the inner source
/// against the peer's allowed IPs, deliver. What one receive brought (many
/// datagrams, coalesced by UDP GRO or not) is decrypted into `inner` and
/// written to the TUN together, so TCP segments of one flow go up as one
/// super-packet where the TUN takes them.
pub(super) fn net_loop(shared: &Shared) {
    let mut batch = RecvBatch::new(NET_BATCH, BUF_LEN);
    let mut inner = Inner::new();
    let mut generation = shared.socket_generation.load(Ordering::SeqCst);
    let mut socket = shared.socket.read().clone();
    while !shared.shutdown.load(Ordering::Relaxed) {
        let current = shared.socket_generation.load(Ordering::SeqCst);
        if current != generation {
            generation = current;
            socket = shared.socket.read().clone();
        }
        let n = match socket.recv_batch(&mut batch) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                shared.stats.drop(DropReason::IoError, || format!("socket read: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        for i in 0..n {
            if batch.segs[i] != 0 && batch.lens[i] > batch.segs[i] {
                shared.stats.batched(Batching::UdpGro, 1);
            }
            for datagram in batch.datagrams(i) {
                if inner.room() < datagram.len() {
                    inner.deliver(shared);
                }
                let at = inner.used;
                if let Some(r) = handle_datagram(shared, datagram, batch.from[i], &mut inner.buf[at..]) {
                    inner.ends.push((at + r.start, at + r.end));
                    inner.used = at + r.end;
                }
            }
        }
        inner.deliver(shared);
    }
}

/// Datagrams the wire loop takes per receive call.
const NET_BATCH: usize = 32;
/// Decrypted bytes gathered before a TUN write: a few super-packets' worth.
const INNER_BYTES: usize = 512 * 1024;

/// Decrypted packets waiting to be written to the TUN, back to back.
struct Inner {
    buf: Vec<u8>,
    used: usize,
    ends: Vec<(usize, usize)>,
}

impl Inner {
    fn new() -> Self {
        Self { buf: vec![0u8; INNER_BYTES + BUF_LEN], used: 0, ends: Vec::with_capacity(1024) }
    }

    /// Room left for one more decrypted packet (never less than a
    /// datagram, which is longer than what it decrypts to).
    fn room(&self) -> usize {
        INNER_BYTES.saturating_sub(self.used)
    }

    fn deliver(&mut self, shared: &Shared) {
        if !self.ends.is_empty() {
            let pkts: Vec<&[u8]> = self.ends.iter().map(|&(a, b)| &self.buf[a..b]).collect();
            let merged = shared.tun.write_packets(&pkts, &mut |e| shared.stats.drop(DropReason::IoError, || format!("tun write: {e}")));
            shared.stats.batched(Batching::TunCoalesced, merged as u64);
        }
        self.ends.clear();
        self.used = 0;
    }
}

/// One datagram from the wire. Returns where in `out` it left an inner
/// packet for the TUN, if it carried one that may go.
pub(super) fn handle_datagram(shared: &Shared, datagram: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<std::ops::Range<usize>> {
    let base = out.as_ptr() as usize;
    let peer = find_peer(shared, datagram, from, out)?;
    let res = {
        let mut guard = peer.tunn.lock();
        let tunn = guard.as_mut()?;
        let res = tunn.decapsulate(Some(from.ip()), datagram, out);
        match res {
            TunnResult::Err(e) => {
                drop(guard);
                shared.stats.drop(DropReason::from_wg(&e), || format!("from {from} (peer {}): {e:?}", peer.public_key));
                return None;
            }
            TunnResult::WriteToNetwork(bytes) => {
                // Handshake traffic: answer, then flush what waited for the session.
                peer.note_received(datagram.len());
                peer.set_endpoint(from);
                shared.send(&peer, bytes, from);
                flush_queue(shared, &peer, tunn, out);
                return None;
            }
            r => r,
        }
    };
    // Authenticated: count it and follow the peer if it roamed.
    peer.note_received(datagram.len());
    peer.set_endpoint(from);
    let (inner, src) = match res {
        TunnResult::WriteToTunnelV4(p, a) => (p, std::net::IpAddr::V4(a)),
        TunnResult::WriteToTunnelV6(p, a) => (p, std::net::IpAddr::V6(a)),
        _ => return None, // keepalive
    };
    // Cryptokey routing: the peer may only speak for its own allowed IPs.
    let allowed = shared.state.read().routes.lookup(src).is_some_and(|p| Arc::ptr_eq(p, &peer));
    if !allowed {
        shared
            .stats
            .drop(DropReason::SourceNotAllowed, || format!("peer {} sent a packet from {src}, outside its allowed IPs", peer.public_key));
        return None;
    }
    let at = inner.as_ptr() as usize - base;
    Some(at..at + inner.len())
}

/// Sends the packets the noise layer queued while it had no session.
fn flush_queue(shared: &Shared, peer: &Peer, tunn: &mut Tunn, buf: &mut [u8]) {
    loop {
        match tunn.decapsulate(None, &[], buf) {
            TunnResult::WriteToNetwork(bytes) => match peer.endpoint() {
                Some(ep) => shared.send(peer, bytes, ep),
                None => return,
            },
            _ => return,
        }
    }
}

/// Finds the peer a datagram belongs to, without decrypting it.
fn find_peer(shared: &Shared, datagram: &[u8], from: SocketAddr, scratch: &mut [u8]) -> Option<Arc<Peer>> {
    let st = shared.state.read();
    let Some(key) = st.key.as_ref() else {
        shared.stats.drop(DropReason::NoPrivateKey, || format!("datagram from {from}"));
        return None;
    };
    let packet = match key.rate_limiter.verify_packet(Some(from.ip()), datagram, scratch) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            // Under load: answer with a cookie instead of doing DH work.
            let _ = shared.socket.read().send_to(cookie, from);
            shared.stats.drop(DropReason::UnderLoad, || format!("handshake from {from}"));
            return None;
        }
        Err(TunnResult::Err(e)) => {
            shared.stats.drop(DropReason::from_wg(&e), || format!("{}-byte datagram from {from}", datagram.len()));
            return None;
        }
        Err(_) => return None,
    };
    let peer = match packet {
        Packet::HandshakeInit(ref init) => match parse_handshake_anon(&key.static_secret, &key.public, init) {
            Ok(half) => {
                let pk = PublicKey(half.peer_static_public);
                match st.peers.get(&pk) {
                    Some(p) => p.clone(),
                    None => {
                        shared.stats.drop(DropReason::UnknownPeer, || format!("handshake from unknown key {pk} at {from}"));
                        return None;
                    }
                }
            }
            Err(e) => {
                shared.stats.drop(DropReason::from_wg(&e), || format!("handshake from {from}: {e:?}"));
                return None;
            }
        },
        Packet::HandshakeResponse(ref r) => by_index(shared, &st, r.receiver_idx, from)?,
        Packet::PacketCookieReply(ref c) => by_index(shared, &st, c.receiver_idx, from)?,
        Packet::PacketData(ref d) => by_index(shared, &st, d.receiver_idx, from)?,
    };
    Some(peer)
}

#[inline]
fn by_index(shared: &Shared, st: &State, receiver_idx: u32, from: SocketAddr) -> Option<Arc<Peer>> {
    match st.by_index.get(&(receiver_idx >> 8)) {
        Some(p) => Some(p.clone()),
        None => {
            shared.stats.drop(DropReason::UnknownIndex, || format!("index {receiver_idx:#x} from {from}"));
            None
        }
    }
}

/// Timers: handshake retries, rekeys, keepalives, session expiry.
pub(super) fn timer_loop(shared: &Shared) {
    let mut buf = vec![0u8; BUF_LEN];
    let mut last_reset = std::time::Instant::now();
    while !shared.shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        let (peers, limiter) = {
            let st = shared.state.read();
            (st.peers.values().cloned().collect::<Vec<_>>(), st.key.as_ref().map(|k| k.rate_limiter.clone()))
        };
        if last_reset.elapsed() >= Duration::from_secs(1) {
            // The shared limiter counts handshakes per second; the device resets it.
            if let Some(l) = limiter {
                l.reset_count();
            }
            last_reset = std::time::Instant::now();
        }
        let now = shared.now_ms();
        for peer in peers {
            let mut guard = peer.tunn.lock();
            let Some(tunn) = guard.as_mut() else { continue };
            let res = tunn.update_timers(&mut buf);
            shared.send_result(&peer, res);
            let ka = peer.keepalive();
            if ka > 0 && peer.endpoint().is_some() && now.saturating_sub(peer.last_sent_ms()) >= u64::from(ka) * 1000 {
                let res = tunn.encapsulate(&[], &mut buf);
                shared.send_result(&peer, res);
            }
            drop(guard);
            // Keep the wall-clock handshake time fresh while the session lives.
            let _ = peer.last_handshake();
        }
    }
}

pub(super) fn initiate_all(shared: &Shared) {
    let mut buf = vec![0u8; BUF_LEN];
    let peers: Vec<_> = shared.state.read().peers.values().cloned().collect();
    for peer in peers {
        if peer.endpoint().is_none() {
            continue;
        }
        let mut guard = peer.tunn.lock();
        let Some(tunn) = guard.as_mut() else { continue };
        let res = tunn.format_handshake_initiation(&mut buf, false);
        shared.send_result(&peer, res);
    }
}
