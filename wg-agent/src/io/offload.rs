//! TUN segmentation offload, the transmit half (issue 16): a TUN opened
//! with `IFF_VNET_HDR` hands the agent super-packets of up to 64 KiB, each
//! behind a virtio-net header that says how the kernel would have cut it
//! (`gso_type`, `gso_size`) and where a checksum is still owed
//! (`NEEDS_CSUM`). [`segment`] cuts one into the MTU-sized IP packets the
//! kernel's own segmentation would have sent: headers copied and fixed up
//! (lengths, IPv4 ID and checksum, TCP sequence numbers, FIN/PSH only on
//! the last segment, CWR only on the first), every checksum computed.
//!
//! Nothing from the TUN is trusted: a header or packet that does not add up
//! is refused with a reason, never panics and never yields a malformed
//! packet. [`coalesce`] is the receive half (GRO). `io::tun` calls both.

/// `struct virtio_net_hdr` (without `num_buffers`), as the TUN prepends it.
pub const VIRTIO_NET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Below any MSS Linux uses (`tcp_min_snd_mss` is 48): a smaller
/// `gso_size` is bogus.
const MIN_GSO_SIZE: u16 = 8;
/// As many segments as a 64 KiB packet can hold at `MIN_GSO_SIZE`: a peer
/// advertising a small MSS must not stall (the TUN's gso_max_segs is 65535).
const MAX_SEGMENTS: usize = 65_535 / MIN_GSO_SIZE as usize;

/// The virtio-net header, in the host's byte order (TUN's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a super-packet from the TUN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("virtio-net header truncated: {0} bytes")]
    ShortHeader(usize),
    #[error("unsupported gso_type {0:#x}")]
    GsoType(u8),
    #[error("gso_size {0} is out of range")]
    GsoSize(u16),
    #[error("checksum start {start} + offset {offset} lies outside the {len}-byte packet")]
    Checksum { start: u16, offset: u16, len: usize },
    #[error("malformed IP packet: {0}")]
    Ip(&'static str),
    #[error("malformed {0} header")]
    Transport(&'static str),
    #[error("gso_type {gso:#x} does not match the packet (IPv{version}, protocol {protocol})")]
    Mismatch { gso: u8, version: u8, protocol: u8 },
    #[error("{0} segments: more than a 64 KiB packet can hold")]
    TooManySegments(usize),
}

impl VirtioNetHdr {
    pub fn parse(bytes: &[u8]) -> Result<Self, OffloadError> {
        let b = bytes.get(..VIRTIO_NET_HDR_LEN).ok_or(OffloadError::ShortHeader(bytes.len()))?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(Self { flags: b[0], gso_type: b[1], hdr_len: u16_at(2), gso_size: u16_at(4), csum_start: u16_at(6), csum_offset: u16_at(8) })
    }

    pub fn to_bytes(self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Where the IP and transport headers of a packet lie.
struct Layout {
    version: u8,
    ip_len: usize,
    protocol: u8,
    l4_len: usize,
}

fn layout(packet: &[u8]) -> Result<Layout, OffloadError> {
    let first = *packet.first().ok_or(OffloadError::Ip("empty"))?;
    let (version, ip_len, protocol, total) = match first >> 4 {
        4 => {
            if packet.len() < 20 {
                return Err(OffloadError::Ip("IPv4 header truncated"));
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Err(OffloadError::Ip("bad IPv4 header length"));
            }
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
                return Err(OffloadError::Ip("a fragment cannot be segmented"));
            }
            (4, ihl, packet[9], usize::from(u16::from_be_bytes([packet[2], packet[3]])))
        }
        6 => {
            if packet.len() < 40 {
                return Err(OffloadError::Ip("IPv6 header truncated"));
            }
            let (ip_len, protocol) = ipv6_transport(packet)?;
            (6, ip_len, protocol, 40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))
        }
        _ => return Err(OffloadError::Ip("not IPv4 or IPv6")),
    };
    if total != packet.len() {
        return Err(OffloadError::Ip("length field disagrees with the packet"));
    }
    let l4_len = match protocol {
        PROTO_TCP => {
            let off = packet.get(ip_len + 12).ok_or(OffloadError::Transport("TCP"))?;
            let len = usize::from(off >> 4) * 4;
            if len < 20 || packet.len() < ip_len + len {
                return Err(OffloadError::Transport("TCP"));
            }
            len
        }
        PROTO_UDP if packet.len() >= ip_len + 8 => 8,
        PROTO_UDP => return Err(OffloadError::Transport("UDP")),
        _ => 0,
    };
    Ok(Layout { version, ip_len, protocol, l4_len })
}

/// Cuts `packet` (after its virtio-net header `hdr`) into the packets the
/// Where an IPv6 packet's transport header starts, past hop-by-hop and
/// destination options (copied to every segment as they are), and which
/// protocol it is. A routing header is refused (the transport checksum
/// would be over the final destination, not the header's), and so is a
/// fragment (it cannot be cut).
fn ipv6_transport(packet: &[u8]) -> Result<(usize, u8), OffloadError> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DEST_OPTS: u8 = 60;
    let (mut at, mut next) = (40, packet[6]);
    loop {
        match next {
            HOP_BY_HOP | DEST_OPTS => {
                let ext = packet.get(at..at + 2).ok_or(OffloadError::Ip("IPv6 extension header truncated"))?;
                next = ext[0];
                at += (usize::from(ext[1]) + 1) * 8;
                if at > packet.len() {
                    return Err(OffloadError::Ip("IPv6 extension header truncated"));
                }
            }
            ROUTING => return Err(OffloadError::Ip("an IPv6 routing header cannot be segmented")),
            FRAGMENT => return Err(OffloadError::Ip("a fragment cannot be segmented")),
            protocol => return Ok((at, protocol)),
        }
    }
}

