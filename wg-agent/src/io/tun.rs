//! The Linux TUN device: `/dev/net/tun`, layer 3, no packet-info header.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::{POLL_INTERVAL, TunIo};

// From <linux/if_tun.h>; not all are in the libc crate.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

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
        validate_ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Non-blocking: `recv` waits in poll, `try_recv` never waits.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TunError::Open)?;
        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut libc::ifreq) } < 0 {
            return Err(TunError::Create { name: name.to_owned(), source: io::Error::last_os_error() });
        }
        // SAFETY: TUNSETPERSIST takes an integer argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, persist as libc::c_ulong) } < 0 {
            return Err(TunError::Configure { name: name.to_owned(), source: io::Error::last_os_error() });
        }
        Ok(Self { file, name: name.to_owned() })
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
}

impl TunIo for LinuxTun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.wait_readable()? {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match (&self.file).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            r => r,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        (&self.file).write(pkt).map(|_| ())
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
