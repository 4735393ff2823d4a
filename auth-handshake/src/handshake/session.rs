//! One node-to-node session, as a state machine without I/O: feed it the
//! TLS bytes that arrived ([`Session::receive`]), send what it has to send
//! ([`Session::transmit`]), act on the [`Event`]s it returns. The same code
//! runs on a TCP socket in the agent and on an in-memory pipe in the tests.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::sync::Arc;

use meshguard_ca_client::svid::check_leaf;
use meshguard_common::spiffe::SpiffeId;
use rustls::pki_types::{ServerName, UnixTime};

use super::frame::{Frame, FrameError, HEADER, MAX_FRAME};
use super::proof::{self, Binding, Directory, EXPORTER_LABEL, EXPORTER_LEN};
use super::{Refusal, Role, tls};

/// Most proofs a session keeps in flight (each side): beyond it the
/// initiator queues and the responder refuses with [`Refusal::Busy`].
pub const MAX_IN_FLIGHT: usize = 256;
/// Most pairs queued on a client session before it is established.
pub const MAX_QUEUED: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("tls: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("peer broke the framing: {source}")]
    Frame {
        #[from]
        source: FrameError,
    },
    #[error("peer did not negotiate ALPN {alpn:?}", alpn = String::from_utf8_lossy(tls::ALPN))]
    Alpn,
    #[error("connection refused: {reason}")]
    Refused { reason: Refusal },
    #[error("peer sent a {what} out of place (request {request})")]
    Unexpected { what: &'static str, request: u32 },
    #[error("cannot derive the session's exporter value: {source}")]
    Exporter {
        #[source]
        source: rustls::Error,
    },
    #[error("session closed")]
    Closed,
}

impl SessionError {
    /// How the refusal is counted.
    pub fn reason(&self) -> Refusal {
        match self {
            Self::Tls { .. } | Self::Alpn | Self::Exporter { .. } => Refusal::Tls,
            Self::Refused { reason } => *reason,
            Self::Frame { .. } | Self::Unexpected { .. } | Self::Closed => Refusal::Malformed,
        }
    }
}

/// A proved pair, from this node's side: write (local, remote, remote node)
/// until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub local: SpiffeId,
    pub remote: SpiffeId,
    pub remote_node: String,
    /// Unix seconds: the earliest `notAfter` of both workload chains and both node chains.
    pub expires_at: i64,
    pub role: Role,
    /// DER chains the proof rested on, leaf first: local workload, remote
    /// workload, local node, remote node (for re-checks when the bundle changes).
    pub chains: [Arc<Vec<Vec<u8>>>; 4],
}

/// What the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The TLS handshake completed with `peer_node`.
    Established { peer_node: String },
    /// Write this entry.
    Authenticated(Authenticated),
    /// A pair this node asked for was not proved: the peer refused
    /// (`by_peer`), or this node refused the peer's proof.
    Refused { local: SpiffeId, remote: SpiffeId, reason: Refusal, by_peer: bool },
    /// This node refused a peer's request, or the peer refused this node's answer.
    RefusedPeer { initiator: String, responder: String, reason: Refusal, by_peer: bool },
}

struct Pending {
    local: SpiffeId,
    remote: SpiffeId,
}

/// A responder's verified pair, written when the initiator confirms.
struct Answered {
    entry: Authenticated,
}

/// One node-to-node session.
pub struct Session {
    tls: rustls::Connection,
    role: Role,
    local_node: String,
    local_node_chain: Arc<Vec<Vec<u8>>>,
    peer_node: Option<String>,
    peer_addr: Option<IpAddr>,
    peer_node_chain: Arc<Vec<Vec<u8>>>,
    exporter: Option<[u8; EXPORTER_LEN]>,
    plain: Vec<u8>,
    queued: VecDeque<Pending>,
    next_request: u32,
    in_flight: BTreeMap<u32, Pending>,
    answered: BTreeMap<u32, Answered>,
    closed: bool,
}

// === impl Session ===

