//! The host's UDP stack: one dual-stack socket per listen port, with the
//! kernel's batching: UDP GSO (one `sendmsg` carries many same-size
//! datagrams), UDP GRO (one receive slot holds many datagrams of one
//! sender, coalesced by the kernel) and `recvmmsg` (one call returns every
//! slot waiting).

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, MsgHdr, Protocol, SockAddr, Socket, Type};

use super::{Network, POLL_INTERVAL, RecvBatch, UdpIo};

// From <linux/udp.h>.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// The kernel's limit on segments in one GSO send (UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Socket buffers large enough that a burst from the TUN side is not dropped
/// by the kernel before the receive loop gets to it.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The host's network stack. `gro: false` receives one datagram per slot.
#[derive(Debug, Clone, Copy)]
pub struct HostNetwork {
    pub gro: bool,
}

impl Default for HostNetwork {
    fn default() -> Self {
        Self { gro: true }
    }
}

pub struct HostUdp {
    socket: Socket,
    /// Dual-stack IPv6 socket: IPv4 peers are addressed as `::ffff:a.b.c.d`.
    dual_stack: bool,
    port: u16,
    /// Cleared the first time the kernel refuses a GSO send; then datagrams
    /// go one by one.
    gso: AtomicBool,
    /// The kernel agreed to coalesce received datagrams (Linux 5.0+).
    gro: bool,
}

impl Network for HostNetwork {
    fn bind(&self, port: u16, fwmark: u32) -> io::Result<Arc<dyn UdpIo>> {
        let udp = HostUdp::bind(port, fwmark)?;
        let udp = if self.gro { udp.with_gro() } else { udp };
        Ok(Arc::new(udp))
    }
}

// === impl HostUdp ===

impl HostUdp {
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        // Prefer one dual-stack socket; fall back to IPv4 where IPv6 is off.
        let (socket, dual_stack) = match Self::socket(Domain::IPV6) {
            Ok(s) => {
                s.set_only_v6(false)?;
                s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)))?;
                (s, true)
            }
            Err(_) => {
                let s = Self::socket(Domain::IPV4)?;
                s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port)))?;
                (s, false)
            }
        };
        if fwmark != 0 {
            socket.set_mark(fwmark)?;
        }
        let port = socket.local_addr()?.as_socket().map(|a| a.port()).ok_or_else(|| io::Error::other("bound socket has no address"))?;
        Ok(Self { socket, dual_stack, port, gso: AtomicBool::new(true), gro: false })
    }

    /// Asks the kernel to coalesce received datagrams; without it (an old
    /// kernel) each slot holds one, as before. Logged either way.
    #[allow(unsafe_code)]
    pub fn with_gro(mut self) -> Self {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one int through the pointer, for the length given.
        let rc = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                SOL_UDP,
                UDP_GRO,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        self.gro = rc == 0;
        match self.gro {
            true => tracing::debug!(port = self.port, "UDP GRO on"),
            false => {
                tracing::info!(port = self.port, error = %io::Error::last_os_error(), "UDP GRO unavailable; one datagram per receive slot")
            }
        }
        self
    }

    pub fn gro(&self) -> bool {
        self.gro
    }

    fn socket(domain: Domain) -> io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        s.set_read_timeout(Some(POLL_INTERVAL))?;
        // Best effort: the kernel caps these at net.core.[rw]mem_max.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER_BYTES);
        Ok(s)
    }

    fn target(&self, dst: SocketAddr) -> SockAddr {
        match dst {
            SocketAddr::V4(v4) if self.dual_stack => SockAddr::from(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
            other => SockAddr::from(other),
        }
    }
}

