//! The two outside boundaries of the data plane: the TUN device (IP packets
//! in and out of the kernel) and the UDP socket (WireGuard datagrams on the
//! wire). Small traits, so a whole device runs in a test on in-memory
//! channels with an eavesdropper on the wire.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[cfg(any(test, feature = "testing"))]
pub mod channel;
pub mod offload;
pub mod tun;
pub mod udp;

/// How long a blocking receive waits before returning `TimedOut`, so the
/// loops notice a shutdown or a socket swap promptly.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// IP packets to and from the kernel.
pub trait TunIo: Send + Sync {
    /// Reads one IP packet into `buf`; `ErrorKind::TimedOut` after
    /// [`POLL_INTERVAL`] without one.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one IP packet.
    fn send(&self, pkt: &[u8]) -> io::Result<()>;
    /// Reads one packet if one is already waiting, without blocking: how the
    /// TUN loop fills a batch after its first packet.
    fn try_recv(&self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
}

/// Datagrams received in one call (see [`UdpIo::recv_batch`]).
pub struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub from: Vec<SocketAddr>,
}

impl RecvBatch {
    pub fn new(count: usize, size: usize) -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        Self { bufs: vec![vec![0u8; size]; count.max(1)], lens: vec![0; count.max(1)], from: vec![any; count.max(1)] }
    }
}

/// One bound UDP socket.
pub trait UdpIo: Send + Sync {
    /// Receives one datagram; `ErrorKind::TimedOut` after [`POLL_INTERVAL`]
    /// without one.
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()>;
    /// Receives up to `batch.bufs.len()` datagrams, blocking only for the
    /// first; returns how many arrived. The default receives one.
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let (n, from) = self.recv_from(&mut batch.bufs[0])?;
        batch.lens[0] = n;
        batch.from[0] = from;
        Ok(1)
    }
    /// Sends the datagrams laid out back to back in `buf`, each `seg` bytes
    /// (the last may be shorter), to `dst`. The default sends them one by one;
    /// the host socket hands them to the kernel in one call (UDP GSO).
    fn send_segments(&self, buf: &[u8], seg: usize, dst: SocketAddr) -> io::Result<()> {
        for d in buf.chunks(seg.max(1)) {
            self.send_to(d, dst)?;
        }
        Ok(())
    }
    /// The port actually bound (differs from the request when it was 0).
    fn local_port(&self) -> u16;
    /// Marks outgoing datagrams (SO_MARK), 0 to clear.
    fn set_fwmark(&self, mark: u32) -> io::Result<()>;
}

/// Where UDP sockets come from: the host's network stack, or a test switch.
pub trait Network: Send + Sync {
    fn bind(&self, port: u16, fwmark: u32) -> io::Result<Arc<dyn UdpIo>>;
}

/// True for the errors a timed receive returns when nothing arrived.
#[inline]
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}
