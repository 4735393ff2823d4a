//! The handshake port and the connections to other nodes: the I/O around
//! [`Session`]. Every limit the port enforces is here, with its reason.
//!
//! - only addresses of known nodes get past `accept` (before any TLS);
//! - at most [`MAX_CONNS_PER_PEER`] connections per address and
//!   [`MAX_CONNS`] in all, and new connections per address are rate limited
//!   ([`CONN_RATE`] per second, burst [`CONN_BURST`]);
//! - the TLS handshake must finish within [`HANDSHAKE_TIMEOUT`], and a
//!   session with nothing to do closes after [`IDLE_TIMEOUT`];
//! - memory per connection is bounded: one read buffer, one frame
//!   ([`crate::handshake::frame::MAX_FRAME`]) and at most
//!   [`crate::handshake::session::MAX_IN_FLIGHT`] answered proofs;
//! - each connection is its own task, so a slow or hostile peer stalls only itself.
//!
//! Every refusal is reported (logged and counted by the agent).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshguard_ca_client::svid::{BundleCell, CredentialCell};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use parking_lot::Mutex;
use rustls::pki_types::UnixTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::handshake::{Directory, Event, Refusal, Session, SessionError, tls};

/// Connections one address may hold open: a node needs one; a few cover restarts.
pub const MAX_CONNS_PER_PEER: usize = 4;
/// Connections the port holds open in all.
pub const MAX_CONNS: usize = 4096;
/// New connections per second per address, and the burst allowed.
pub const CONN_RATE: f64 = 5.0;
pub const CONN_BURST: f64 = 20.0;
/// Time for the TLS handshake (two round trips on a LAN take well under 10 ms).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// A session with nothing outstanding closes after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A proof not answered in this time fails (and is asked again later).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_BUF: usize = 16 * 1024;

/// Whether a session's node certificates are too close to expiry to carry
/// new proofs: a proof expires with the earliest of them, so proofs made on
/// an ageing session would expire sooner at every renewal and finally lapse.
/// A session is retired for new requests once half of the node certificates'
/// lifetime left when it was established has passed (node SVIDs are renewed
/// at half-life, so the next session presents the renewed ones).
pub fn session_is_stale(node_not_after: i64, established_unix: i64, now_unix: i64) -> bool {
    let left_at_start = node_not_after - established_unix;
    node_not_after - now_unix <= left_at_start / 2
}

/// What the connections tell the agent.
#[derive(Debug)]
pub enum Report {
    /// An event of an established session with `peer_node`.
    Session { peer_node: String, event: Event },
    /// A connection was refused or failed; `pairs` are the requests it took down.
    Failed { addr: SocketAddr, peer_node: Option<String>, reason: Refusal, error: String, pairs: Vec<(SpiffeId, SpiffeId)> },
}

/// The TLS identity of this node, shared by every connection.
#[derive(Clone)]
pub struct NodeTls {
    pub node: String,
    pub trust_domain: TrustDomain,
    pub creds: CredentialCell,
    pub bundle: BundleCell,
    /// The node SVID chain now presented (DER, leaf first).
    pub chain: watch::Receiver<Arc<Vec<Vec<u8>>>>,
    /// The address connections to peers come from (the node's own; peers
    /// check it), or `None` for the routing table's choice.
    pub source: Option<IpAddr>,
}

async fn connect(source: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(to).await;
    };
    let s = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.bind(SocketAddr::new(ip, 0))?;
    s.connect(to).await
}

// === the port ===

#[derive(Default)]
struct PeerState {
    open: usize,
    tokens: f64,
    refilled: Option<Instant>,
}

/// Connection limits per address.
#[derive(Default)]
struct Admission {
    peers: HashMap<IpAddr, PeerState>,
    open: usize,
}