impl UdpIo for HostUdp {
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(as_uninit(buf))?;
        let from = from.as_socket().ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        Ok((n, crate::packet::unmap(from)))
    }

    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.socket.send_to(buf, &self.target(dst)).map(|_| ())
    }

    fn send_segments(&self, buf: &[u8], seg: usize, dst: SocketAddr) -> io::Result<()> {
        if buf.len() > seg && seg > 0 && self.gso.load(Ordering::Relaxed) {
            let target = self.target(dst);
            let control = segment_cmsg(seg as u16);
            let bufs = [IoSlice::new(buf)];
            let msg = MsgHdr::new().with_addr(&target).with_buffers(&bufs).with_control(&control);
            match self.socket.sendmsg(&msg, 0) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)) => {
                    tracing::info!(error = %e, "UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for d in buf.chunks(seg.max(1)) {
            self.send_to(d, dst)?;
        }
        Ok(())
    }

    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        recv_mmsg(&self.socket, batch)
    }

    fn local_port(&self) -> u16 {
        self.port
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.socket.set_mark(mark)
    }
}

/// `&mut [u8]` viewed as `&mut [MaybeUninit<u8>]`, which socket2's receive wants.
#[allow(unsafe_code)]
fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `u8` and `MaybeUninit<u8>` have the same layout, the slice covers
    // the same exclusively borrowed memory, and the receive only writes bytes.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<MaybeUninit<u8>>(), buf.len()) }
}

/// A control message asking for UDP segmentation at `seg` bytes, laid out as
/// `struct cmsghdr` followed by a `u16`, padded to `CMSG_SPACE(2)`.
fn segment_cmsg(seg: u16) -> [u8; CMSG_SPACE_U16] {
    let mut c = [0u8; CMSG_SPACE_U16];
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    let len = (hdr + 2) as libc::size_t; // CMSG_LEN(2)
    c[..std::mem::size_of::<libc::size_t>()].copy_from_slice(&len.to_ne_bytes());
    let level_at = std::mem::offset_of!(libc::cmsghdr, cmsg_level);
    let type_at = std::mem::offset_of!(libc::cmsghdr, cmsg_type);
    c[level_at..level_at + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    c[type_at..type_at + 4].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    c[hdr..hdr + 2].copy_from_slice(&seg.to_ne_bytes());
    c
}

/// `CMSG_SPACE(sizeof(u16))`: the header plus the data rounded up to the
/// header's alignment.
const CMSG_SPACE_U16: usize = std::mem::size_of::<libc::cmsghdr>() + std::mem::size_of::<libc::size_t>();

/// Most datagrams taken per `recvmmsg` call.
const MAX_RECV_BATCH: usize = 64;

/// `recvmmsg(2)`: waits for the first datagram (up to the socket's receive
/// timeout), then takes whatever else is already queued.
#[allow(unsafe_code)]
fn recv_mmsg(socket: &Socket, batch: &mut RecvBatch) -> io::Result<usize> {
    let n = batch.bufs.len().min(MAX_RECV_BATCH);
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; MAX_RECV_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_RECV_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_RECV_BATCH] = unsafe { std::mem::zeroed() };
    // Room for the UDP_GRO control message (an int); u64s for cmsghdr's alignment.
    let mut controls = [[0u64; 4]; MAX_RECV_BATCH];
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: batch.bufs[i].as_mut_ptr().cast(), iov_len: batch.bufs[i].len() };
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = controls[i].as_mut_ptr().cast();
        msgs[i].msg_hdr.msg_controllen = std::mem::size_of_val(&controls[i]) as _;
    }
    // SAFETY: `msgs[..n]` point at `n` live iovecs over live, exclusively
    // borrowed buffers and at `n` sockaddr_storage slots, all of which outlive
    // the call; the kernel writes at most the lengths given.
    let got =
        unsafe { libc::recvmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = got as usize;
    for i in 0..got {
        // A truncated datagram is passed on empty, to be refused and counted.
        let truncated = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        batch.lens[i] = if truncated { 0 } else { msgs[i].msg_len as usize };
        batch.segs[i] = gro_segment_size(&msgs[i].msg_hdr);
        batch.from[i] = match socket_addr(&addrs[i]) {
            Some(a) => crate::packet::unmap(a),
            None => return Err(io::Error::other("datagram from a non-IP address")),
        };
    }
    Ok(got)
}

