//! The mutual-authentication agent: keeps the auth map in step with what
//! has been proved. It follows the cluster view and this node's SVIDs,
//! proves ahead the pairs `authentication: required` policies need
//! ([`needed_pairs`]), answers the datapath's auth-required signals, renews
//! entries before they expire or when a key changes, and deletes them when
//! what they rest on goes away. The protocol is [`crate::handshake`]; the
//! sockets are [`crate::peers`]; the bookkeeping is [`crate::entries`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshguard_ca_client::svid::{BundleCell, CredentialCell, X509Bundle};
use meshguard_common::cluster::ClusterView;
use meshguard_common::policy::auth_pairs::needed_pairs;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_ebpf::policy::Direction;
use meshguard_ebpf::replay::Replayer;
use meshguard_ebpf::{AuthPair, DatapathError, PinLayout};
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::{mpsc, watch};

use crate::ca_client::{Svid, now_unix};
use crate::entries::{AuthMap, Book, Deletion, MemoryAuthMap, PairKey, numeric};
use crate::handshake::{Authenticated, Directory, Event, Refusal, Role, WorkloadKey};
use crate::metrics::{Metrics, role_str};
use crate::peers::{self, NodeTls, PeerClient, REQUEST_TIMEOUT, Report};
use crate::svids::SvidState;

/// How often entries are checked for renewal and expiry, and closed maps retried.
pub const TICK: Duration = Duration::from_millis(200);
/// After a refusal or failure, a pair is asked for again after this long.
pub const RETRY: Duration = Duration::from_secs(1);
/// An entry resting on a replaced local SVID is deleted unless re-proved within this.
pub const KEY_CHANGE_GRACE: Duration = Duration::from_secs(1);
/// A proof that leaves an entry less than this to live is not written: it
/// rests on a certificate about to expire (an ageing session), and writing
/// it would replace a live entry with a dying one.
pub const MIN_ENTRY_LIFE: i64 = 2;
/// Entries an earlier run left in the pinned map and this run has not
/// proved are removed this long after the map is opened.
pub const SWEEP_AFTER: Duration = Duration::from_secs(10);

/// A first packet is held this long for its entry, then dropped (TCP
/// has retransmitted by then and the retransmission is signalled anew).
pub const HOLD: Duration = Duration::from_secs(2);
/// Most packets held per pair, and in all.
pub const MAX_HELD_PER_PAIR: usize = 8;
pub const MAX_HELD: usize = 1024;

/// One auth-required signal from the datapath, by number.
#[derive(Debug, Clone)]
pub struct Signal {
    pub pair: AuthPair,
    pub at: Instant,
    /// The packet that raised it, to replay once the entry is written.
    pub held: Option<Held>,
}

/// A packet the datapath dropped for want of an auth entry, as it saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub direction: Direction,
    pub ifindex: u32,
    /// Ethernet header first.
    pub frame: Vec<u8>,
}

/// Where the auth map and the signals come from.
pub enum Datapath {
    /// The node's pinned datapath (opened when wg-agent has loaded it).
    Pinned(PinLayout),
    /// In memory (tests, nodes without a datapath); signals arrive on the
    /// channel, and held packets are "replayed" into the list.
    Memory(MemoryAuthMap, mpsc::UnboundedReceiver<Signal>, MemoryReplay),
}

/// Where held packets go once their entry is written.
pub trait Replay: Send {
    fn replay(&self, direction: Direction, ifindex: u32, frame: &[u8]) -> std::io::Result<()>;
}

impl Replay for Replayer {
    fn replay(&self, direction: Direction, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        Replayer::replay(self, direction, ifindex, frame)
    }
}

/// Records what would be replayed (tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryReplay(pub Arc<std::sync::Mutex<Vec<Held>>>);

impl Replay for MemoryReplay {
    fn replay(&self, direction: Direction, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push(Held { direction, ifindex, frame: frame.to_vec() });
        Ok(())
    }
}