/// kernel would have sent, calling `emit` with each in order. A packet
/// without GSO is passed through, its checksum completed when owed.
/// `packet` is the read buffer: an owed checksum is completed in place.
pub fn segment(hdr: &VirtioNetHdr, packet: &mut [u8], mut emit: impl FnMut(&[u8])) -> Result<usize, OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(packet, hdr.csum_start, hdr.csum_offset)?;
        }
        emit(packet);
        return Ok(1);
    }
    let packet = &*packet;
    let l = layout(packet)?;
    let want = match gso {
        GSO_TCPV4 => (4, PROTO_TCP),
        GSO_TCPV6 => (6, PROTO_TCP),
        GSO_UDP_L4 => (l.version, PROTO_UDP),
        GSO_UDP => return Err(OffloadError::GsoType(gso)), // UFO: IP fragmentation, never negotiated
        other => return Err(OffloadError::GsoType(other)),
    };
    if (l.version, l.protocol) != want {
        return Err(OffloadError::Mismatch { gso: hdr.gso_type, version: l.version, protocol: l.protocol });
    }
    let headers = l.ip_len + l.l4_len;
    // The header's own idea of where the transport header starts must agree.
    if usize::from(hdr.csum_start) != l.ip_len {
        return Err(OffloadError::Checksum { start: hdr.csum_start, offset: hdr.csum_offset, len: packet.len() });
    }
    if hdr.gso_size < MIN_GSO_SIZE || usize::from(hdr.gso_size) + headers > 65_535 {
        return Err(OffloadError::GsoSize(hdr.gso_size));
    }
    let payload = &packet[headers..];
    if payload.is_empty() {
        return Err(OffloadError::Transport("segmentation offload without payload"));
    }
    let mss = usize::from(hdr.gso_size);
    let count = payload.len().div_ceil(mss);
    if count > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments(count));
    }
    let mut seg = Vec::with_capacity(headers + mss);
    let seq0 = (l.protocol == PROTO_TCP).then(|| be32(packet, l.ip_len + 4));
    let id0 = (l.version == 4).then(|| be16(packet, 4));
    for (i, chunk) in payload.chunks(mss).enumerate() {
        seg.clear();
        seg.extend_from_slice(&packet[..headers]);
        seg.extend_from_slice(chunk);
        let len = seg.len();
        if let Some(id) = id0 {
            put16(&mut seg, 2, len as u16);
            put16(&mut seg, 4, id.wrapping_add(i as u16));
            set_ipv4_checksum(&mut seg, l.ip_len);
        } else {
            put16(&mut seg, 4, (len - 40) as u16);
        }
        let t = l.ip_len;
        if let Some(seq) = seq0 {
            put32(&mut seg, t + 4, seq.wrapping_add((i * mss) as u32));
            let last = i + 1 == count;
            if !last {
                seg[t + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[t + 13] &= !TCP_CWR;
            }
            put16(&mut seg, t + 16, 0);
        } else {
            put16(&mut seg, t + 4, (len - t) as u16);
            put16(&mut seg, t + 6, 0);
        }
        let c = transport_checksum(&seg, l.version, l.protocol, t);
        put16(&mut seg, t + if l.protocol == PROTO_TCP { 16 } else { 6 }, c);
        emit(&seg);
    }
    Ok(count)
}

/// One super-packet being built by [`coalesce`]: the first segment's
/// headers, then every merged payload.
struct Merge {
    buf: Vec<u8>,
    ip_len: usize,
    headers: usize,
    version: u8,
    protocol: u8,
    gso_size: usize,
    segments: usize,
    /// TCP: the sequence number the next segment must carry.
    next_seq: u32,
}

/// The kernel's limit on datagrams in one UDP super-packet (UDP_MAX_SEGMENTS).
const MAX_UDP_SEGMENTS: usize = 64;