/// The datagram size from a UDP_GRO control message, 0 without one.
#[allow(unsafe_code)]
fn gro_segment_size(msg: &libc::msghdr) -> usize {
    // SAFETY: `msg` is a msghdr the kernel just filled: its control pointer
    // and length describe the live buffer it wrote, which the CMSG_*
    // macros walk without leaving it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

/// The address the kernel wrote into a `sockaddr_storage`.
#[allow(unsafe_code)]
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, which it is large and aligned enough for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6, as above.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_cmsg_is_a_well_formed_control_message() {
        let c = segment_cmsg(1452);
        let hdr = std::mem::size_of::<libc::cmsghdr>();
        let len = usize::from_ne_bytes(c[..8].try_into().unwrap());
        assert_eq!(len, hdr + 2);
        assert_eq!(u16::from_ne_bytes([c[hdr], c[hdr + 1]]), 1452);
        assert_eq!(c.len(), 24);
    }

    #[test]
    fn gso_and_recvmmsg_on_loopback() {
        let a = HostUdp::bind(0, 0).unwrap();
        let b = HostUdp::bind(0, 0).unwrap();
        let dst: SocketAddr = format!("127.0.0.1:{}", b.local_port()).parse().unwrap();
        // Five 100-byte datagrams and a 40-byte one, in one call.
        let mut buf = Vec::new();
        for i in 0..5u8 {
            buf.extend(std::iter::repeat_n(i, 100));
        }
        buf.extend(std::iter::repeat_n(9u8, 40));
        a.send_segments(&buf, 100, dst).unwrap();
        let mut batch = RecvBatch::new(16, 2048);
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = b.recv_batch(&mut batch).unwrap();
            for i in 0..n {
                got.push(batch.bufs[i][..batch.lens[i]].to_vec());
                assert_eq!(batch.from[i].port(), a.local_port());
            }
        }
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 100, 100, 100, 40]);
        assert!(got[3].iter().all(|b| *b == 3));
    }

    #[test]
    fn gro_coalesces_one_senders_datagrams_and_they_split_back_in_order() {
        let a = HostUdp::bind(0, 0).unwrap();
        let b = HostUdp::bind(0, 0).unwrap().with_gro();
        assert!(b.gro(), "this kernel has UDP GRO");
        let dst: SocketAddr = format!("127.0.0.1:{}", b.local_port()).parse().unwrap();
        let mut buf = Vec::new();
        for i in 0..20u8 {
            buf.extend(std::iter::repeat_n(i, 300));
        }
        buf.extend(std::iter::repeat_n(99u8, 17));
        a.send_segments(&buf, 300, dst).unwrap();
        a.send_to(&[7u8; 5], dst).unwrap();
        let mut batch = RecvBatch::new(16, 65_536);
        let (mut got, mut slots, mut coalesced) = (Vec::new(), 0, false);
        while got.len() < 22 {
            let n = b.recv_batch(&mut batch).unwrap();
            for i in 0..n {
                slots += 1;
                coalesced |= batch.segs[i] == 300;
                got.extend(batch.datagrams(i).map(<[u8]>::to_vec));
            }
        }
        // The GSO send arrives as one slot on loopback; split, it is the same datagrams.
        assert!(coalesced && slots < 22, "{slots} slots for 22 datagrams");
        let mut want: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 300]).collect();
        want.push(vec![99; 17]);
        want.push(vec![7; 5]);
        assert_eq!(got, want);
    }

    #[test]
    fn an_empty_slot_is_one_empty_datagram_to_refuse() {
        let mut batch = RecvBatch::new(1, 16);
        batch.lens[0] = 0;
        assert_eq!(batch.datagrams(0).collect::<Vec<_>>(), [&[] as &[u8]]);
        batch.lens[0] = 10;
        batch.segs[0] = 4;
        assert_eq!(batch.datagrams(0).map(<[u8]>::len).collect::<Vec<_>>(), [4, 4, 2]);
    }
}