impl Session {
    /// The initiating side, towards `peer_node`. `local_node_chain` is the
    /// chain the client configuration presents (its expiry bounds entries).
    pub fn client(
        config: Arc<rustls::ClientConfig>,
        local_node: &str,
        local_node_chain: Arc<Vec<Vec<u8>>>,
        peer_node: &str,
    ) -> Result<Self, SessionError> {
        // The name is not checked (peers are named by SPIFFE ID); it must only parse.
        let name = ServerName::try_from("meshguard-auth.invalid").expect("a valid DNS name");
        let tls = rustls::ClientConnection::new(config, name).map_err(|source| SessionError::Tls { source })?;
        Ok(Self::new(tls.into(), Role::Initiator, local_node, local_node_chain, Some(peer_node.to_owned()), None))
    }

    /// The accepting side, for a connection from `peer_addr`. A connection
    /// from an address that is no known node's is refused before any TLS.
    pub fn server(
        config: Arc<rustls::ServerConfig>,
        local_node: &str,
        local_node_chain: Arc<Vec<Vec<u8>>>,
        peer_addr: IpAddr,
        dir: &Directory,
    ) -> Result<Self, SessionError> {
        if dir.node_at(peer_addr).is_none() {
            return Err(SessionError::Refused { reason: Refusal::UnknownAddress });
        }
        let tls = rustls::ServerConnection::new(config).map_err(|source| SessionError::Tls { source })?;
        Ok(Self::new(tls.into(), Role::Responder, local_node, local_node_chain, None, Some(peer_addr)))
    }

    fn new(
        mut tls: rustls::Connection,
        role: Role,
        local_node: &str,
        local_node_chain: Arc<Vec<Vec<u8>>>,
        peer_node: Option<String>,
        peer_addr: Option<IpAddr>,
    ) -> Self {
        // Frames are bounded by MAX_IN_FLIGHT on both sides, not by rustls's
        // buffer: a partial write would tear a frame.
        tls.set_buffer_limit(None);
        Self {
            tls,
            role,
            local_node: local_node.to_owned(),
            local_node_chain,
            peer_node,
            peer_addr,
            peer_node_chain: Arc::default(),
            exporter: None,
            plain: Vec::new(),
            queued: VecDeque::new(),
            next_request: 1,
            in_flight: BTreeMap::new(),
            answered: BTreeMap::new(),
            closed: false,
        }
    }

    pub fn is_established(&self) -> bool {
        self.exporter.is_some()
    }

    /// The peer node: known from the start on the client, after the TLS handshake on the server.
    pub fn peer_node(&self) -> Option<&str> {
        self.peer_node.as_deref()
    }

    /// Proofs asked for and not yet answered, plus those queued.
    pub fn outstanding(&self) -> usize {
        self.in_flight.len() + self.queued.len()
    }

    /// The earliest `notAfter` of the two node chains (0 before the handshake).
    pub fn node_not_after(&self) -> i64 {
        match (proof::chain_not_after(&self.local_node_chain), proof::chain_not_after(&self.peer_node_chain)) {
            (Ok(a), Ok(b)) => a.min(b),
            _ => 0,
        }
    }

    /// Asks the peer to prove `remote` to this node's `local` (client only).
    /// Sent once the session is established; events report the outcome.
    pub fn request(&mut self, local: SpiffeId, remote: SpiffeId, dir: &Directory) -> Result<Vec<Event>, SessionError> {
        if self.role != Role::Initiator || self.closed {
            return Err(SessionError::Closed);
        }
        if self.queued.len() >= MAX_QUEUED {
            return Ok(vec![Event::Refused { local, remote, reason: Refusal::Busy, by_peer: false }]);
        }
        self.queued.push_back(Pending { local, remote });
        Ok(self.send_queued(dir))
    }

    /// Gives up every queued and in-flight request (the connection is gone):
    /// the pairs, so the caller can count them and ask again.
    pub fn abandon(&mut self) -> Vec<(SpiffeId, SpiffeId)> {
        self.closed = true;
        let in_flight = std::mem::take(&mut self.in_flight).into_values();
        in_flight.chain(self.queued.drain(..)).map(|p| (p.local, p.remote)).collect()
    }

