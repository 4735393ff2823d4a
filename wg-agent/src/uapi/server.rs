//! The UAPI unix socket: `/var/run/wireguard/<ifname>.sock`, root only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{MAX_LINE_LEN, MAX_REQUEST_LINES, Operation, UapiError, errno, format_get, parse_operation, parse_set};
use crate::device::{Device, DeviceError};

/// Where the `wg` tool looks for userspace interfaces.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// A client that stops talking is cut off after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("interface {name} is already served by another process ({path} answers)")]
    InUse { name: String, path: String },
    #[error("cannot create UAPI socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Whether `set` requests are honoured. A managed node agent owns its
/// configuration, so there the socket is for inspection only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

pub struct UapiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.sock"))
}

// === impl UapiServer ===

impl UapiServer {
    pub fn start(dir: &Path, ifname: &str, device: Arc<Device>, access: Access) -> Result<Self, ServerError> {
        let path = socket_path(dir, ifname);
        let bind_err = |source| ServerError::Bind { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(bind_err)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(ServerError::InUse { name: ifname.to_owned(), path: path.display().to_string() });
            }
            // A socket nobody answers on is left over from a crash.
            std::fs::remove_file(&path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("uapi".into()).spawn(move || accept_loop(listener, device, access, &stop)).map_err(bind_err)?
        };
        Ok(Self { path, stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, device: Arc<Device>, access: Access, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let device = device.clone();
                let _ = std::thread::Builder::new().name("uapi-conn".into()).spawn(move || {
                    if let Err(error) = serve(stream, &device, access) {
                        tracing::debug!(%error, "uapi connection ended");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(error) => {
                tracing::warn!(%error, "uapi accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one line without its newline; `None` at end of stream.
fn read_line(r: &mut impl BufRead) -> Result<Option<String>, UapiError> {
    let mut buf = Vec::new();
    let n =
        r.take(MAX_LINE_LEN as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| UapiError { errno: errno::EIO, message: e.to_string() })?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(UapiError::protocol("line too long or not terminated"));
    }
    buf.pop();
    String::from_utf8(buf).map(Some).map_err(|_| UapiError::protocol("line is not UTF-8"))
}

/// Serves requests on one connection until the client closes it.
pub fn serve(stream: UnixStream, device: &Device, access: Access) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let reply = match handle_request(&mut reader, device, access) {
            Ok(None) => return Ok(()),
            Ok(Some(body)) => format!("{body}errno=0\n\n"),
            Err(e) => {
                tracing::warn!(errno = e.errno, error = %e, "uapi request refused");
                writer.write_all(format!("errno=-{}\n\n", e.errno).as_bytes())?;
                // After a protocol error the stream position is unknown: hang up.
                return Ok(());
            }
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// One request; `Ok(None)` when the client has closed the connection.
fn handle_request(r: &mut impl BufRead, device: &Device, access: Access) -> Result<Option<String>, UapiError> {
    let Some(first) = read_line(r)? else { return Ok(None) };
    let op = parse_operation(&first)?;
    let mut lines = Vec::new();
    loop {
        match read_line(r)? {
            Some(l) if l.is_empty() => break,
            Some(l) => {
                if lines.len() >= MAX_REQUEST_LINES {
                    return Err(UapiError::protocol("request has too many lines"));
                }
                lines.push(l);
            }
            None => return Err(UapiError::protocol("request not terminated by a blank line")),
        }
    }
    match op {
        Operation::Get => {
            if !lines.is_empty() {
                return Err(UapiError::protocol("get=1 takes no arguments"));
            }
            Ok(Some(format_get(&device.snapshot())))
        }
        Operation::Set => {
            if access == Access::ReadOnly {
                return Err(UapiError {
                    errno: errno::EPERM,
                    message: "this interface is managed by the node agent; change the cluster, not the device".into(),
                });
            }
            let update = parse_set(lines.iter().map(String::as_str))?;
            // Secret keys print as <redacted>; public keys are public.
            tracing::debug!(?update, "uapi set");
            device.apply(&update).map_err(|e| match e {
                DeviceError::Bind { .. } => UapiError { errno: errno::EADDRINUSE, message: e.to_string() },
                other => UapiError { errno: errno::EIO, message: other.to_string() },
            })?;
            tracing::info!(peers = update.peers.len(), "configuration updated over uapi");
            Ok(Some(String::new()))
        }
    }
}
