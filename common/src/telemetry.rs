//! The one metrics and health server every binary runs on `metricsAddress`:
//! `/metrics` (OpenMetrics text), `/healthz` (the process answers) and
//! `/readyz` (it can do its job; otherwise why not, one reason per line).
//! Also the client side of `<binary> healthcheck`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// What `prometheus_client` writes: OpenMetrics 1.0, which Prometheus
/// negotiates and parses (counters end in `_total`, the body in `# EOF`).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `Ok` when ready; otherwise every reason it is not.
pub type Readiness = Arc<dyn Fn() -> Result<(), Vec<String>> + Send + Sync>;

/// Always ready: for a binary whose serving the request is proof enough.
pub fn always_ready() -> Readiness {
    Arc::new(|| Ok(()))
}

/// Registers `meshguard_build_info{component, version} 1`, so dashboards can
/// tell which build each process runs.
pub fn register_build_info(registry: &mut Registry, component: &str) {
    let info =
        Info::new(vec![("component".to_owned(), component.to_owned()), ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]);
    registry.register("meshguard_build", "The build this process runs.", info);
}

/// Now, in Unix seconds, for `*_timestamp_seconds` gauges.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Serves until the task is dropped. The registry is encoded on each scrape.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>, ready: Readiness) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    // Scrapers and probes are few: a bound keeps slow or stuck clients
    // from holding the process's descriptors.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends pass; the server must outlive them.
                tracing::warn!(%error, "metrics server cannot accept; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: over MAX_CONNECTIONS
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(req.uri().path(), &registry, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, svc)
                .await;
            drop(slot);
        });
    }
}

/// Open connections the metrics server keeps at once.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn respond(path: &str, registry: &Registry, ready: &Readiness) -> Response<Full<Bytes>> {
    let text = |status, body: String| (status, "text/plain; charset=utf-8", body);
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (StatusCode::OK, OPENMETRICS_CONTENT_TYPE, body),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n".into()),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", why.join("\n"))),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// `GET path` on a metrics server: the status code and body. A listener on
/// every address (`0.0.0.0`, `::`) is asked on loopback.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("{addr}{path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("{addr}{path}: {e}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("{addr}{path}: no answer within {timeout:?}"))?
}

/// Asks `path` until it answers `status` or `timeout` passes: the body,
/// or the last answer or error.
pub async fn wait_for_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = get(addr, path, Duration::from_secs(2)).await;
        match last {
            Ok((s, body)) if s == status => return Ok(body),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(format!("{addr}{path}: wanted {status} within {timeout:?}, last {last:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A loopback address whose port is free now: for a metrics server a test
/// must name before it binds.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// What `<binary> healthcheck` does: asks `/readyz`, prints the answer, and
/// exits 0 only when it was 200.
pub async fn healthcheck(metrics_address: Option<SocketAddr>) -> std::process::ExitCode {
    let Some(addr) = metrics_address else {
        eprintln!("healthcheck: the config sets no metricsAddress, so there is nothing to ask");
        return std::process::ExitCode::from(2);
    };
    match get(addr, "/readyz", Duration::from_secs(5)).await {
        Ok((200, body)) => {
            print!("{body}");
            std::process::ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            print!("{body}");
            eprintln!("healthcheck: {addr}/readyz answered {status}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[tokio::test]
    async fn metrics_health_and_readiness_are_served_with_the_right_types() {
        let mut registry = Registry::default();
        register_build_info(&mut registry, "test");
        let c = Counter::<u64>::default();
        registry.register("meshguard_test_things", "Things.", c.clone());
        c.inc_by(3);
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let readiness: Readiness =
            Arc::new(move || if r.load(Ordering::SeqCst) { Ok(()) } else { Err(vec!["starting".into(), "no CA yet".into()]) });
        let addr = free_loopback_addr().unwrap();
        let server = tokio::spawn(serve(addr, Arc::new(registry), readiness));
        let t = Duration::from_secs(5);
        let body = wait_for_status(addr, "/metrics", 200, t).await.unwrap();
        assert!(body.contains("meshguard_test_things_total 3"), "{body}");
        assert!(body.contains("meshguard_build_info{component=\"test\",version=\""), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        assert_eq!(get(addr, "/healthz", t).await.unwrap().0, 200);
        let (status, body) = get(addr, "/readyz", t).await.unwrap();
        assert_eq!((status, body.as_str()), (503, "not ready:\nstarting\nno CA yet\n"));
        assert_eq!(healthcheck(Some(addr)).await, std::process::ExitCode::FAILURE);
        ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz", t).await.unwrap().0, 200);
        assert_eq!(healthcheck(Some(addr)).await, std::process::ExitCode::SUCCESS);
        assert_eq!(get(addr, "/nope", t).await.unwrap().0, 404);
        // The content type Prometheus negotiates for OpenMetrics.
        let raw = raw_get(addr, "/metrics").await;
        assert!(raw.to_ascii_lowercase().contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")), "{raw}");
        server.abort();
        assert_eq!(healthcheck(None).await, std::process::ExitCode::from(2));
    }

    async fn raw_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