/// Coalesces decrypted packets for the TUN (the receive half): TCP segments
/// of one flow that follow each other back to back (same headers and
/// options, contiguous sequence numbers, IPv4 IDs counting up, every
/// segment's checksum valid) become one super-packet behind a virtio-net
/// header, so the kernel's TCP stack sees few, large packets. With `udp`
/// (a kernel that takes UDP super-packets, Linux 6.2+), datagrams of one
/// flow do too: same size but the last, checksums valid and not zero; the
/// kernel cuts them back into the same datagrams for the socket.
/// Everything else passes as it came. Order within a flow is kept; `emit`
/// is called with each result in the order its first packet arrived.
pub fn coalesce<'a>(packets: impl IntoIterator<Item = &'a [u8]>, udp: bool, mut emit: impl FnMut(&VirtioNetHdr, &[u8])) {
    let mut out: Vec<Result<Merge, &'a [u8]>> = Vec::new();
    // Indices into `out` of the merges that may still grow: few flows per
    // batch, so a linear search over them is cheapest, and a batch of
    // pure ACKs never scans what came before.
    let mut live: Vec<usize> = Vec::new();
    for p in packets {
        let Some(l) = tcp_segment(p).or_else(|| udp.then(|| udp_datagram(p)).flatten()) else {
            // Nothing of its flow may be merged past it (a pure ACK, a FIN):
            // close the flow's open super-packet, as GRO flushes it.
            live.retain(|&i| !matches!(&out[i], Ok(m) if same_flow(&m.buf, m.ip_len, m.version, p)));
            out.push(Err(p));
            continue;
        };
        let tcp = l.protocol == PROTO_TCP;
        let payload = &p[l.ip_len + l.l4_len..];
        let seq = if tcp { be32(p, l.ip_len + 4) } else { 0 };
        let psh = tcp && p[l.ip_len + 13] & TCP_PSH != 0;
        let open = live.iter().rposition(|&i| matches!(&out[i], Ok(m) if same_flow(&m.buf, m.ip_len, m.version, p)));
        if let Some(k) = open {
            let Ok(m) = &mut out[live[k]] else { unreachable!("live holds merges only") };
            if m.next_seq == seq
                && payload.len() <= m.gso_size
                && m.buf.len() + payload.len() <= 65_535
                && (tcp || m.segments < MAX_UDP_SEGMENTS)
                && m.headers == l.ip_len + l.l4_len
                && headers_follow(m, p)
            {
                if m.segments == 1 {
                    // It grows: room for a whole super-packet, once.
                    m.buf.reserve(65_535 - m.buf.len());
                }
                m.buf.extend_from_slice(payload);
                m.segments += 1;
                m.next_seq = if tcp { seq.wrapping_add(payload.len() as u32) } else { 0 };
                if psh {
                    let t = m.ip_len + 13;
                    m.buf[t] |= TCP_PSH;
                }
                if payload.len() < m.gso_size || psh {
                    live.remove(k);
                }
                continue;
            }
            // This packet does not follow on: nothing after it may join
            // the earlier super-packet either.
            live.remove(k);
        }
        if !psh {
            live.push(out.len());
        }
        out.push(Ok(Merge {
            buf: p.to_vec(),
            ip_len: l.ip_len,
            headers: l.ip_len + l.l4_len,
            version: l.version,
            protocol: l.protocol,
            gso_size: payload.len(),
            segments: 1,
            next_seq: if tcp { seq.wrapping_add(payload.len() as u32) } else { 0 },
        }));
    }
    for item in out {
        match item {
            Err(p) => emit(&VirtioNetHdr::default(), p),
            Ok(m) if m.segments == 1 => emit(&VirtioNetHdr::default(), &m.buf),
            Ok(mut m) => {
                let hdr = finish(&mut m);
                emit(&hdr, &m.buf);
            }
        }
    }
}

/// The layout of a UDP datagram that may be merged: a payload, a length
/// field that agrees, and a checksum that is present and valid.
fn udp_datagram(p: &[u8]) -> Option<Layout> {
    let l = layout(p).ok()?;
    if l.protocol != PROTO_UDP || p.len() == l.ip_len + 8 || usize::from(be16(p, l.ip_len + 4)) != p.len() - l.ip_len {
        return None;
    }
    if l.version == 6 && l.ip_len != 40 {
        return None;
    }
    if be16(p, l.ip_len + 6) == 0 || (l.version == 4 && fold(sum(&p[..l.ip_len], 0)) != 0xffff) {
        return None;
    }
    (transport_sum(p, l.version, PROTO_UDP, l.ip_len) == 0xffff).then_some(l)
}

/// The layout of a TCP segment that may be merged: plain ACK (PSH allowed),
/// a payload, and a valid checksum (a corrupt segment is never hidden
/// inside a super-packet whose checksum the kernel will trust).
fn tcp_segment(p: &[u8]) -> Option<Layout> {
    let l = layout(p).ok()?;
    if l.protocol != PROTO_TCP || p.len() == l.ip_len + l.l4_len {
        return None;
    }
    if p[l.ip_len + 13] & !(TCP_PSH | 0x10) != 0 || p[l.ip_len + 13] & 0x10 == 0 {
        return None;
    }
    if l.version == 6 && p[6] != PROTO_TCP {
        return None;
    }
    // A bad IPv4 header checksum would be silently repaired by merging.
    if l.version == 4 && fold(sum(&p[..l.ip_len], 0)) != 0xffff {
        return None;
    }
    (transport_sum(p, l.version, PROTO_TCP, l.ip_len) == 0xffff).then_some(l)
}

/// Whether `p` belongs to the flow of the merge whose first packet is `first`.
fn same_flow(first: &[u8], ip_len: usize, version: u8, p: &[u8]) -> bool {
    if p.len() < ip_len + 4 || p[0] >> 4 != version {
        return false;
    }
    let (addrs, proto) = if version == 4 { (12..20, 9) } else { (8..40, 6) };
    first[proto] == p[proto] && first[addrs.clone()] == p[addrs] && first[ip_len..ip_len + 4] == p[ip_len..ip_len + 4]
}

