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
    /// Reads once from the device and calls `emit` with each IP packet the
    /// read carried: one, or every segment of a super-packet. With `wait`
    /// it blocks up to [`POLL_INTERVAL`] (then `ErrorKind::TimedOut`);
    /// without, it returns `Ok(0)` when nothing is waiting. A super-packet
    /// that does not add up is refused whole with `ErrorKind::InvalidData`.
    /// Returns how many packets were emitted.
    fn read_packets(&self, buf: &mut [u8], wait: bool, emit: &mut dyn FnMut(&[u8])) -> io::Result<usize>;
    /// Writes one IP packet.
    fn send(&self, pkt: &[u8]) -> io::Result<()>;
    /// Writes packets in order within each flow; a device that takes
    /// super-packets gets one flow's back-to-back TCP segments coalesced.
    /// `failed` hears of every write the kernel refuses. Returns how many
    /// super-packets (writes carrying more than one packet) went out.
    fn write_packets(&self, pkts: &[&[u8]], failed: &mut dyn FnMut(io::Error)) -> usize {
        for p in pkts {
            if let Err(e) = self.send(p) {
                failed(e);
            }
        }
        0
    }
}

/// Datagrams received in one call (see [`UdpIo::recv_batch`]).
pub struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub from: Vec<SocketAddr>,
    /// With UDP GRO, the size of each datagram coalesced into `bufs[i]`
    /// (the last may be shorter); 0 when it holds one datagram.
    pub segs: Vec<usize>,
}

impl RecvBatch {
    pub fn new(count: usize, size: usize) -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let n = count.max(1);
        Self { bufs: vec![vec![0u8; size]; n], lens: vec![0; n], from: vec![any; n], segs: vec![0; n] }
    }

    /// The datagrams received into slot `i`, in the order they were sent.
    /// An empty datagram is yielded as one (to be refused and counted).
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let data = &self.bufs[i][..self.lens[i]];
        let seg = if self.segs[i] == 0 { data.len() } else { self.segs[i] };
        let (mut at, mut first) = (0, true);
        std::iter::from_fn(move || {
            if at >= data.len() && !(first && data.is_empty()) {
                return None;
            }
            first = false;
            let end = (at + seg).min(data.len());
            let d = &data[at..end];
            at = end;
            Some(d)
        })
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
        batch.segs[0] = 0;
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
