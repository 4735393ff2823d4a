//! The CNI plugin's socket (`cniSocket`, 0600 in a 0700 directory it
//! creates): one JSON request and one JSON response per connection
//! (`meshguard_cni::protocol`). Requests are read, bounded and validated
//! here; what needs the enforcer goes to the agent's loop and is answered
//! from there, so ADD returns only once the pod's interface is enforced.
//! Every request is counted by command and result, every refusal logged.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshguard_cni::protocol::{MAX_MESSAGE_BYTES, Refusal, Request, Response};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::metrics::CniCounts;
use crate::enforce::handoff;

/// A plugin that has not sent its whole request by then is cut off.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("the CNI socket {path} is already served by another process (is another agent running?)")]
    InUse { path: String },
    #[error("cannot serve the CNI socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the agent can do for the plugin right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No `datapath:` section: no pod is ever enforced here.
    NoDatapath,
    /// Start-up: the datapath is being loaded (or adopted).
    Loading,
    /// Requests go to the agent's loop.
    Ready,
}

/// A validated request on its way to the agent's loop, and where the answer goes.
#[derive(Debug)]
pub struct Pending {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

struct Ctx {
    phase: watch::Receiver<Phase>,
    agent: mpsc::Sender<Pending>,
    counts: CniCounts,
    endpoints_dir: Option<PathBuf>,
}

/// The serving task; dropping it stops serving and removes the socket.
pub struct CniServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CniServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

// === impl CniServer ===

impl CniServer {
    /// Binds `path` (refusing if a live process serves it) and serves it.
    pub fn start(
        path: &Path,
        phase: watch::Receiver<Phase>,
        agent: mpsc::Sender<Pending>,
        counts: CniCounts,
        endpoints_dir: Option<PathBuf>,
    ) -> Result<Self, CniServerError> {
        let bind_err = |source| CniServerError::Bind { path: path.display().to_string(), source };
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(bind_err)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(CniServerError::InUse { path: path.display().to_string() });
            }
            // Left by a crashed run: nobody answers on it.
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = UnixListener::from_std(listener).map_err(bind_err)?;
        let ctx = Arc::new(Ctx { phase, agent, counts, endpoints_dir });
        let socket = path.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_one(stream, ctx.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, socket = %socket.display(), "CNI socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(socket = %path.display(), "serving the CNI plugin");
        Ok(Self { path: path.to_owned(), task })
    }
}

async fn serve_one(mut stream: UnixStream, ctx: Arc<Ctx>) {
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no whole request within {READ_TIMEOUT:?}")),
    };
    let response = match &request {
        Ok(r) => ctx.dispatch(r).await,
        Err(e) => Response::refused(Refusal::InvalidRequest, e.clone()),
    };
    ctx.report(request.as_ref().ok(), &response);
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&line)).await, Ok(Ok(()))) {
        tracing::warn!(result = response.result(), "CNI socket: the plugin went away before its answer");
    }
}

/// One request: a JSON object up to a newline or the end of input, at most
/// [`MAX_MESSAGE_BYTES`], validated.
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("cannot read the request: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(format!("the request is longer than {MAX_MESSAGE_BYTES} bytes"));
        }
        if n == 0 || chunk[..n].contains(&b'\n') {
            break;
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let request: Request = serde_json::from_slice(line).map_err(|e| format!("not a meshguard CNI request: {e}"))?;
    handoff::validate(&request)?;
    Ok(request)
}

// === impl Ctx ===

impl Ctx {
    async fn dispatch(&self, request: &Request) -> Response {
        let phase = *self.phase.borrow();
        match (phase, request) {
            (Phase::Ready, _) => {
                let (reply, answer) = oneshot::channel();
                if self.agent.send(Pending { request: request.clone(), reply }).await.is_err() {
                    return Response::refused(Refusal::DatapathLoading, "the agent is stopping; try again");
                }
                answer.await.unwrap_or_else(|_| Response::refused(Refusal::DatapathLoading, "the agent is stopping; try again"))
            }
            // Nothing was ever handed over: nothing to undo.
            (Phase::NoDatapath, Request::Del(_)) => Response::Removed { existed: false },
            (Phase::NoDatapath, _) => Response::refused(
                Refusal::NoDatapath,
                "this agent runs without a `datapath:` section and enforces no pod: configure the datapath, or take meshguard-cni out of the node's CNI configuration",
            ),
            // The enforcer reads the directory once loaded: removing the file is enough.
            (Phase::Loading, Request::Del(d)) => match self.endpoints_dir.as_deref().map(|dir| handoff::remove_endpoint_file(dir, d)) {
                Some(Err(e)) => Response::refused(Refusal::Io, e),
                Some(Ok(removed)) => Response::Removed { existed: removed.is_some() },
                None => Response::Removed { existed: false },
            },
            (Phase::Loading, _) => {
                Response::refused(Refusal::DatapathLoading, "the agent is still loading its datapath; try again shortly")
            }
        }
    }

