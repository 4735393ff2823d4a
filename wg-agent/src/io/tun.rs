//! The Linux TUN device: `/dev/net/tun`, layer 3, no packet-info header.
//! With offloads on (the default) it also carries a virtio-net header: the
//! kernel hands over TCP super-packets of up to 64 KiB (TSO) and UDP ones
//! where it can (USO), which [`offload::segment`] cuts, and takes coalesced
//! TCP segments back ([`offload::coalesce`]), so the kernel's stacks on both
//! sides see few, large packets.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::offload::{self, VIRTIO_NET_HDR_LEN, VirtioNetHdr};
use super::{POLL_INTERVAL, TunIo};

// From <linux/if_tun.h>; not all are in the libc crate.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Linux limits interface names to 15 bytes plus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("interface name {name:?} is invalid: 1 to {MAX_IFNAME_LEN} bytes, no '/', whitespace or NUL")]
    BadName { name: String },
    #[error("cannot open /dev/net/tun (is the tun module available and are you root?): {0}")]
    Open(#[source] io::Error),
    #[error("cannot create TUN interface {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure interface {name}: {source}")]
    Configure {
        name: String,
        #[source]
        source: io::Error,
    },
}

pub struct LinuxTun {
    file: File,
    name: String,
    persist: bool,
    offload: Offload,
    /// Cleared the first time the kernel refuses a coalesced write (some
    /// kernels have: Linux 6.6.44 and 6.10.3 refused GSO writes from
    /// userspace); from then on decrypted packets go up one by one.
    coalescing: std::sync::atomic::AtomicBool,
}

/// What the kernel hands this TUN, decided once at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offload {
    /// Every packet carries a virtio-net header; TCP super-packets (TSO,
    /// v4 and v6) come in and coalesced ones go out.
    pub tso: bool,
    /// UDP super-packets come in too (Linux 6.2 and later).
    pub uso: bool,
}

impl std::fmt::Display for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.tso, self.uso) {
            (false, _) => f.write_str("none"),
            (true, false) => f.write_str("tso4,tso6,tcp-gro"),
            (true, true) => f.write_str("tso4,tso6,uso4,uso6,tcp-gro"),
        }
    }
}