/// The node credential, as the CA client keeps it.
pub trait NodeCredentials: Send + Sync {
    fn node_svid(&self) -> Option<Svid>;
}

impl NodeCredentials for crate::ca_client::GrpcCa {
    fn node_svid(&self) -> Option<Svid> {
        crate::ca_client::GrpcCa::node_svid(self)
    }
}

/// What the agent is started with.
pub struct Settings {
    pub node: String,
    pub trust_domain: TrustDomain,
    /// The handshake port, on every node.
    pub port: u16,
    /// Where this node listens (usually `0.0.0.0:<port>`).
    pub listen: SocketAddr,
    /// Prove policy pairs before their first packet (`proveAhead`).
    pub prove_ahead: bool,
}

struct NullMap;

impl AuthMap for NullMap {
    fn set(&mut self, _: AuthPair, _: std::time::SystemTime) -> Result<(), DatapathError> {
        Ok(())
    }
    fn remove(&mut self, _: AuthPair) -> Result<(), DatapathError> {
        Ok(())
    }
    fn pairs(&self) -> Result<Vec<AuthPair>, DatapathError> {
        Ok(Vec::new())
    }
}

struct Agent {
    s: Settings,
    metrics: Arc<Metrics>,
    creds_source: Arc<dyn NodeCredentials>,
    book: Book,
    map: Option<Box<dyn AuthMap>>,
    pin: Option<PinLayout>,
    map_opened: Option<Instant>,
    swept: bool,
    view: Arc<ClusterView>,
    svids: Arc<SvidState>,
    ids_by_num: HashMap<u32, SpiffeId>,
    nodes_by_num: HashMap<u32, String>,
    keys: BTreeMap<SpiffeId, Arc<WorkloadKey>>,
    bundle: BundleCell,
    bundle_der: Vec<Vec<u8>>,
    bundle_changed: bool,
    /// When the bundle last changed: proofs arriving soon after were
    /// verified, maybe, against the old one and are checked again.
    bundle_changed_at: Option<Instant>,
    node_tls: NodeTls,
    chain_tx: watch::Sender<Arc<Vec<Vec<u8>>>>,
    dir_tx: watch::Sender<Arc<Directory>>,
    reports_tx: mpsc::UnboundedSender<Report>,
    peers: BTreeMap<String, PeerClient>,
    inflight: BTreeMap<PairKey, (Instant, bool)>,
    backoff: BTreeMap<PairKey, Instant>,
    signaled: BTreeMap<PairKey, Instant>,
    key_changed_since: BTreeMap<PairKey, Instant>,
    /// First packets waiting for their pair's entry.
    held: HashMap<AuthPair, Vec<(Instant, Held)>>,
    held_count: usize,
    /// Signals naming identities or a node the view does not know yet (the
    /// datapath learned them first): tried again on each view, for `HOLD`.
    unresolved: HashMap<AuthPair, Instant>,
    /// Replays held packets; loaded with the pinned map.
    replayer: Option<Box<dyn Replay>>,
}

