//! The HTTP/1.1 side: the accept loop, connections that can be cut at once (a server stop), and the
//! response body type, which is either a whole JSON document or a watch's stream of events.

mod handler;
mod query;
mod route;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Bytes, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::server::Shared;
use crate::status::ApiError;

/// A listening server; dropping it (or [`Listening::stop`]) closes the listener and every
/// connection.
pub(crate) struct Listening {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listening {
    pub(crate) fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared, rx));
        Listening { shutdown, task }
    }

    /// Stops accepting, cuts every open connection, and returns once the port is free.
    pub(crate) async fn stop(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handler::handle(shared, req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Dropping the connection on shutdown closes the socket mid-response, as a killed
            // API server would; clients must notice and reconnect.
            tokio::select! {
                result = conn => if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// Ends a watch stream without its final chunk, so the client sees a broken connection.
#[derive(Debug, thiserror::Error)]
#[error("watch stream cut by the test server")]
pub(crate) struct WatchCut;

/// A response body: a complete document, or chunks from a watch task.
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, WatchCut>>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = WatchCut;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, WatchCut>>> {
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

pub(crate) fn json(code: u16, value: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::Full(Some(Bytes::from(body))))
        .unwrap_or_else(|_| Response::new(Body::Full(None)))
}

pub(crate) fn error(e: &ApiError) -> Response<Body> {
    json(e.code(), &e.status())
}

pub(crate) fn text(code: u16, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from_static(body.as_bytes()))));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The headers of a watch response; the body is chunked because its length is unknown.
pub(crate) fn stream(rx: mpsc::Receiver<Result<Bytes, WatchCut>>) -> Response<Body> {
    let mut r = Response::new(Body::Stream(rx));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