pub fn validate_ifname(name: &str) -> Result<(), TunError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if ok { Ok(()) } else { Err(TunError::BadName { name: name.to_owned() }) }
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// Runs a SIOC* interface ioctl on a throwaway datagram socket.
fn if_ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `req` is a valid, initialised ifreq for the duration of the call.
    let rc = unsafe { libc::ioctl(sock, request, req as *mut libc::ifreq) };
    let err = io::Error::last_os_error();
    // SAFETY: `sock` is an fd we own.
    unsafe { libc::close(sock) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// The index of interface `name` in the caller's network namespace.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

// === impl LinuxTun ===

impl LinuxTun {
    /// Creates (or attaches to, when it is persistent and ours) the TUN
    /// interface `name`. A persistent interface outlives this process, so the
    /// routes through it stay and traffic is dropped, not leaked, while the
    /// agent restarts.
    pub fn open(name: &str, persist: bool) -> Result<Self, TunError> {
        Self::open_with(name, persist, true)
    }

    /// As [`open`](Self::open); `offload: false` keeps the device to one
    /// MTU-sized packet per read and write. With `offload`, what the kernel
    /// supports is taken and what it lacks is logged and done without.
    pub fn open_with(name: &str, persist: bool, offload: bool) -> Result<Self, TunError> {
        validate_ifname(name)?;
        let (file, vnet) = match offload {
            true => match Self::attach(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR) {
                Ok(f) => (f, true),
                Err(TunError::Create { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(interface = name, error = %source, "TUN virtio-net headers unsupported; no offloads");
                    (Self::attach(name, IFF_TUN | IFF_NO_PI)?, false)
                }
                Err(e) => return Err(e),
            },
            false => (Self::attach(name, IFF_TUN | IFF_NO_PI)?, false),
        };
        let cfg = |source| TunError::Configure { name: name.to_owned(), source };
        // SAFETY: TUNSETPERSIST takes an integer argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, persist as libc::c_ulong) } < 0 {
            return Err(cfg(io::Error::last_os_error()));
        }
        let offload = if vnet {
            Self::negotiate(&file).map_err(cfg)?
        } else {
            Self::set_offload(&file, 0).map_err(cfg)?;
            // Between attaching and turning the offloads off, the kernel
            // may have queued super-packets under a previous owner's
            // offloads; without a header they cannot be read right, so they
            // go (a restart drops traffic anyway). Bounded by the queue.
            let mut scratch = vec![0u8; 65_535 + VIRTIO_NET_HDR_LEN];
            for _ in 0..1024 {
                if !matches!((&file).read(&mut scratch), Ok(n) if n > 0) {
                    break;
                }
            }
            Offload::default()
        };
        tracing::info!(interface = name, offload = %offload, "TUN device open");
        Ok(Self { file, name: name.to_owned(), persist, offload, coalescing: std::sync::atomic::AtomicBool::new(offload.tso) })
    }

    fn attach(name: &str, flags: libc::c_short) -> Result<File, TunError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Non-blocking: `recv` waits in poll, `try_recv` never waits.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TunError::Open)?;
        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = flags;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives
        // across the call. On a persistent interface it also replaces the
        // flags a previous owner attached with.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut libc::ifreq) } < 0 {
            return Err(TunError::Create { name: name.to_owned(), source: io::Error::last_os_error() });
        }
        Ok(file)
    }

    /// Asks for TSO and, where the kernel has it, USO. Offloads are a
    /// property of the interface, not of this file: they are always set
    /// explicitly, so none is left on from an earlier owner that read
    /// differently.
    fn negotiate(file: &File) -> io::Result<Offload> {
        let hdr_len = VIRTIO_NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        match Self::set_offload(file, tso | TUN_F_USO4 | TUN_F_USO6) {
            Ok(()) => Ok(Offload { tso: true, uso: true }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(error = %e, "TUN UDP segmentation offload unavailable (Linux 6.2+); TCP only");
                Self::set_offload(file, tso).map(|()| Offload { tso: true, uso: false })
            }
            Err(e) => Err(e),
        }
    }

    fn set_offload(file: &File, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes an unsigned integer by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// What was negotiated at open.
    pub fn offload(&self) -> Offload {
        self.offload
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_mtu(&self, mtu: u16) -> Result<(), TunError> {
        let mut req = ifreq_for(&self.name);
        req.ifr_ifru.ifru_mtu = mtu.into();
        if_ioctl(libc::SIOCSIFMTU, &mut req).map_err(|source| TunError::Configure { name: self.name.clone(), source })
    }

    /// Brings the interface up (IFF_UP), as `ip link set <name> up` does.
    pub fn set_up(&self) -> Result<(), TunError> {
        let cfg = |source| TunError::Configure { name: self.name.clone(), source };
        let mut req = ifreq_for(&self.name);
        if_ioctl(libc::SIOCGIFFLAGS, &mut req).map_err(cfg)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        if_ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(cfg)
    }

    pub fn ifindex(&self) -> io::Result<u32> {
        if_index(&self.name)
    }

    /// Removes a persistent interface (used by `down`/cleanup paths).
    pub fn delete(self) -> Result<(), TunError> {
        // SAFETY: as in `open`.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) } < 0 {
            return Err(TunError::Configure { name: self.name.clone(), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    fn wait_readable(&self) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, length 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL.as_millis() as libc::c_int) };
        match rc {
            0 => Ok(false),
            n if n > 0 => Ok(true),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// One read(2); `None` when nothing is waiting.
    fn read_once(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet behind `hdr` in a single writev(2): the TUN takes
    /// one packet per write, header included.
    fn write_with(&self, hdr: &VirtioNetHdr, pkt: &[u8]) -> io::Result<()> {
        let h = hdr.to_bytes();
        let iov = [io::IoSlice::new(&h), io::IoSlice::new(pkt)];
        (&self.file).write_vectored(&iov).map(|_| ())
    }
}

impl TunIo for LinuxTun {
    fn read_packets(&self, buf: &mut [u8], wait: bool, emit: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        if wait && !self.wait_readable()? {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let Some(n) = self.read_once(buf)? else {
            return if wait { Err(io::ErrorKind::TimedOut.into()) } else { Ok(0) };
        };
        if !self.offload.tso {
            emit(&buf[..n]);
            return Ok(1);
        }
        let invalid = |e: offload::OffloadError| io::Error::new(io::ErrorKind::InvalidData, e);
        let hdr = VirtioNetHdr::parse(&buf[..n]).map_err(invalid)?;
        offload::segment(&hdr, &mut buf[VIRTIO_NET_HDR_LEN..n], |p| emit(p)).map_err(invalid)
    }

    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        if self.offload.tso { self.write_with(&VirtioNetHdr::default(), pkt) } else { (&self.file).write(pkt).map(|_| ()) }
    }

    fn write_packets(&self, pkts: &[&[u8]], failed: &mut dyn FnMut(io::Error)) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.coalescing.load(Relaxed) {
            for p in pkts {
                if let Err(e) = self.send(p) {
                    failed(e);
                }
            }
            return 0;
        }
        let mut merged = 0;
        offload::coalesce(pkts.iter().copied(), self.offload.uso, |hdr, p| match self.write_with(hdr, p) {
            Ok(()) => merged += usize::from(hdr.gso_type != 0),
            Err(e) if hdr.gso_type != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                if self.coalescing.swap(false, Relaxed) {
                    tracing::warn!(interface = %self.name, error = %e, "the kernel refuses coalesced writes to the TUN; writing packets one by one");
                }
                // Cut it back into the packets it was made of (exactly those:
                // see offload's tests) and write them as they came.
                let mut p = p.to_vec();
                let cut = offload::segment(hdr, &mut p, |seg| {
                    if let Err(e) = self.send(seg) {
                        failed(e);
                    }
                });
                if let Err(e) = cut {
                    failed(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            Err(e) => failed(e),
        });
        merged
    }
}

impl AsRawFd for LinuxTun {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for LinuxTun {
    /// A persistent interface outlives us: leave it with no offloads, so
    /// whoever attaches next (an older agent, say, that reads without a
    /// virtio-net header) is not handed super-packets it cannot parse.
    fn drop(&mut self) {
        if self.persist && self.offload.tso {
            let _ = Self::set_offload(&self.file, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for ok in ["wg0", "mg-1", "a", "abcdefghijklmno"] {
            validate_ifname(ok).unwrap();
        }
        for bad in ["", "abcdefghijklmnop", "a/b", "a b", ".", "..", "a:1", "a\0"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