    /// Feeds received TLS bytes; returns what happened. An error is fatal:
    /// close the connection (after [`Session::transmit`], to send any alert).
    pub fn receive(&mut self, mut bytes: &[u8], dir: &Directory, now: UnixTime) -> Result<Vec<Event>, SessionError> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            let n = self.tls.read_tls(&mut bytes).map_err(|_| SessionError::Closed)?;
            if n == 0 {
                // rustls took nothing: its buffer holds a record it could
                // not process, which this reports; never spin.
                self.tls.process_new_packets().map_err(|source| SessionError::Tls { source })?;
                return Err(SessionError::Closed);
            }
            let state = self.tls.process_new_packets().map_err(|source| SessionError::Tls { source })?;
            if !self.tls.is_handshaking() && self.exporter.is_none() {
                events.push(self.established(dir)?);
                events.extend(self.send_queued(dir));
            }
            if state.plaintext_bytes_to_read() > 0 {
                let mut buf = vec![0u8; state.plaintext_bytes_to_read()];
                self.tls.reader().read_exact(&mut buf).map_err(|_| SessionError::Closed)?;
                self.plain.extend_from_slice(&buf);
                self.frames(dir, now, &mut events)?;
            }
            if state.peer_has_closed() {
                self.closed = true;
                break;
            }
        }
        Ok(events)
    }

    /// The peer closed its side (EOF): an error if it stopped inside a frame.
    pub fn end_of_input(&mut self) -> Result<(), SessionError> {
        self.closed = true;
        if !self.plain.is_empty() {
            return Err(FrameError::EndedMidFrame { have: self.plain.len() }.into());
        }
        Ok(())
    }

    /// Whether there are bytes to send.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Appends the TLS bytes to send to `out`.
    pub fn transmit(&mut self, out: &mut Vec<u8>) {
        while self.tls.wants_write() {
            if self.tls.write_tls(out).is_err() {
                break;
            }
        }
    }

    /// Sends TLS close_notify.
    pub fn close(&mut self) {
        self.closed = true;
        self.tls.send_close_notify();
    }

    fn established(&mut self, dir: &Directory) -> Result<Event, SessionError> {
        if self.tls.alpn_protocol() != Some(tls::ALPN) {
            return Err(SessionError::Alpn);
        }
        let certs = self.tls.peer_certificates().ok_or(SessionError::Refused { reason: Refusal::Tls })?;
        let chain: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
        let leaf = check_leaf(chain.first().map(Vec::as_slice).unwrap_or_default())
            .map_err(|_| SessionError::Refused { reason: Refusal::InvalidSvid })?;
        let node = leaf.spiffe_id.node_name().ok_or(SessionError::Refused { reason: Refusal::NodeMismatch })?.to_owned();
        match (&self.peer_node, self.peer_addr) {
            // The client's verifier accepted exactly the node it dialled.
            (Some(want), _) if *want != node => {
                return Err(SessionError::Refused { reason: Refusal::NodeMismatch });
            }
            // The server: the node SVID must be the connecting address's node.
            (None, Some(addr)) if dir.node_addrs.get(&node) != Some(&addr) => {
                return Err(SessionError::Refused { reason: Refusal::NodeMismatch });
            }
            _ => {}
        }
        let mut exporter = [0u8; EXPORTER_LEN];
        self.tls.export_keying_material(&mut exporter, EXPORTER_LABEL, None).map_err(|source| SessionError::Exporter { source })?;
        self.exporter = Some(exporter);
        self.peer_node = Some(node.clone());
        self.peer_node_chain = Arc::new(chain);
        Ok(Event::Established { peer_node: node })
    }

    fn send_queued(&mut self, dir: &Directory) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(exporter) = self.exporter else {
            return events;
        };
        let peer = self.peer_node.clone().unwrap_or_default();
        while self.in_flight.len() < MAX_IN_FLIGHT {
            let Some(p) = self.queued.pop_front() else {
                break;
            };
            let Some(key) = dir.keys.get(&p.local) else {
                events.push(Event::Refused { local: p.local, remote: p.remote, reason: Refusal::NoSvid, by_peer: false });
                continue;
            };
            let b = Binding {
                exporter: &exporter,
                initiator: &p.local,
                responder: &p.remote,
                initiator_node: &self.local_node,
                responder_node: &peer,
            };
            let signature = match key.sign(&proof::statement(Role::Initiator, &b)) {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(%error, "cannot sign a proof");
                    events.push(Event::Refused { local: p.local, remote: p.remote, reason: Refusal::NoSvid, by_peer: false });
                    continue;
                }
            };
            let request = self.next_request;
            self.next_request = self.next_request.wrapping_add(1);
            let frame = Frame::Prove {
                request,
                initiator: p.local.to_string(),
                responder: p.remote.to_string(),
                chain: key.chain.to_vec(),
                signature,
            };
            self.send(&frame);
            self.in_flight.insert(request, p);
        }
        events
    }

    fn send(&mut self, frame: &Frame) {
        let mut b = Vec::with_capacity(512);
        frame.encode(&mut b);
        // rustls buffers without limit by default; the caller drains it with transmit().
        let _ = self.tls.writer().write_all(&b);
    }

    fn frames(&mut self, dir: &Directory, now: UnixTime, events: &mut Vec<Event>) -> Result<(), SessionError> {
        let mut used = 0;
        while let Some((frame, n)) = Frame::decode(&self.plain[used..])? {
            used += n;
            self.on_frame(frame, dir, now, events)?;
        }
        self.plain.drain(..used);
        debug_assert!(self.plain.len() < HEADER + MAX_FRAME);
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame, dir: &Directory, now: UnixTime, events: &mut Vec<Event>) -> Result<(), SessionError> {
        let exporter = self.exporter.ok_or(SessionError::Unexpected { what: "frame before the handshake", request: frame.request() })?;
        let peer = self.peer_node.clone().unwrap_or_default();
        match (self.role, frame) {
            (Role::Responder, Frame::Prove { request, initiator, responder, chain, signature }) => {
                if self.answered.contains_key(&request) {
                    return Err(SessionError::Unexpected { what: "repeated request id", request });
                }
                match self.answer(request, dir, now, &exporter, &peer, &initiator, &responder, &chain, &signature) {
                    Ok((proof_frame, entry)) => {
                        self.send(&proof_frame);
                        self.answered.insert(request, Answered { entry });
                    }
                    Err(reason) => {
                        self.send(&Frame::Refuse { request, reason });
                        events.push(Event::RefusedPeer { initiator, responder, reason, by_peer: false });
                    }
                }
            }
            (Role::Responder, Frame::Confirm { request }) => {
                let a = self.answered.remove(&request).ok_or(SessionError::Unexpected { what: "confirm", request })?;
                events.push(Event::Authenticated(a.entry));
            }
            (Role::Responder, Frame::Refuse { request, reason }) => {
                let a = self.answered.remove(&request).ok_or(SessionError::Unexpected { what: "refuse", request })?;
                events.push(Event::RefusedPeer {
                    initiator: a.entry.remote.to_string(),
                    responder: a.entry.local.to_string(),
                    reason,
                    by_peer: true,
                });
            }
            (Role::Initiator, Frame::Proof { request, chain, signature }) => {
                let p = self.in_flight.remove(&request).ok_or(SessionError::Unexpected { what: "proof", request })?;
                let checked = if !dir.places(&p.remote, &peer) {
                    Err(Refusal::NotPlacedOnPeer)
                } else {
                    let b = Binding {
                        exporter: &exporter,
                        initiator: &p.local,
                        responder: &p.remote,
                        initiator_node: &self.local_node,
                        responder_node: &peer,
                    };
                    proof::verify(&dir.bundle, &chain, &p.remote, &proof::statement(Role::Responder, &b), &signature, now)
                };
                match checked.and_then(|v| dir.keys.get(&p.local).map(|k| (v, k.clone())).ok_or(Refusal::NoSvid)) {
                    Ok((v, key)) => {
                        self.send(&Frame::Confirm { request });
                        let expires_at = v.not_after.min(key.not_after).min(self.node_not_after());
                        let chains = [key.chain.clone(), Arc::new(chain), self.local_node_chain.clone(), self.peer_node_chain.clone()];
                        events.push(Event::Authenticated(Authenticated {
                            local: p.local,
                            remote: p.remote,
                            remote_node: peer,
                            expires_at,
                            role: Role::Initiator,
                            chains,
                        }));
                    }
                    Err(reason) => {
                        self.send(&Frame::Refuse { request, reason });
                        events.push(Event::Refused { local: p.local, remote: p.remote, reason, by_peer: false });
                    }
                }
                events.extend(self.send_queued(dir));
            }
            (Role::Initiator, Frame::Refuse { request, reason }) => {
                let p = self.in_flight.remove(&request).ok_or(SessionError::Unexpected { what: "refuse", request })?;
                events.push(Event::Refused { local: p.local, remote: p.remote, reason, by_peer: true });
                events.extend(self.send_queued(dir));
            }
            (_, f) => {
                let what = match f {
                    Frame::Prove { .. } => "prove",
                    Frame::Proof { .. } => "proof",
                    Frame::Refuse { .. } => "refuse",
                    Frame::Confirm { .. } => "confirm",
                };
                return Err(SessionError::Unexpected { what, request: f.request() });
            }
        }
        Ok(())
    }

    /// The responder's checks, in order, and its proof.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        request: u32,
        dir: &Directory,
        now: UnixTime,
        exporter: &[u8; EXPORTER_LEN],
        peer: &str,
        initiator: &str,
        responder: &str,
        chain: &[Vec<u8>],
        signature: &[u8],
    ) -> Result<(Frame, Authenticated), Refusal> {
        let initiator = SpiffeId::parse(initiator).map_err(|_| Refusal::Malformed)?;
        let responder = SpiffeId::parse(responder).map_err(|_| Refusal::Malformed)?;
        if !dir.places(&responder, &self.local_node) {
            return Err(Refusal::NotHostedHere);
        }
        let key = dir.keys.get(&responder).ok_or(Refusal::NoSvid)?;
        if !dir.places(&initiator, peer) {
            return Err(Refusal::NotPlacedOnPeer);
        }
        let b = Binding { exporter, initiator: &initiator, responder: &responder, initiator_node: peer, responder_node: &self.local_node };
        let v = proof::verify(&dir.bundle, chain, &initiator, &proof::statement(Role::Initiator, &b), signature, now)?;
        let signature = key.sign(&proof::statement(Role::Responder, &b)).map_err(|error| {
            tracing::error!(%error, "cannot sign a proof");
            Refusal::NoSvid
        })?;
        let expires_at = v.not_after.min(key.not_after).min(self.node_not_after());
        let entry = Authenticated {
            local: responder,
            remote: initiator,
            remote_node: peer.to_owned(),
            expires_at,
            role: Role::Responder,
            chains: [key.chain.clone(), Arc::new(chain.to_vec()), self.local_node_chain.clone(), self.peer_node_chain.clone()],
        };
        Ok((Frame::Proof { request, chain: key.chain.to_vec(), signature }, entry))
    }
}

/// Hooks for tests that play a hostile peer.
#[cfg(feature = "testing")]
impl Session {
    /// Writes raw bytes into the TLS stream, as a peer that ignores the framing would.
    pub fn inject_plaintext(&mut self, bytes: &[u8]) {
        let _ = self.tls.writer().write_all(bytes);
    }

    /// The exporter value proofs on this session are bound to.
    pub fn exporter(&self) -> Option<[u8; EXPORTER_LEN]> {
        self.exporter
    }
}