    fn report(&self, request: Option<&Request>, response: &Response) {
        let command = request.map_or("invalid", Request::command);
        *self.counts.lock().entry((command, response.result())).or_default() += 1;
        let (pod, interface, container) = match request {
            Some(Request::Add(a)) => (a.endpoint.key(), a.endpoint.interface.as_str(), a.container_id.as_str()),
            Some(Request::Del(d)) => (format!("{}/{}", d.namespace, d.name), d.interface.as_deref().unwrap_or(""), d.container_id.as_str()),
            Some(Request::Check(c)) => (format!("{}/{}", c.namespace, c.name), c.interface.as_str(), c.container_id.as_str()),
            Some(Request::Status) | None => (String::new(), "", ""),
        };
        match response {
            Response::Refused { reason, message } => {
                tracing::warn!(command, %pod, interface, container, reason = reason.as_str(), %message, "CNI request refused")
            }
            _ if matches!(request, Some(Request::Status)) => tracing::debug!(result = response.result(), "CNI status"),
            _ => tracing::info!(command, %pod, interface, container, result = response.result(), "CNI request served"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose agent loop answers every forwarded request `Ready`.
    async fn server(dir: &Path, phase: Phase) -> (CniServer, watch::Sender<Phase>, CniCounts) {
        let (tx, mut rx) = mpsc::channel::<Pending>(4);
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let _ = p.reply.send(Response::Ready);
            }
        });
        let (phase_tx, phase_rx) = watch::channel(phase);
        let counts = CniCounts::default();
        let s = CniServer::start(&dir.join("run/cni.sock"), phase_rx, tx, counts.clone(), Some(dir.join("endpoints"))).unwrap();
        (s, phase_tx, counts)
    }

    async fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn malformed_requests_are_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _phase, counts) = server(dir.path(), Phase::Ready).await;
        let mode = std::fs::metadata(&s.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("run")).unwrap().permissions().mode() & 0o777, 0o700);
        for bad in [&b"{not json\n"[..], b"{\"command\":\"ADD\"}\n", b"", &[b'x'; MAX_MESSAGE_BYTES + 10]] {
            let answer = raw(&s.path, bad).await;
            assert!(answer.contains(r#""reason":"invalid_request""#), "{answer}");
        }
        assert_eq!(counts.lock().get(&("invalid", "invalid_request")), Some(&4));
        assert!(!dir.path().join("endpoints").exists(), "nothing was written");
        let answer = raw(&s.path, b"{\"command\":\"STATUS\"}\n").await;
        assert_eq!(answer.trim(), r#"{"result":"ready"}"#);
    }

    #[tokio::test]
    async fn before_the_datapath_adds_wait_and_without_one_they_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (s, phase, _) = server(dir.path(), Phase::Loading).await;
        let add = br#"{"command":"ADD","containerId":"c","endpoint":{"namespace":"shop","name":"web","interface":"veth1","mac":"02:00:00:00:00:01","ips":["10.0.0.1"]}}"#;
        assert!(raw(&s.path, add).await.contains("datapath_loading"));
        let del = br#"{"command":"DEL","containerId":"c","namespace":"shop","name":"web"}"#;
        assert!(raw(&s.path, del).await.contains(r#""result":"removed""#));
        phase.send_replace(Phase::NoDatapath);
        assert!(raw(&s.path, add).await.contains("no_datapath"));
        assert!(raw(&s.path, del).await.contains(r#""result":"removed""#), "DEL never blocks a pod's teardown");
        // A second server on the same socket is refused while this one answers.
        let (tx, _rx) = mpsc::channel(1);
        let again = CniServer::start(&s.path, watch::channel(Phase::Ready).1, tx, CniCounts::default(), None);
        assert!(matches!(again, Err(CniServerError::InUse { .. })));
    }
}
