//! The host's UDP stack: one dual-stack socket per listen port.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Network, POLL_INTERVAL, UdpIo};

/// Socket buffers large enough that a burst from the TUN side is not dropped
/// by the kernel before the receive loop gets to it.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

pub struct HostNetwork;

pub struct HostUdp {
    socket: Socket,
    /// Dual-stack IPv6 socket: IPv4 peers are addressed as `::ffff:a.b.c.d`.
    dual_stack: bool,
    port: u16,
}

impl Network for HostNetwork {
    fn bind(&self, port: u16, fwmark: u32) -> io::Result<Arc<dyn UdpIo>> {
        Ok(Arc::new(HostUdp::bind(port, fwmark)?))
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
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("bound socket has no address"))?;
        Ok(Self { socket, dual_stack, port })
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
            SocketAddr::V4(v4) if self.dual_stack => {
                SockAddr::from(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
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