impl Admission {
    fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.open >= MAX_CONNS {
            return Err(Refusal::TooManyConnections);
        }
        let p = self.peers.entry(ip).or_default();
        let elapsed = p.refilled.map_or(CONN_BURST / CONN_RATE, |t| now.duration_since(t).as_secs_f64());
        p.tokens = (p.tokens + elapsed * CONN_RATE).min(CONN_BURST);
        p.refilled = Some(now);
        if p.open >= MAX_CONNS_PER_PEER {
            return Err(Refusal::TooManyConnections);
        }
        if p.tokens < 1.0 {
            return Err(Refusal::RateLimited);
        }
        p.tokens -= 1.0;
        p.open += 1;
        self.open += 1;
        Ok(())
    }

    fn release(&mut self, ip: IpAddr) {
        self.open = self.open.saturating_sub(1);
        if let Some(p) = self.peers.get_mut(&ip) {
            p.open = p.open.saturating_sub(1);
        }
    }
}

/// Serves the handshake port until the task is dropped.
pub async fn serve(listener: TcpListener, node: NodeTls, dir: watch::Receiver<Arc<Directory>>, reports: mpsc::UnboundedSender<Report>) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "handshake port: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = canonical(addr.ip());
        let refuse = |reason: Refusal, error: String| {
            let _ = reports.send(Report::Failed { addr, peer_node: None, reason, error, pairs: Vec::new() });
        };
        let d = dir.borrow().clone();
        if d.node_at(ip).is_none() {
            refuse(Refusal::UnknownAddress, "no node has this address".into());
            continue;
        }
        if let Err(reason) = admission.lock().admit(ip, Instant::now()) {
            refuse(reason, format!("limits: {MAX_CONNS_PER_PEER} connections per node, {CONN_RATE}/s"));
            continue;
        }
        let node = node.clone();
        let dir = dir.clone();
        let reports = reports.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let r = serve_one(stream, ip, &node, dir, &reports).await;
            admission.lock().release(ip);
            if let Err((peer_node, e)) = r {
                let _ = reports.send(Report::Failed { addr, peer_node, reason: e.reason(), error: e.to_string(), pairs: Vec::new() });
            }
        });
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

async fn serve_one(
    mut stream: TcpStream,
    ip: IpAddr,
    node: &NodeTls,
    dir: watch::Receiver<Arc<Directory>>,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<(), (Option<String>, SessionError)> {
    let _ = stream.set_nodelay(true);
    let cfg = tls::server_config(node.creds.clone(), node.bundle.clone()).map_err(|source| (None, SessionError::Tls { source }))?;
    let chain = node.chain.borrow().clone();
    let mut s = Session::server(cfg, &node.node, chain, ip, &dir.borrow()).map_err(|e| (None, e))?;
    let started = Instant::now();
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::with_capacity(READ_BUF);
    let mut last_activity = Instant::now();
    loop {
        flush(&mut s, &mut stream, &mut out).await.map_err(|e| (s.peer_node().map(str::to_owned), e))?;
        let deadline = if s.is_established() { last_activity + IDLE_TIMEOUT } else { started + HANDSHAKE_TIMEOUT };
        let n = match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Err(_) => {
                return Err((s.peer_node().map(str::to_owned), SessionError::Refused { reason: Refusal::Timeout }));
            }
            Ok(Err(_)) => return Ok(()),
            Ok(Ok(0)) => {
                return s.end_of_input().map_err(|e| (s.peer_node().map(str::to_owned), e));
            }
            Ok(Ok(n)) => n,
        };
        last_activity = Instant::now();
        let d = dir.borrow().clone();
        match s.receive(&buf[..n], &d, UnixTime::now()) {
            Ok(events) => {
                let peer = s.peer_node().unwrap_or_default().to_owned();
                for event in events {
                    let _ = reports.send(Report::Session { peer_node: peer.clone(), event });
                }
            }
            Err(e) => {
                let _ = flush(&mut s, &mut stream, &mut out).await;
                return Err((s.peer_node().map(str::to_owned), e));
            }
        }
    }
}