/// Runs the agent until the task is dropped. Waits for the node SVID, a
/// trust bundle and the handshake port first.
pub async fn run(
    s: Settings,
    creds_source: Arc<dyn NodeCredentials>,
    mut svids: watch::Receiver<Arc<SvidState>>,
    mut view: watch::Receiver<Arc<ClusterView>>,
    datapath: Datapath,
    metrics: Arc<Metrics>,
) {
    // The node credential and a bundle, before anything can be proved.
    let (node_svid, bundle_der) = loop {
        let st = svids.borrow().clone();
        if let Some(n) = creds_source.node_svid()
            && !st.bundle.x509_authorities.is_empty()
        {
            break (n, st.bundle.x509_authorities.clone());
        }
        tokio::select! {
            _ = svids.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    };
    let bundle = match X509Bundle::new(s.trust_domain.clone(), bundle_der.iter().map(|c| CertificateDer::from(c.clone())).collect()) {
        Ok(b) => BundleCell::new(b),
        Err(error) => return tracing::error!(%error, "the CA's bundle is unusable; no handshakes"),
    };
    let creds = CredentialCell::default();
    if let Err(error) = creds.set(node_svid.chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), &node_svid.key_pkcs8) {
        return tracing::error!(%error, "the node SVID is unusable; no handshakes");
    }
    let (chain_tx, chain_rx) = watch::channel(Arc::new(node_svid.chain.clone()));
    let node_tls = NodeTls {
        node: s.node.clone(),
        trust_domain: s.trust_domain.clone(),
        creds,
        bundle: bundle.clone(),
        chain: chain_rx,
        source: Some(s.listen.ip()).filter(|ip| !ip.is_unspecified()),
    };
    let (dir_tx, dir_rx) = watch::channel(Arc::new(Directory {
        node: s.node.clone(),
        bundle: bundle.get(),
        keys: BTreeMap::new(),
        placement: BTreeMap::new(),
        node_addrs: BTreeMap::new(),
    }));
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let listener = loop {
        match tokio::net::TcpListener::bind(s.listen).await {
            Ok(l) => break l,
            Err(error) => {
                tracing::error!(%error, listen = %s.listen, "cannot listen on the handshake port; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    tracing::info!(listen = %s.listen, node = %s.node, "handshake port open");
    let server = tokio::spawn(peers::serve(listener, node_tls.clone(), dir_rx, reports_tx.clone()));
    let _server = AbortOnDrop(server);

    let mut signal_task = None;
    let (map, pin, mut signals, replayer) = match datapath {
        Datapath::Memory(m, rx, replay) => (Some(Box::new(m) as Box<dyn AuthMap>), None, rx, Some(Box::new(replay) as Box<dyn Replay>)),
        Datapath::Pinned(pin) => {
            let (tx, rx) = mpsc::unbounded_channel();
            signal_task = Some(AbortOnDrop(tokio::spawn(read_signals(pin.clone(), tx))));
            (None, Some(pin), rx, None)
        }
    };
    let _signal_task = signal_task;
    let mut a = Agent {
        s,
        metrics,
        creds_source,
        book: Book::default(),
        map_opened: map.as_ref().map(|_| Instant::now()),
        map,
        pin,
        swept: false,
        view: Arc::default(),
        svids: Arc::default(),
        ids_by_num: HashMap::new(),
        nodes_by_num: HashMap::new(),
        keys: BTreeMap::new(),
        bundle,
        bundle_der,
        bundle_changed: false,
        bundle_changed_at: None,
        node_tls,
        chain_tx,
        dir_tx,
        reports_tx,
        peers: BTreeMap::new(),
        inflight: BTreeMap::new(),
        backoff: BTreeMap::new(),
        signaled: BTreeMap::new(),
        key_changed_since: BTreeMap::new(),
        held: HashMap::new(),
        held_count: 0,
        unresolved: HashMap::new(),
        replayer,
    };
    a.refresh(svids.borrow_and_update().clone(), view.borrow_and_update().clone());
    a.reconcile();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            r = svids.changed() => {
                if r.is_err() { return }
                a.refresh(svids.borrow_and_update().clone(), a.view.clone());
                a.reconcile();
            }
            r = view.changed() => {
                if r.is_err() { return }
                a.refresh(a.svids.clone(), view.borrow_and_update().clone());
                a.retry_unresolved();
                a.reconcile();
            }
            Some(r) = reports.recv() => {
                a.report(r);
                while let Ok(r) = reports.try_recv() {
                    a.report(r);
                }
            }
            Some(sig) = signals.recv() => {
                a.signal(sig);
                while let Ok(sig) = signals.try_recv() {
                    a.signal(sig);
                }
            }
            _ = tick.tick() => {
                a.tick();
                a.reconcile();
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Forwards the pinned ring's auth-required signals, opening it when it appears.
async fn read_signals(pin: PinLayout, tx: mpsc::UnboundedSender<Signal>) {
    use meshguard_ebpf::events::{EventKind, EventReader};
    loop {
        let reader = match EventReader::open_auth_signals(&pin).and_then(|r| r.into_async()) {
            Ok(r) => r,
            Err(error) => {
                tracing::debug!(%error, "auth signal ring not there yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(pin = %pin.root().display(), "reading auth-required signals");
        let mut reader = reader;
        loop {
            match reader.next().await {
                Ok(e) if e.kind == EventKind::AuthRequired => {
                    let pair = AuthPair { local_identity: e.subject, remote_identity: e.peer, remote_node: e.peer_node };
                    let held = (!e.frame.is_empty()).then_some(Held { direction: e.direction, ifindex: e.ifindex, frame: e.frame });
                    if tx.send(Signal { pair, at: Instant::now(), held }).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "auth signal ring failed; reopening");
                    break;
                }
            }
        }
    }
}

// === impl Agent ===

impl Agent {
    /// Rebuilds the directory from the latest SVIDs and view.
    fn refresh(&mut self, svids: Arc<SvidState>, view: Arc<ClusterView>) {
        if !svids.bundle.x509_authorities.is_empty() && svids.bundle.x509_authorities != self.bundle_der {
            let certs = svids.bundle.x509_authorities.iter().map(|c| CertificateDer::from(c.clone())).collect();
            match X509Bundle::new(self.s.trust_domain.clone(), certs) {
                Ok(b) => {
                    tracing::info!(authorities = svids.bundle.x509_authorities.len(), "trust bundle changed; re-checking every entry");
                    self.bundle.set(b);
                    self.bundle_der = svids.bundle.x509_authorities.clone();
                    self.bundle_changed = true;
                    self.bundle_changed_at = Some(Instant::now());
                }
                Err(error) => {
                    tracing::error!(%error, "the CA's new bundle is unusable; keeping the old one")
                }
            }
        }
        let mut keys = BTreeMap::new();
        for (id, svid) in &svids.svids {
            match self.keys.get(id) {
                Some(k) if *k.chain == svid.chain => {
                    keys.insert(id.clone(), k.clone());
                }
                _ => match WorkloadKey::new(id.clone(), svid.chain.clone(), &svid.key_pkcs8) {
                    Ok(k) => {
                        keys.insert(id.clone(), Arc::new(k));
                    }
                    Err(error) => tracing::error!(%error, "workload SVID unusable for proofs"),
                },
            }
        }
        self.keys = keys;
        let td = view.trust_domain_or_default();
        let mut placement: BTreeMap<SpiffeId, BTreeSet<String>> = BTreeMap::new();
        for w in view.workloads.values() {
            if let Ok(id) = w.spiffe_id(&td) {
                placement.entry(id).or_default().insert(w.node.clone());
            }
        }
        let node_addrs: BTreeMap<String, IpAddr> = view.nodes.values().map(|n| (n.name.clone(), n.endpoint.ip())).collect();
        self.ids_by_num = view.identities.iter().map(|(id, n)| (*n, id.clone())).collect();
        self.nodes_by_num = view.node_ids.iter().map(|(name, n)| (*n, name.clone())).collect();
        self.dir_tx.send_replace(Arc::new(Directory {
            node: self.s.node.clone(),
            bundle: self.bundle.get(),
            keys: self.keys.clone(),
            placement,
            node_addrs,
        }));
        self.svids = svids;
        self.view = view;
    }

    fn dir(&self) -> Arc<Directory> {
        self.dir_tx.borrow().clone()
    }

    fn tick(&mut self) {
        // The node SVID renewed: new sessions present it, entries are re-proved.
        if let Some(n) = self.creds_source.node_svid()
            && **self.chain_tx.borrow() != n.chain
        {
            match self.node_tls.creds.set(n.chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), &n.key_pkcs8) {
                Ok(()) => {
                    tracing::info!(node = %self.s.node, "node SVID renewed; re-proving entries on new sessions");
                    self.chain_tx.send_replace(Arc::new(n.chain));
                }
                Err(error) => tracing::error!(%error, "renewed node SVID unusable"),
            }
        }
        if self.map.is_none()
            && let Some(pin) = &self.pin
        {
            match meshguard_ebpf::AuthTable::open(pin) {
                Ok(t) => {
                    let mut t: Box<dyn AuthMap> = Box::new(t);
                    if let Err(error) = self.book.write_all(t.as_mut()) {
                        tracing::error!(%error, "cannot write the auth map");
                    }
                    tracing::info!(pin = %pin.root().display(), entries = self.book.len(), "auth map open");
                    self.map = Some(t);
                    self.map_opened = Some(Instant::now());
                    match Replayer::load(pin) {
                        Ok(r) => self.replayer = Some(Box::new(r)),
                        // Held packets then stay dropped, as they would without holding.
                        Err(error) => tracing::error!(%error, "cannot load the replay program; first packets of unproved pairs are lost"),
                    }
                }
                Err(error) => tracing::debug!(%error, "auth map not there yet"),
            }
        }
        if !self.swept
            && let (Some(opened), Some(map)) = (self.map_opened, self.map.as_mut())
            && opened.elapsed() >= SWEEP_AFTER
        {
            self.swept = true;
            let ours: BTreeSet<AuthPair> = self.book.keys().filter_map(|k| self.book.get(k)).map(|e| e.pair).collect();
            match map.pairs() {
                Ok(all) => {
                    for p in all.into_iter().filter(|p| !ours.contains(p)) {
                        tracing::info!(?p, "removing an entry this run did not prove");
                        let _ = map.remove(p);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot list the auth map"),
            }
        }
        let now = Instant::now();
        let mut expired = 0;
        self.held.retain(|_, frames| {
            let before = frames.len();
            frames.retain(|(at, _)| now.duration_since(*at) < HOLD);
            expired += before - frames.len();
            !frames.is_empty()
        });
        if expired > 0 {
            self.held_count -= expired;
            self.metrics.held("expired", expired as u64);
        }
        let lapsed: Vec<AuthPair> = self.unresolved.iter().filter(|(_, at)| now.duration_since(**at) >= HOLD).map(|(p, _)| *p).collect();
        for pair in lapsed {
            self.unresolved.remove(&pair);
            self.unresolved_expired(pair);
        }
        self.inflight.retain(|_, (since, _)| now.duration_since(*since) < REQUEST_TIMEOUT * 2);
        self.backoff.retain(|_, until| *until > now);
    }

    /// Applies deletions and renewals, starts what is needed and missing.
    fn reconcile(&mut self) {
        let dir = self.dir();
        let now = now_unix();
        // Connections follow the node records.
        let wanted: BTreeMap<String, SocketAddr> = dir
            .node_addrs
            .iter()
            .filter(|(n, _)| **n != self.s.node)
            .map(|(n, ip)| (n.clone(), SocketAddr::new(*ip, self.s.port)))
            .collect();
        self.peers.retain(|n, c| wanted.get(n) == Some(&c.addr));
        for (n, addr) in &wanted {
            if !self.peers.contains_key(n) {
                let c = PeerClient::start(n.clone(), *addr, self.node_tls.clone(), self.dir_tx.subscribe(), self.reports_tx.clone());
                self.peers.insert(n.clone(), c);
            }
        }

        let chain = self.chain_tx.borrow().clone();
        let plan = self.book.plan(&dir, &self.view, &chain, now, std::mem::take(&mut self.bundle_changed));
        for (key, why) in plan.delete {
            self.delete(&key, why);
        }
        let t = Instant::now();
        for key in plan.renew {
            if self.book.key_changed(&key, &dir) {
                let since = *self.key_changed_since.entry(key.clone()).or_insert(t);
                if t.duration_since(since) >= KEY_CHANGE_GRACE {
                    self.delete(&key, Deletion::KeyChanged);
                    continue;
                }
            }
            self.request(&key, true, &dir);
        }
        let ahead = if self.s.prove_ahead { needed_pairs(&self.view, &self.s.node) } else { BTreeSet::new() };
        for p in ahead {
            let key = PairKey { local: p.local, remote: p.remote, remote_node: p.remote_node };
            if !self.book.is_fresh(&key, now, 0) {
                self.request(&key, false, &dir);
            }
        }
        self.metrics.entries.set(self.book.len() as i64);
    }

    fn delete(&mut self, key: &PairKey, why: Deletion) {
        let map: &mut dyn AuthMap = match self.map.as_mut() {
            Some(m) => m.as_mut(),
            None => &mut NullMap,
        };
        match self.book.remove(key, map) {
            Ok(Some(_)) => {
                tracing::info!(local = %key.local, remote = %key.remote, remote_node = %key.remote_node, reason = why.as_str(), "auth entry deleted");
                self.metrics.deleted(why);
            }
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot delete an auth entry"),
        }
        self.key_changed_since.remove(key);
    }

    /// Asks for a proof of `key`, unless one is under way or backing off.
    fn request(&mut self, key: &PairKey, renewal: bool, dir: &Directory) {
        if self.inflight.contains_key(key) || self.backoff.contains_key(key) {
            return;
        }
        if !dir.keys.contains_key(&key.local) {
            // This node cannot prove its own side: refused here, counted, retried later.
            self.metrics.refused(Refusal::NoSvid, "initiator");
            tracing::info!(local = %key.local, remote = %key.remote, remote_node = %key.remote_node, "no SVID held for the local identity; pair not proved");
            self.backoff.insert(key.clone(), Instant::now() + RETRY);
            return;
        }
        if key.remote_node == self.s.node {
            self.prove_locally(key, renewal, dir);
            return;
        }
        let Some(peer) = self.peers.get(&key.remote_node) else {
            return;
        };
        if peer.request(key.local.clone(), key.remote.clone()) {
            self.inflight.insert(key.clone(), (Instant::now(), renewal));
        }
    }

    /// Both identities on this node: this agent holds both SVIDs and is
    /// authoritative for both sides; it checks both chains and writes both
    /// directions.
    fn prove_locally(&mut self, key: &PairKey, renewal: bool, dir: &Directory) {
        let now = UnixTime::now();
        let chain = self.chain_tx.borrow().clone();
        let node_not_after = crate::handshake::proof::chain_not_after(&chain).unwrap_or(0);
        let check = |id: &SpiffeId| -> Result<Arc<WorkloadKey>, Refusal> {
            if !dir.places(id, &dir.node) {
                return Err(Refusal::NotHostedHere);
            }
            let k = dir.keys.get(id).ok_or(Refusal::NoSvid)?;
            let ders: Vec<CertificateDer<'_>> = k.chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
            dir.bundle.verify(&ders, now).map_err(|_| Refusal::UntrustedChain)?;
            Ok(k.clone())
        };
        let (l, r) = match (check(&key.local), check(&key.remote)) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(reason), _) | (_, Err(reason)) => {
                self.metrics.refused(reason, "local");
                tracing::info!(local = %key.local, remote = %key.remote, reason = reason.as_str(), "same-node pair not proved");
                self.backoff.insert(key.clone(), Instant::now() + RETRY);
                return;
            }
        };
        let expires_at = l.not_after.min(r.not_after).min(node_not_after);
        for (a, b) in [(&l, &r), (&r, &l)] {
            let proof = Authenticated {
                local: a.id.clone(),
                remote: b.id.clone(),
                remote_node: self.s.node.clone(),
                expires_at,
                role: Role::Initiator,
                chains: [a.chain.clone(), b.chain.clone(), chain.clone(), chain.clone()],
            };
            self.write(proof, renewal, None, "local");
        }
    }

    fn write(&mut self, proof: Authenticated, renewal: bool, started: Option<Instant>, role: &str) {
        let key = PairKey::of(&proof);
        if proof.expires_at < now_unix() + MIN_ENTRY_LIFE {
            tracing::info!(local = %key.local, remote = %key.remote, remote_node = %key.remote_node, expires_at = proof.expires_at, role, "proof rests on a certificate about to expire; not written");
            self.metrics.refused(Refusal::Expired, role);
            self.backoff.insert(key, Instant::now() + TICK);
            return;
        }
        let dir = self.dir();
        if !dir.places(&key.local, &self.s.node) || !dir.places(&key.remote, &key.remote_node) {
            tracing::info!(local = %key.local, remote = %key.remote, "proved pair is no longer placed; not written");
            return;
        }
        if self.bundle_changed_at.is_some_and(|t| t.elapsed() < REQUEST_TIMEOUT * 2) {
            let now = UnixTime::now();
            let ok = proof.chains.iter().all(|c| {
                let ders: Vec<CertificateDer<'_>> = c.iter().map(|d| CertificateDer::from(d.as_slice())).collect();
                dir.bundle.verify(&ders, now).is_ok()
            });
            if !ok {
                tracing::info!(local = %key.local, remote = %key.remote, "proof rests on a retired authority; not written");
                self.metrics.refused(Refusal::UntrustedChain, role);
                return;
            }
        }
        let Some(pair) = numeric(&self.view, &key) else {
            tracing::warn!(local = %key.local, remote = %key.remote, remote_node = %key.remote_node, "no numeric identity or node id yet; entry not written");
            self.backoff.insert(key, Instant::now() + RETRY);
            return;
        };
        let expires_at = proof.expires_at;
        let map: &mut dyn AuthMap = match self.map.as_mut() {
            Some(m) => m.as_mut(),
            None => &mut NullMap,
        };
        match self.book.insert(proof, pair, now_unix(), map) {
            Ok(replaced) => {
                if replaced && renewal {
                    self.metrics.renewals.inc();
                }
                self.metrics.ok(role);
                if let Some(t) = started {
                    self.metrics.handshake_seconds.observe(t.elapsed().as_secs_f64());
                }
                if let Some(t) = self.signaled.remove(&key) {
                    self.metrics.signal_to_entry_seconds.observe(t.elapsed().as_secs_f64());
                }
                self.key_changed_since.remove(&key);
                self.release(pair);
                tracing::debug!(local = %key.local, remote = %key.remote, remote_node = %key.remote_node, expires_at, role, "auth entry written");
            }
            Err(error) => tracing::error!(%error, "cannot write the auth map"),
        }
        self.metrics.entries.set(self.book.len() as i64);
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Session { peer_node, event } => match event {
                Event::Established { .. } => {
                    tracing::debug!(peer = %peer_node, "handshake session established")
                }
                Event::Authenticated(proof) => {
                    let key = PairKey::of(&proof);
                    let (started, renewal) = match self.inflight.remove(&key) {
                        Some((t, renewal)) => (Some(t), renewal || self.book.get(&key).is_some()),
                        None => (None, self.book.get(&key).is_some()),
                    };
                    let role = role_str(proof.role);
                    self.write(proof, renewal, started.filter(|_| role == "initiator"), role);
                }
                Event::Refused { local, remote, reason, by_peer } => {
                    let key = PairKey { local, remote, remote_node: peer_node };
                    self.inflight.remove(&key);
                    self.backoff.insert(key.clone(), Instant::now() + RETRY);
                    self.metrics.refused(reason, "initiator");
                    tracing::info!(local = %key.local, remote = %key.remote, peer = %key.remote_node, reason = reason.as_str(), by_peer, "pair not proved");
                    if self.book.key_changed(&key, &self.dir()) {
                        self.delete(&key, Deletion::KeyChanged);
                    }
                }
                Event::RefusedPeer { initiator, responder, reason, by_peer } => {
                    self.metrics.refused(reason, "responder");
                    tracing::info!(peer = %peer_node, %initiator, %responder, reason = reason.as_str(), by_peer, "peer's proof request refused");
                }
            },
            Report::Failed { addr, peer_node, reason, error, pairs } => {
                self.metrics.refused(reason, "connection");
                tracing::info!(peer = %addr, node = peer_node.as_deref().unwrap_or("?"), reason = reason.as_str(), %error, pending = pairs.len(), "handshake connection refused or failed");
                if let Some(node) = peer_node {
                    for (local, remote) in pairs {
                        let key = PairKey { local, remote, remote_node: node.clone() };
                        self.inflight.remove(&key);
                        self.backoff.insert(key, Instant::now() + RETRY);
                    }
                }
            }
        }
    }

    fn signal(&mut self, sig: Signal) {
        self.metrics.signals.inc();
        if let Some(h) = sig.held {
            self.hold(sig.pair, sig.at, h);
        }
        self.judge_signal(sig.pair, sig.at);
    }

    /// Asks for the signalled pair's proof, or parks the signal when the view
    /// does not know its identities or node yet.
    fn judge_signal(&mut self, pair: AuthPair, at: Instant) {
        let (Some(local), Some(remote), Some(node)) = (
            self.ids_by_num.get(&pair.local_identity),
            self.ids_by_num.get(&pair.remote_identity),
            self.nodes_by_num.get(&pair.remote_node),
        ) else {
            if self.unresolved.len() < MAX_HELD || self.unresolved.contains_key(&pair) {
                self.unresolved.entry(pair).or_insert(at);
            }
            tracing::debug!(?pair, "auth signal for identities or a node the view does not know yet; waiting for the view");
            return;
        };
        let key = PairKey { local: local.clone(), remote: remote.clone(), remote_node: node.clone() };
        if self.book.is_fresh(&key, now_unix(), 0) {
            // Proved already: the packet crossed the write, or the map lost
            // the entry. Write it again and let the packet through.
            if let (Some(e), Some(map)) = (self.book.get(&key), self.map.as_mut()) {
                let (pair, expires) = (e.pair, crate::entries::unix_to_system(e.proof.expires_at));
                if let Err(error) = map.set(pair, expires) {
                    tracing::error!(%error, "cannot write the auth map");
                }
                self.release(pair);
            }
            return;
        }
        self.signaled.entry(key.clone()).or_insert(at);
        let dir = self.dir();
        self.request(&key, false, &dir);
    }

    /// A new view: parked signals it now resolves go ahead; the rest wait,
    /// up to `HOLD` from their signal.
    fn retry_unresolved(&mut self) {
        let now = Instant::now();
        for (pair, at) in std::mem::take(&mut self.unresolved) {
            if now.duration_since(at) < HOLD {
                self.judge_signal(pair, at);
            } else {
                self.unresolved_expired(pair);
            }
        }
    }

    fn unresolved_expired(&self, pair: AuthPair) {
        self.metrics.signals_unresolved.inc();
        tracing::info!(?pair, "auth signal dropped: the cluster view never named its identities or node");
    }

    /// Keeps a first packet until its pair's entry is written, within bounds.
    fn hold(&mut self, pair: AuthPair, at: Instant, h: Held) {
        let frames = self.held.entry(pair).or_default();
        if frames.len() >= MAX_HELD_PER_PAIR || self.held_count >= MAX_HELD {
            self.metrics.held("overflow", 1);
            return;
        }
        frames.push((at, h));
        self.held_count += 1;
        self.metrics.held("held", 1);
    }

    /// The pair's entry is in the map: replay its held packets where the
    /// datapath saw them, to be judged again.
    fn release(&mut self, pair: AuthPair) {
        let Some(frames) = self.held.remove(&pair) else {
            return;
        };
        self.held_count -= frames.len();
        for (_, h) in frames {
            let result = match &self.replayer {
                Some(r) => r.replay(h.direction, h.ifindex, &h.frame),
                None => Err(std::io::Error::other("no replay program loaded")),
            };
            match result {
                Ok(()) => self.metrics.held("replayed", 1),
                Err(error) => {
                    tracing::warn!(%error, ifindex = h.ifindex, ?pair, "cannot replay a held packet");
                    self.metrics.held("failed", 1);
                }
            }
        }
    }
}
