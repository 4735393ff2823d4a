//! The process at the other end of a Workload API connection, bound when
//! the connection is accepted.
//!
//! SO_PEERCRED gives the pid of the process that connected. Resolving that
//! pid again on every call is not enough: once the process exits, its pid can
//! be reused by a process of another pod, and whoever still holds the
//! connection would be taken for that pod. So the connection also keeps a
//! pidfd of the process itself (SO_PEERPIDFD, Linux 6.5+; on older kernels
//! `pidfd_open` on the pid at accept). A pidfd never refers to another
//! process, and turns readable when its process exits: a call is answered
//! only if, after the caller's pod was resolved from the pid, the process is
//! still running (so the pid still meant it when it was read).

// The socket option and the poll are plain libc calls, each with a SAFETY note.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// `SO_PEERPIDFD` (include/uapi/asm-generic/socket.h).
const SO_PEERPIDFD: libc::c_int = 77;

/// Who opened a connection.
#[derive(Debug)]
pub struct PeerProcess {
    pub pid: i32,
    pidfd: OwnedFd,
}

/// What each request on a connection carries (tonic puts it in the request's extensions).
#[derive(Debug, Clone)]
pub struct CallerInfo(pub Arc<PeerProcess>);

impl PeerProcess {
    /// The peer of a connected unix socket.
    pub fn of(sock: BorrowedFd<'_>) -> io::Result<Self> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writing and sized for SO_PEERCRED.
        let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if cred.pid <= 0 {
            return Err(io::Error::other("the peer has no pid in this pid namespace"));
        }
        let mut fd: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` and `len` are valid for writing and sized for SO_PEERPIDFD.
        let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&raw mut fd).cast(), &mut len) };
        let raw = if rc == 0 && fd >= 0 {
            fd
        } else {
            // Older kernels: a pidfd for the pid now. The process could have
            // exited between connect and here and its pid been reused: a
            // window of microseconds that SO_PEERPIDFD closes.
            // SAFETY: pidfd_open(2) with a pid and no flags; returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, cred.pid, 0) } as libc::c_int;
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: `raw` is a descriptor the kernel just gave us; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { pid: cred.pid, pidfd })
    }

    /// Whether the process is still running (its pidfd is not yet readable).
    pub fn alive(&self) -> bool {
        let mut p = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        rc == 0
    }
}

/// A Workload API connection with its caller bound at accept.
pub struct CallerStream {
    inner: UnixStream,
    info: CallerInfo,
    /// Makes a socket-path `:authority` acceptable (crate::authority).
    fix: crate::authority::AuthorityFix,
}

impl CallerStream {
    pub fn new(inner: UnixStream) -> io::Result<Self> {
        let peer = PeerProcess::of(inner.as_fd())?;
        Ok(Self { inner, info: CallerInfo(Arc::new(peer)), fix: Default::default() })
    }
}

impl tonic::transport::server::Connected for CallerStream {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

impl AsyncRead for CallerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        crate::authority::poll_read_fixed(&mut me.inner, &mut me.fix, cx, buf)
    }
}

impl AsyncWrite for CallerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_is_alive_until_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // This process as the peer: alive.
        let _me = UnixStream::connect(&path).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let p = PeerProcess::of(s.as_fd()).unwrap();
        assert_eq!(p.pid, std::process::id() as i32);
        assert!(p.alive());
        // A child that connects, then exits.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(0.3)",
                path.to_str().unwrap(),
            ])
            .spawn()
            .expect("python3");
        let (s, _) = listener.accept().await.unwrap();
        let p = PeerProcess::of(s.as_fd()).unwrap();
        assert_eq!(p.pid, child.id() as i32);
        assert!(p.alive());
        child.wait().unwrap();
        assert!(!p.alive(), "an exited peer is not alive, whatever its pid names now");
    }
}