async fn flush(s: &mut Session, stream: &mut TcpStream, out: &mut Vec<u8>) -> Result<(), SessionError> {
    if !s.wants_write() {
        return Ok(());
    }
    out.clear();
    s.transmit(out);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SessionError::Closed),
        Err(_) => Err(SessionError::Refused { reason: Refusal::Timeout }),
    }
}

// === the client side ===

/// Requests to one peer node, served by one connection at a time.
pub struct PeerClient {
    tx: mpsc::UnboundedSender<(SpiffeId, SpiffeId)>,
    task: tokio::task::JoinHandle<()>,
    pub addr: SocketAddr,
}

impl PeerClient {
    pub fn start(
        peer: String,
        addr: SocketAddr,
        node: NodeTls,
        dir: watch::Receiver<Arc<Directory>>,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_client(peer, addr, node, dir, rx, reports));
        Self { tx, task, addr }
    }

    /// Asks the peer to prove `remote` to this node's `local`.
    pub fn request(&self, local: SpiffeId, remote: SpiffeId) -> bool {
        self.tx.send((local, remote)).is_ok()
    }
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_client(
    peer: String,
    addr: SocketAddr,
    node: NodeTls,
    dir: watch::Receiver<Arc<Directory>>,
    mut rx: mpsc::UnboundedReceiver<(SpiffeId, SpiffeId)>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let mut carry: Vec<(SpiffeId, SpiffeId)> = Vec::new();
    loop {
        if carry.is_empty() {
            match rx.recv().await {
                Some(r) => carry.push(r),
                None => return,
            }
        }
        let fail = |reason: Refusal, error: String, pairs: Vec<(SpiffeId, SpiffeId)>| {
            let _ = reports.send(Report::Failed { addr, peer_node: Some(peer.clone()), reason, error, pairs });
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect(node.source, addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                fail(Refusal::Timeout, format!("cannot connect: {e}"), std::mem::take(&mut carry));
                continue;
            }
            Err(_) => {
                fail(Refusal::Timeout, "connect timed out".into(), std::mem::take(&mut carry));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer_id = match node.trust_domain.node_id(&peer) {
            Ok(id) => id,
            Err(e) => {
                return fail(Refusal::NodeMismatch, e.to_string(), std::mem::take(&mut carry));
            }
        };
        let chain = node.chain.borrow().clone();
        let session = tls::client_config(node.creds.clone(), node.bundle.clone(), peer_id)
            .map_err(|source| SessionError::Tls { source })
            .and_then(|cfg| Session::client(cfg, &node.node, chain.clone(), &peer));
        let mut s = match session {
            Ok(s) => s,
            Err(e) => {
                fail(e.reason(), e.to_string(), std::mem::take(&mut carry));
                continue;
            }
        };
        let d = dir.borrow().clone();
        for (l, r) in carry.drain(..) {
            forward(&reports, &peer, s.request(l, r, &d).unwrap_or_default());
        }
        let end = drive_client(&mut s, stream, &peer, &node, &chain, &dir, &mut rx, &reports, &mut carry).await;
        let pairs = s.abandon();
        match end {
            Ok(()) if pairs.is_empty() => {}
            Ok(()) => fail(Refusal::Timeout, "session ended with proofs outstanding".into(), pairs),
            Err(e) => {
                tracing::info!(peer = %peer, error = %e, "handshake session ended");
                fail(e.reason(), e.to_string(), pairs);
            }
        }
        if rx.is_closed() && carry.is_empty() {
            return;
        }
    }
}

fn forward(reports: &mpsc::UnboundedSender<Report>, peer: &str, events: Vec<Event>) {
    for event in events {
        let _ = reports.send(Report::Session { peer_node: peer.to_owned(), event });
    }
}

/// Runs one client connection; returns when it ends. Requests that arrive
/// after the node SVID changed go to `carry`, for a new connection.
#[allow(clippy::too_many_arguments)]
async fn drive_client(
    s: &mut Session,
    mut stream: TcpStream,
    peer: &str,
    node: &NodeTls,
    chain: &Arc<Vec<Vec<u8>>>,
    dir: &watch::Receiver<Arc<Directory>>,
    rx: &mut mpsc::UnboundedReceiver<(SpiffeId, SpiffeId)>,
    reports: &mpsc::UnboundedSender<Report>,
    carry: &mut Vec<(SpiffeId, SpiffeId)>,
) -> Result<(), SessionError> {
    let started = Instant::now();
    let started_unix = crate::ca_client::now_unix();
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::with_capacity(READ_BUF);
    let mut progress = Instant::now();
    loop {
        flush(s, &mut stream, &mut out).await?;
        let deadline = if !s.is_established() {
            started + HANDSHAKE_TIMEOUT
        } else if s.outstanding() > 0 {
            progress + REQUEST_TIMEOUT
        } else {
            progress + IDLE_TIMEOUT
        };
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return s.end_of_input(),
                    Ok(n) => n,
                };
                let d = dir.borrow().clone();
                let events = s.receive(&buf[..n], &d, UnixTime::now());
                if events.is_err() {
                    let _ = flush(s, &mut stream, &mut out).await;
                }
                let events = events?;
                if events.iter().any(|e| !matches!(e, Event::Established { .. })) {
                    progress = Instant::now();
                }
                forward(reports, peer, events);
            }
            r = rx.recv() => {
                let Some((l, r)) = r else {
                    s.close();
                    let _ = flush(s, &mut stream, &mut out).await;
                    return Ok(());
                };
                let stale = s.is_established() && session_is_stale(s.node_not_after(), started_unix, crate::ca_client::now_unix());
                if *node.chain.borrow() != *chain || stale {
                    // A node SVID was renewed or is ageing: finish here, continue on a new session.
                    carry.push((l, r));
                    s.close();
                    let _ = flush(s, &mut stream, &mut out).await;
                    return Ok(());
                }
                if s.outstanding() == 0 {
                    progress = Instant::now();
                }
                let d = dir.borrow().clone();
                forward(reports, peer, s.request(l, r, &d)?);
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if s.outstanding() == 0 && s.is_established() {
                    s.close();
                    let _ = flush(s, &mut stream, &mut out).await;
                    return Ok(());
                }
                return Err(SessionError::Refused { reason: Refusal::Timeout });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_retire_halfway_through_their_node_certificates_life() {
        // Established with 100 s of node certificate left.
        assert!(!session_is_stale(1_100, 1_000, 1_000));
        assert!(!session_is_stale(1_100, 1_000, 1_049));
        assert!(session_is_stale(1_100, 1_000, 1_050));
        // Already expired: stale.
        assert!(session_is_stale(1_100, 1_000, 1_200));
    }

    #[test]
    fn admission_bounds_connections_and_rate_per_address() {
        let mut a = Admission::default();
        let ip: IpAddr = "192.168.1.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..MAX_CONNS_PER_PEER {
            a.admit(ip, t).unwrap();
        }
        assert_eq!(a.admit(ip, t), Err(Refusal::TooManyConnections));
        // Another address is not affected.
        a.admit("192.168.1.2".parse().unwrap(), t).unwrap();
        // Closing frees a slot, but the bucket runs dry under a burst.
        let mut refused = 0;
        for _ in 0..100 {
            a.release(ip);
            if a.admit(ip, t).is_err() {
                refused += 1;
                a.peers.get_mut(&ip).unwrap().open += 1;
            }
        }
        assert!(refused > 50, "the burst is bounded: {refused}");
        // Tokens come back with time.
        a.release(ip);
        assert_eq!(a.admit(ip, t + Duration::from_secs(2)), Ok(()));
    }
}