/// Whether `p`'s headers are those it must carry to follow merge `m`: the
/// first packet's, with the fields that differ packet to packet taken from
/// `p` once they are what they should be (IPv4 length, ID and checksum;
/// IPv6 length; TCP sequence number, PSH and checksum; UDP length and
/// checksum). The caller has checked that both have `m.headers` bytes of
/// headers.
fn headers_follow(m: &Merge, p: &[u8]) -> bool {
    let (first, ip_len) = (&m.buf, m.ip_len);
    // At most a 60-byte IPv4 header and a 60-byte TCP header: no allocation.
    let mut h = [0u8; 120];
    let h = &mut h[..m.headers];
    h.copy_from_slice(&first[..m.headers]);
    if m.version == 4 {
        let id = be16(first, 4).wrapping_add(m.segments as u16);
        if be16(p, 4) != id {
            return false;
        }
        h[2..6].copy_from_slice(&p[2..6]);
        h[10..12].copy_from_slice(&p[10..12]);
    } else {
        h[4..6].copy_from_slice(&p[4..6]);
    }
    if m.protocol == PROTO_TCP {
        h[ip_len + 4..ip_len + 8].copy_from_slice(&p[ip_len + 4..ip_len + 8]);
        h[ip_len + 13] = (h[ip_len + 13] & !TCP_PSH) | (p[ip_len + 13] & TCP_PSH);
        h[ip_len + 16..ip_len + 18].copy_from_slice(&p[ip_len + 16..ip_len + 18]);
    } else {
        h[ip_len + 4..ip_len + 8].copy_from_slice(&p[ip_len + 4..ip_len + 8]);
    }
    *h == p[..m.headers]
}

/// Fixes the super-packet's lengths and leaves the pseudo-header sum in
/// the transport checksum field (CHECKSUM_PARTIAL): the kernel finishes it.
fn finish(m: &mut Merge) -> VirtioNetHdr {
    let len = m.buf.len();
    let t = m.ip_len;
    if m.version == 4 {
        put16(&mut m.buf, 2, len as u16);
        set_ipv4_checksum(&mut m.buf, t);
    } else {
        put16(&mut m.buf, 4, (len - 40) as u16);
    }
    let tcp = m.protocol == PROTO_TCP;
    if !tcp {
        put16(&mut m.buf, t + 4, (len - t) as u16);
    }
    let partial = fold(pseudo_sum(&m.buf, m.version, m.protocol, t));
    let csum_offset = if tcp { 16 } else { 6 };
    put16(&mut m.buf, t + csum_offset, partial);
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (tcp, m.version) {
            (true, 4) => GSO_TCPV4,
            (true, _) => GSO_TCPV6,
            (false, _) => GSO_UDP_L4,
        },
        hdr_len: m.headers as u16,
        gso_size: m.gso_size as u16,
        csum_start: t as u16,
        csum_offset: csum_offset as u16,
    }
}

/// The folded sum over a TCP or UDP segment with its pseudo-header: 0xffff
/// when its checksum is right.
fn transport_sum(p: &[u8], version: u8, protocol: u8, t: usize) -> u16 {
    fold(sum(&p[t..], pseudo_sum(p, version, protocol, t)))
}

