//! In-memory TUN and UDP for tests: whole devices talk over a [`Switch`]
//! that records every datagram it carries (the eavesdropper) and can drop,
//! inject or replay them.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};

use parking_lot::Mutex;

use super::{Network, POLL_INTERVAL, TunIo, UdpIo};

type Datagram = (Vec<u8>, SocketAddr);

/// A datagram as the eavesdropper saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// The wire between devices.
#[derive(Default)]
pub struct Switch {
    ports: Mutex<HashMap<SocketAddr, Sender<Datagram>>>,
    capture: Mutex<Vec<Captured>>,
    next_port: Mutex<u16>,
}

/// One host's view of the switch: binds sockets at its own address.
pub struct SwitchNetwork {
    switch: Arc<Switch>,
    ip: IpAddr,
}

pub struct SwitchUdp {
    switch: Arc<Switch>,
    addr: SocketAddr,
    rx: Mutex<Receiver<Datagram>>,
}

/// The device side of an in-memory TUN.
pub struct ChannelTun {
    to_device: Mutex<Receiver<Vec<u8>>>,
    from_device: Sender<Vec<u8>>,
}

/// The test side of an in-memory TUN: what the "kernel" would send and receive.
pub struct TunHandle {
    to_device: Sender<Vec<u8>>,
    from_device: Receiver<Vec<u8>>,
}

/// A TUN pair: give the first to a device, keep the second.
pub fn tun_pair() -> (Arc<ChannelTun>, TunHandle) {
    let (to_device_tx, to_device_rx) = channel();
    let (from_device_tx, from_device_rx) = channel();
    (
        Arc::new(ChannelTun { to_device: Mutex::new(to_device_rx), from_device: from_device_tx }),
        TunHandle { to_device: to_device_tx, from_device: from_device_rx },
    )
}

// === impl Switch ===

impl Switch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { next_port: Mutex::new(40000), ..Default::default() })
    }

    pub fn network(self: &Arc<Self>, ip: IpAddr) -> Arc<SwitchNetwork> {
        Arc::new(SwitchNetwork { switch: self.clone(), ip })
    }

    /// Everything the wire has carried so far.
    pub fn captured(&self) -> Vec<Captured> {
        self.capture.lock().clone()
    }

    /// Sends raw bytes to `to` as if from `from`: the attacker's tool.
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        self.deliver(from, to, bytes.to_vec());
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.capture.lock().push(Captured { from, to, bytes: bytes.clone() });
        if let Some(tx) = self.ports.lock().get(&to) {
            let _ = tx.send((bytes, from));
        }
    }
}

impl Network for SwitchNetwork {
    fn bind(&self, port: u16, _fwmark: u32) -> io::Result<Arc<dyn UdpIo>> {
        let mut ports = self.switch.ports.lock();
        let port = if port == 0 {
            let mut next = self.switch.next_port.lock();
            *next += 1;
            *next
        } else {
            port
        };
        let addr = SocketAddr::new(self.ip, port);
        if ports.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let (tx, rx) = channel();
        ports.insert(addr, tx);
        Ok(Arc::new(SwitchUdp { switch: self.switch.clone(), addr, rx: Mutex::new(rx) }))
    }
}

impl UdpIo for SwitchUdp {
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.rx.lock().recv_timeout(POLL_INTERVAL) {
            Ok((bytes, from)) => {
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                Ok((n, from))
            }
            Err(RecvTimeoutError::Timeout) => Err(io::ErrorKind::TimedOut.into()),
            Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.switch.deliver(self.addr, dst, buf.to_vec());
        Ok(())
    }

    fn local_port(&self) -> u16 {
        self.addr.port()
    }

    fn set_fwmark(&self, _mark: u32) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SwitchUdp {
    fn drop(&mut self) {
        self.switch.ports.lock().remove(&self.addr);
    }
}

// === impl ChannelTun ===

impl TunIo for ChannelTun {
    fn read_packets(&self, _buf: &mut [u8], wait: bool, emit: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let rx = self.to_device.lock();
        let p = if wait {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => return Err(io::ErrorKind::TimedOut.into()),
                Err(RecvTimeoutError::Disconnected) => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        } else {
            match rx.try_recv() {
                Ok(p) => p,
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(0),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        };
        emit(&p);
        Ok(1)
    }

    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        self.from_device.send(pkt.to_vec()).map_err(|_| io::ErrorKind::BrokenPipe.into())
    }
}

impl TunHandle {
    /// A packet the "kernel" routes into the device.
    pub fn send(&self, pkt: &[u8]) {
        self.to_device.send(pkt.to_vec()).expect("device is gone");
    }

    /// The next packet the device delivered to the "kernel".
    pub fn recv_timeout(&self, t: std::time::Duration) -> Option<Vec<u8>> {
        self.from_device.recv_timeout(t).ok()
    }
}
