//! A small HTTP/1.1 client over hyper, one connection per request, so tests speak to the server
//! exactly as any Kubernetes client does on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use meshguard_test_apiserver::ApiServer;
use serde_json::Value;
use tokio::net::TcpStream;

/// How long a test waits for a watch event before failing.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);

pub struct Client {
    addr: SocketAddr,
    token: Option<String>,
    accept: Option<String>,
}

#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub body: Value,
}

impl Client {
    /// As the cluster admin.
    pub fn admin(server: &ApiServer) -> Self {
        Client { addr: server.addr(), token: Some(server.admin_token().to_owned()), accept: None }
    }

    pub fn with_token(server: &ApiServer, token: &str) -> Self {
        Client { addr: server.addr(), token: Some(token.to_owned()), accept: None }
    }

    pub fn anonymous(server: &ApiServer) -> Self {
        Client { addr: server.addr(), token: None, accept: None }
    }

    /// Sends this `Accept` header from now on.
    pub fn accepting(mut self, accept: &str) -> Self {
        self.accept = Some(accept.to_owned());
        self
    }

    async fn send_raw(&self, method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>) -> hyper::Response<Incoming> {
        let stream = TcpStream::connect(self.addr).await.expect("connect to the test server");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder().method(method).uri(path).header(http::header::HOST, self.addr.to_string());
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(a) = &self.accept {
            req = req.header(http::header::ACCEPT, a);
        }
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        sender.send_request(req.body(Full::new(Bytes::from(body))).expect("request")).await.expect("send request")
    }

    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Reply {
        let resp = self.send_raw(method, path, content_type, body).await;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("read body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply { code, body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, Vec::new()).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(Method::POST, path, Some("application/json"), body.to_string().into_bytes()).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(Method::PUT, path, Some("application/json"), body.to_string().into_bytes()).await
    }

    pub async fn merge_patch(&self, path: &str, body: &Value) -> Reply {
        self.send(Method::PATCH, path, Some("application/merge-patch+json"), body.to_string().into_bytes()).await
    }

    pub async fn json_patch(&self, path: &str, body: &Value) -> Reply {
        self.send(Method::PATCH, path, Some("application/json-patch+json"), body.to_string().into_bytes()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, None, Vec::new()).await
    }

    /// Opens a watch; the response head has arrived when this returns.
    pub async fn watch(&self, path: &str) -> Watch {
        let resp = self.send_raw(Method::GET, path, None, Vec::new()).await;
        Watch { code: resp.status().as_u16(), body: resp.into_body(), buf: Vec::new() }
    }
}

/// The end of a watch stream.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The final chunk arrived: the server ended the stream.
    Clean,
    /// The connection broke mid-stream.
    Cut,
}

pub struct Watch {
    pub code: u16,
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or how the stream ended.
    pub async fn next(&mut self) -> Result<Value, End> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(serde_json::from_slice(&line).expect("each watch line is a JSON event"));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) => return Err(End::Cut),
                None => return Err(End::Clean),
            }
        }
    }

    /// The next event, failing the test if none comes within [`EVENT_WAIT`].
    pub async fn event(&mut self) -> Value {
        match tokio::time::timeout(EVENT_WAIT, self.next()).await {
            Ok(Ok(e)) => e,
            Ok(Err(end)) => panic!("watch ended ({end:?}) while an event was expected"),
            Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
        }
    }

    /// The next event that is not a bookmark.
    pub async fn change(&mut self) -> Value {
        loop {
            let e = self.event().await;
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }

    /// Asserts nothing but bookmarks arrive for `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.next()).await {
            let e = next.expect("the watch should stay open");
            assert_eq!(e["type"], "BOOKMARK", "unexpected event {e}");
        }
    }

    /// How the stream ends, failing the test if it does not within [`EVENT_WAIT`].
    pub async fn end(&mut self) -> End {
        loop {
            match tokio::time::timeout(EVENT_WAIT, self.next()).await {
                Ok(Ok(e)) => assert_eq!(e["type"], "BOOKMARK", "unexpected event {e} before the end"),
                Ok(Err(end)) => return end,
                Err(_) => panic!("the watch did not end within {EVENT_WAIT:?}"),
            }
        }
    }
}

/// A pod, as fixtures describe it.
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], node: &str) -> Value {
    let labels: serde_json::Map<String, Value> = labels.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app:1" }] },
    })
}

pub fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().expect("resourceVersion").parse().expect("numeric resourceVersion")
}

pub fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().expect("items").iter().map(|i| i["metadata"]["name"].as_str().unwrap_or("").to_owned()).collect()
}