/// Completes a partial checksum: the field at `start + offset` holds the
/// pseudo-header sum; the checksum covers everything from `start`.
fn complete_checksum(p: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let (s, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > p.len() {
        return Err(OffloadError::Checksum { start, offset, len: p.len() });
    }
    let mut c = !fold(sum(&p[s..], 0));
    // UDP sends a computed zero as all ones (zero means "no checksum").
    if c == 0 && layout(p).is_ok_and(|l| l.protocol == PROTO_UDP) {
        c = 0xffff;
    }
    put16(p, at, c);
    Ok(())
}

/// The unfolded sum of the pseudo-header of `p`'s transport segment
/// (which starts at `t` and runs to the end): addresses, protocol, length.
fn pseudo_sum(p: &[u8], version: u8, protocol: u8, t: usize) -> u32 {
    let addrs = if version == 4 { &p[12..20] } else { &p[8..40] };
    sum(addrs, u32::from(protocol) + (p.len() - t) as u32)
}

/// Recomputes the IPv4 header checksum of `p`, whose header is `ihl` bytes.
fn set_ipv4_checksum(p: &mut [u8], ihl: usize) {
    put16(p, 10, 0);
    let c = !fold(sum(&p[..ihl], 0));
    put16(p, 10, c);
}

/// The TCP or UDP checksum of `seg` (its field zeroed), pseudo-header included.
fn transport_checksum(seg: &[u8], version: u8, protocol: u8, t: usize) -> u16 {
    let c = !fold(sum(&seg[t..], pseudo_sum(seg, version, protocol, t)));
    if protocol == PROTO_UDP && c == 0 { 0xffff } else { c }
}

/// The ones'-complement sum of big-endian 16-bit words, not yet folded.
/// It runs over every byte of every packet, so it takes eight bytes at a
/// time in the machine's own order: the sum is byte-order independent
/// (RFC 1071), so one swap at the end gives the big-endian result.
fn sum(bytes: &[u8], init: u32) -> u32 {
    let mut acc = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // Two 32-bit halves: at most 2^33 per step, 2^46 for 64 KiB.
        acc += (w & 0xffff_ffff) + (w >> 32);
    }
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        // An odd last byte is the high half of a big-endian word.
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u32::from(u16::from_be(acc as u16)) + init
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(p: &mut [u8], at: usize, v: u32) {
    p[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    /// The sum word by word, as RFC 1071 states it: what the fast one must equal.
    fn naive_sum(bytes: &[u8], init: u32) -> u16 {
        let mut acc = u64::from(init);
        for w in bytes.chunks(2) {
            acc += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        fold((acc & 0xffff_ffff) as u32 + (acc >> 32) as u32)
    }

    #[test]
    fn the_fast_sum_is_the_rfc_1071_sum_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let ones = vec![0xffu8; 65_535];
        for len in (0..80).chain([1419, 1420, 1421, 65_534, 65_535]) {
            for start in 0..9 {
                let b = &data[start..start + len];
                assert_eq!(fold(sum(b, 0)), naive_sum(b, 0), "len {len} at {start}");
                assert_eq!(fold(sum(b, 0x1_2345)), naive_sum(b, 0x1_2345), "len {len} at {start} with init");
            }
            assert_eq!(fold(sum(&ones[..len], 7)), naive_sum(&ones[..len], 7), "all ones, len {len}");
        }
    }

    /// A super-packet as the kernel hands it over: one IP header, one
    /// transport header, `payload` bytes, the transport checksum field
    /// holding only the pseudo-header sum (CHECKSUM_PARTIAL).
    fn super_packet(v6: bool, tcp: bool, payload: usize, flags: u8) -> (VirtioNetHdr, Vec<u8>) {
        let data: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
        let builder = if v6 {
            etherparse::PacketBuilder::ipv6(
                [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
        } else {
            etherparse::PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
        };
        let mut out = Vec::new();
        if tcp {
            let mut b = builder.tcp(40000, 8080, 1_000_000, 65535).ack(77);
            if flags & TCP_PSH != 0 {
                b = b.psh();
            }
            if flags & TCP_FIN != 0 {
                b = b.fin();
            }
            if flags & TCP_CWR != 0 {
                b = b.cwr();
            }
            b.write(&mut out, &data).unwrap();
        } else {
            builder.udp(40000, 8080).write(&mut out, &data).unwrap();
        }
        let ip_len = if v6 { 40 } else { 20 };
        if !v6 {
            put16(&mut out, 4, 0x1234);
            set_ipv4_checksum(&mut out, 20);
        }
        let (field, l4) = if tcp { (ip_len + 16, 20) } else { (ip_len + 6, 8) };
        // Only the pseudo-header sum, as CHECKSUM_PARTIAL leaves it.
        let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
        let partial = fold(pseudo_sum(&out, if v6 { 6 } else { 4 }, proto, ip_len));
        put16(&mut out, field, partial);
        let gso_type = match (v6, tcp) {
            (false, true) => GSO_TCPV4,
            (true, true) => GSO_TCPV6,
            _ => GSO_UDP_L4,
        };
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (ip_len + l4) as u16,
            gso_size: 1000,
            csum_start: ip_len as u16,
            csum_offset: if tcp { 16 } else { 6 },
        };
        (hdr, out)
    }

    fn cut(hdr: &VirtioNetHdr, p: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        segment(hdr, &mut p.to_vec(), |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    /// Checks a segment with an independent parser and checksum code.
    fn verify(seg: &[u8]) -> (Vec<u8>, Option<etherparse::TcpHeader>) {
        let parsed = SlicedPacket::from_ip(seg).expect("parses");
        let (payload, tcp) = match parsed.transport.expect("transport") {
            TransportSlice::Tcp(t) => {
                let h = t.to_header();
                let want = match parsed.net.as_ref().unwrap() {
                    NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), t.payload()).unwrap(),
                    NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), t.payload()).unwrap(),
                };
                assert_eq!(h.checksum, want, "TCP checksum");
                (t.payload().to_vec(), Some(h))
            }
            TransportSlice::Udp(u) => {
                let h = u.to_header();
                let want = match parsed.net.as_ref().unwrap() {
                    NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), u.payload()).unwrap(),
                    NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), u.payload()).unwrap(),
                };
                assert_eq!(h.checksum, want, "UDP checksum");
                assert_eq!(usize::from(h.length), 8 + u.payload().len());
                (u.payload().to_vec(), None)
            }
            other => panic!("unexpected {other:?}"),
        };
        if let Some(NetSlice::Ipv4(ip)) = parsed.net {
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
        }
        (payload, tcp)
    }

    #[test]
    fn tcp_segments_are_what_the_kernel_would_send() {
        for v6 in [false, true] {
            let (hdr, p) = super_packet(v6, true, 2500, TCP_PSH | TCP_FIN | TCP_CWR);
            let segs = cut(&hdr, &p).unwrap();
            assert_eq!(segs.len(), 3);
            let mut data = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let (payload, tcp) = verify(s);
                let tcp = tcp.unwrap();
                assert_eq!(payload.len(), [1000, 1000, 500][i]);
                assert_eq!(tcp.sequence_number, 1_000_000 + 1000 * i as u32, "v6={v6} seg {i}");
                assert_eq!(tcp.acknowledgment_number, 77);
                let last = i == 2;
                assert_eq!((tcp.psh, tcp.fin), (last, last), "PSH/FIN only on the last segment");
                assert_eq!(tcp.cwr, i == 0, "CWR only on the first segment");
                assert!(tcp.ack);
                if !v6 {
                    assert_eq!(be16(s, 4), 0x1234 + i as u16, "IPv4 IDs count up");
                }
                data.extend(payload);
            }
            assert_eq!(data, p[if v6 { 60 } else { 40 }..], "payload kept in order");
        }
    }

    #[test]
    fn udp_segments_each_carry_their_own_length_and_checksum() {
        for v6 in [false, true] {
            let (hdr, p) = super_packet(v6, false, 2001, 0);
            let segs = cut(&hdr, &p).unwrap();
            assert_eq!(segs.iter().map(|s| verify(s).0.len()).collect::<Vec<_>>(), [1000, 1000, 1]);
        }
    }

    #[test]
    fn a_packet_without_gso_has_its_checksum_completed_or_passes_as_is() {
        let (mut hdr, p) = super_packet(false, true, 300, TCP_PSH);
        hdr.gso_type = GSO_NONE;
        let segs = cut(&hdr, &p).unwrap();
        assert_eq!(segs.len(), 1);
        verify(&segs[0]);
        hdr.flags = 0;
        assert_eq!(cut(&hdr, &p).unwrap(), std::slice::from_ref(&p), "nothing owed, nothing changed");
        // An exact multiple of gso_size and a payload smaller than it.
        let (hdr, p) = super_packet(true, true, 2000, 0);
        assert_eq!(cut(&hdr, &p).unwrap().len(), 2);
        let (hdr, p) = super_packet(true, true, 10, 0);
        assert_eq!(cut(&hdr, &p).unwrap().len(), 1);
    }

    /// Coalesced for a kernel that takes UDP super-packets too.
    fn merge(packets: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        merge_with(packets, true)
    }

    fn merge_with(packets: &[Vec<u8>], udp: bool) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut out = Vec::new();
        coalesce(packets.iter().map(Vec::as_slice), udp, |h, p| out.push((*h, p.to_vec())));
        out
    }

    #[test]
    fn udp_datagrams_of_one_flow_coalesce_and_cut_back_exactly() {
        for v6 in [false, true] {
            let (hdr, p) = super_packet(v6, false, 4500, 0);
            let segs = cut(&hdr, &p).unwrap();
            assert_eq!(segs.len(), 5);
            let merged = merge(&segs);
            assert_eq!(merged.len(), 1, "v6={v6}: one super-packet");
            let (h, big) = &merged[0];
            assert_eq!((h.gso_type, h.gso_size, h.flags, h.csum_offset), (GSO_UDP_L4, 1000, F_NEEDS_CSUM, 6));
            assert_eq!(cut(h, big).unwrap(), segs, "v6={v6}: the kernel would cut it into the same datagrams");
            // A kernel without UDP segmentation offload gets them one by one.
            assert_eq!(merge_with(&segs, false).len(), 5);
        }
        let (hdr, p) = super_packet(false, false, 3000, 0);
        let segs = cut(&hdr, &p).unwrap();
        // No checksum (zero, allowed for IPv4) or a bad one: never merged.
        let mut zero = segs[1].clone();
        put16(&mut zero, 26, 0);
        assert_eq!(merge(&[segs[0].clone(), zero]).len(), 2, "a datagram without a checksum stays apart");
        let mut bad = segs[1].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(merge(&[segs[0].clone(), bad]).len(), 2, "a corrupt datagram is not hidden in a super-packet");
        // At most 64 datagrams per super-packet (UDP_MAX_SEGMENTS).
        let (mut hdr, p) = super_packet(false, false, 6600, 0);
        hdr.gso_size = 100;
        let segs = cut(&hdr, &p).unwrap();
        let merged = merge(&segs);
        assert_eq!(merged.len(), 2);
        assert_eq!(cut(&merged[0].0, &merged[0].1).unwrap(), segs[..64]);
        assert_eq!(cut(&merged[1].0, &merged[1].1).unwrap(), segs[64..]);
    }

    #[test]
    fn coalescing_then_segmenting_gives_back_exactly_the_segments() {
        for v6 in [false, true] {
            let (hdr, p) = super_packet(v6, true, 4321, TCP_PSH);
            let segs = cut(&hdr, &p).unwrap();
            let merged = merge(&segs);
            assert_eq!(merged.len(), 1, "v6={v6}: one super-packet");
            let (h, big) = &merged[0];
            assert_eq!((h.gso_type, h.gso_size, h.flags), (if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, 1000, F_NEEDS_CSUM));
            assert_eq!(cut(h, big).unwrap(), segs, "v6={v6}: the kernel would cut it into the same packets");
        }
    }

    #[test]
    fn coalescing_keeps_flows_apart_and_in_order_and_merges_only_what_follows() {
        let (hdr, a) = super_packet(false, true, 3000, 0);
        let a = cut(&hdr, &a).unwrap();
        let (hdr6, b) = super_packet(true, true, 2000, 0);
        let b = cut(&hdr6, &b).unwrap();
        let (hdr_u, u) = super_packet(false, false, 500, 0);
        let u = cut(&hdr_u, &u).unwrap();
        // Interleaved flows and a UDP datagram between them.
        let batch = vec![a[0].clone(), b[0].clone(), u[0].clone(), a[1].clone(), b[1].clone(), a[2].clone()];
        let out = merge(&batch);
        assert_eq!(out.len(), 3, "a, b, and the datagram as it came");
        assert_eq!(cut(&out[0].0, &out[0].1).unwrap(), a);
        assert_eq!(cut(&out[1].0, &out[1].1).unwrap(), b);
        assert_eq!((out[2].0, &out[2].1), (VirtioNetHdr::default(), &u[0]));
        // A gap, a reordering, a different ACK, a bad checksum, a FIN: never merged across.
        let gap = merge(&[a[0].clone(), a[2].clone()]);
        assert_eq!(gap.len(), 2);
        let reordered = merge(&[a[1].clone(), a[0].clone()]);
        assert_eq!(reordered.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), [a[1].clone(), a[0].clone()]);
        let mut other_ack = a[1].clone();
        other_ack[20 + 8 + 3] ^= 1;
        refresh_checksums(&mut other_ack);
        assert_eq!(merge(&[a[0].clone(), other_ack]).len(), 2, "different ACK");
        let mut corrupt = a[1].clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let out = merge(&[a[0].clone(), corrupt.clone()]);
        assert_eq!(out.len(), 2, "a corrupt segment is not hidden in a super-packet");
        assert_eq!(out[1].1, corrupt, "it passes as it came, for the kernel to drop");
        // A pure ACK of the same flow between two segments: nothing passes it.
        let mut ack = a[0][..40].to_vec();
        put16(&mut ack, 2, 40);
        refresh_checksums(&mut ack);
        let out = merge(&[a[0].clone(), ack.clone(), a[1].clone()]);
        assert_eq!(out.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), [a[0].clone(), ack, a[1].clone()], "order kept");
        // A bad IPv4 header checksum is not repaired by merging.
        let mut bad_ip = a[1].clone();
        bad_ip[10] ^= 0xff;
        assert_eq!(merge(&[a[0].clone(), bad_ip]).len(), 2);
        let (hdr, fin) = super_packet(false, true, 2000, TCP_FIN);
        let fin = cut(&hdr, &fin).unwrap();
        assert_eq!(merge(&fin).len(), 2, "the FIN segment stays apart");
        // A short segment ends a super-packet, even when the next follows on.
        let (hdr, short) = super_packet(false, true, 1500, 0);
        let mut segs = cut(&hdr, &short).unwrap();
        let mut next = segs[0].clone();
        put32(&mut next, 24, 1_000_000 + 1500);
        put16(&mut next, 4, 0x1234 + 2);
        refresh_checksums(&mut next);
        segs.push(next.clone());
        let out = merge(&segs);
        assert_eq!(out.iter().map(|(h, _)| h.gso_type).collect::<Vec<_>>(), [GSO_TCPV4, GSO_NONE], "1000+500, then 1000 alone");
        assert_eq!(out[1].1, next);
        // The same segment with an IPv4 ID out of step is not merged either.
        let (hdr, p) = super_packet(false, true, 2000, 0);
        let mut segs = cut(&hdr, &p).unwrap();
        put16(&mut segs[1], 4, 0x9999);
        refresh_checksums(&mut segs[1]);
        assert_eq!(merge(&segs).len(), 2, "IPv4 IDs must count up");
    }

    fn refresh_checksums(p: &mut [u8]) {
        set_ipv4_checksum(p, 20);
        put16(p, 36, 0);
        let c = transport_checksum(p, 4, PROTO_TCP, 20);
        put16(p, 36, c);
    }

    #[test]
    fn malformed_headers_and_packets_are_refused_never_cut() {
        let (hdr, p) = super_packet(false, true, 2500, 0);
        assert!(matches!(VirtioNetHdr::parse(&[0; 9]), Err(OffloadError::ShortHeader(9))));
        assert_eq!(VirtioNetHdr::parse(&hdr.to_bytes()).unwrap(), hdr);
        let bad = |h: VirtioNetHdr, p: &[u8]| cut(&h, p).unwrap_err();
        assert!(matches!(bad(VirtioNetHdr { gso_size: 0, ..hdr }, &p), OffloadError::GsoSize(0)));
        assert!(matches!(bad(VirtioNetHdr { gso_type: GSO_TCPV6, ..hdr }, &p), OffloadError::Mismatch { .. }));
        assert!(matches!(bad(VirtioNetHdr { gso_type: GSO_UDP, ..hdr }, &p), OffloadError::GsoType(GSO_UDP)));
        assert!(matches!(bad(VirtioNetHdr { gso_type: 9, ..hdr }, &p), OffloadError::GsoType(9)));
        assert!(matches!(bad(VirtioNetHdr { csum_start: 30, ..hdr }, &p), OffloadError::Checksum { .. }));
        assert!(matches!(bad(VirtioNetHdr { gso_type: GSO_NONE, csum_offset: 60_000, ..hdr }, &p), OffloadError::Checksum { .. }));
        assert!(matches!(bad(VirtioNetHdr { gso_size: 7, ..hdr }, &p), OffloadError::GsoSize(7)));
        // A tiny MSS is still cut, not refused: 2500 bytes at 8 a segment.
        let tiny = cut(&VirtioNetHdr { gso_size: 8, ..hdr }, &p).unwrap();
        assert_eq!(tiny.len(), 313);
        tiny.iter().for_each(|s| drop(verify(s)));
        // The packet itself: truncated, lying about its length, a fragment, bad TCP offset, not IP.
        assert!(matches!(bad(hdr, &p[..p.len() - 1]), OffloadError::Ip(_)));
        assert!(matches!(bad(hdr, &p[..30]), OffloadError::Ip(_)));
        let mut frag = p.clone();
        frag[6] |= 0x20;
        assert!(matches!(bad(hdr, &frag), OffloadError::Ip(_)));
        let mut off = p.clone();
        off[20 + 12] = 0x10;
        assert!(matches!(bad(hdr, &off), OffloadError::Transport("TCP")));
        assert!(matches!(bad(hdr, &[0x55; 64]), OffloadError::Ip(_)));
        assert!(matches!(bad(hdr, &[]), OffloadError::Ip(_)));
        // Any byte string is refused or cut into packets that parse: never a panic.
        let mut x = 0x9e37_79b9u32;
        for _ in 0..20_000 {
            let mut q = p.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = (x as usize) % q.len();
                q[at] = (x >> 24) as u8;
            }
            let mut h = hdr;
            h.gso_size = (x % 2000) as u16;
            let _ = segment(&h, &mut q, |s| {
                SlicedPacket::from_ip(s).expect("a segment that parses");
            });
        }
    }

    #[test]
    fn ipv6_options_headers_ride_along_and_a_routing_header_is_refused() {
        let (mut hdr, p) = super_packet(true, true, 2500, 0);
        // Insert 8 bytes of destination options (PadN) between the fixed
        // header and TCP, as a sender with IPV6_DSTOPTS would.
        let mut q = p[..40].to_vec();
        q.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        q.extend_from_slice(&p[40..]);
        q[6] = 60;
        let len = q.len();
        put16(&mut q, 4, (len - 40) as u16);
        let partial = fold(pseudo_sum(&q, 6, PROTO_TCP, 48));
        put16(&mut q, 48 + 16, partial);
        hdr.csum_start = 48;
        hdr.hdr_len += 8;
        let segs = cut(&hdr, &q).unwrap();
        assert_eq!(segs.len(), 3);
        let mut data = Vec::new();
        for s in &segs {
            assert_eq!(&s[40..48], &q[40..48], "the options are in every segment");
            assert_eq!(usize::from(be16(s, 4)), s.len() - 40);
            assert_eq!(transport_sum(s, 6, PROTO_TCP, 48), 0xffff, "TCP checksum over the right bytes");
            SlicedPacket::from_ip(s).expect("parses");
            data.extend_from_slice(&s[48 + 20..]);
        }
        assert_eq!(data, p[60..]);
        // Not merged back (options are rare; they go up one by one).
        assert_eq!(merge(&segs).len(), 3);
        let bad = |h: VirtioNetHdr, p: &[u8]| cut(&h, p).unwrap_err();
        let mut routed = q.clone();
        routed[6] = 43;
        assert!(matches!(bad(hdr, &routed), OffloadError::Ip(_)), "routing header");
        let mut frag = q.clone();
        frag[6] = 44;
        assert!(matches!(bad(hdr, &frag), OffloadError::Ip(_)), "fragment header");
        let mut short = q.clone();
        short[41] = 200; // an options header that swallows the TCP header
        assert!(cut(&hdr, &short).is_err());
        let truncated = &q[..44]; // the options header itself cut short
        assert!(matches!(bad(hdr, truncated), OffloadError::Ip(_)));
    }

    /// A tiny xorshift: the mutation fuzzers' reproducible randomness.
    fn next(x: &mut u32) -> u32 {
        *x ^= *x << 13;
        *x ^= *x >> 17;
        *x ^= *x << 5;
        *x
    }

    #[test]
    fn mutated_headers_and_packets_of_every_kind_never_panic_segment() {
        let mut x = 0x1234_5678u32;
        for (v6, tcp) in [(false, true), (true, true), (false, false), (true, false)] {
            let (hdr, p) = super_packet(v6, tcp, 3000, 0);
            for round in 0..5_000 {
                let mut q = p.clone();
                for _ in 0..(1 + next(&mut x) % 4) {
                    let at = next(&mut x) as usize % q.len();
                    q[at] = (next(&mut x) >> 24) as u8;
                }
                let mut h = hdr;
                match round % 4 {
                    0 => h.gso_type = GSO_NONE,
                    1 => h.csum_start = (next(&mut x) % 80) as u16,
                    2 => h.csum_offset = (next(&mut x) % 80) as u16,
                    _ => h.gso_size = (next(&mut x) % 3000) as u16,
                }
                let len = q.len();
                let _ = segment(&h, &mut q, |s| {
                    if h.gso_type == GSO_NONE {
                        // A plain packet is the kernel's own, passed on as it
                        // came (its checksum finished when owed), as without
                        // offloads: the receiver judges it.
                        assert_eq!(s.len(), len);
                    } else {
                        SlicedPacket::from_ip(s).expect("a segment that parses");
                    }
                });
            }
        }
    }

    /// What a peer can feed the receive half: mutated segments of several
    /// flows, in any order. Never a panic, and every super-packet it builds
    /// is one the transmit half (the kernel's rules) accepts and cuts back.
    #[test]
    fn mutated_decrypted_packets_never_panic_coalesce_and_every_super_packet_cuts() {
        let mut x = 0x0bad_cafeu32;
        let mut pool = Vec::new();
        for (v6, tcp) in [(false, true), (true, true), (false, false), (true, false)] {
            let (hdr, p) = super_packet(v6, tcp, 5000, 0);
            pool.extend(cut(&hdr, &p).unwrap());
        }
        for _ in 0..3_000 {
            let mut batch: Vec<Vec<u8>> = Vec::new();
            for _ in 0..(1 + next(&mut x) % 12) {
                let mut q = pool[next(&mut x) as usize % pool.len()].clone();
                if next(&mut x).is_multiple_of(3) {
                    let at = next(&mut x) as usize % q.len();
                    q[at] = (next(&mut x) >> 24) as u8;
                }
                if next(&mut x).is_multiple_of(7) {
                    q.truncate(next(&mut x) as usize % q.len());
                }
                batch.push(q);
            }
            for (h, p) in merge(&batch) {
                if h.gso_type != GSO_NONE {
                    cut(&h, &p).unwrap_or_else(|e| panic!("a super-packet the kernel would refuse: {e}"));
                }
            }
        }
    }
}
