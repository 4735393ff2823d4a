//! Two whole handshake agents in one process, over real TCP on loopback
//! (node-1 on 127.0.0.1, node-2 on 127.0.0.2), with real TLS and rcgen
//! certificates, each writing an in-memory auth map. The cluster view and
//! the SVIDs are fed by hand, so each test can move workloads, rotate keys
//! and retire authorities and time what the agents do.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshguard_auth_handshake::ca_client::{CaBundle, Svid};
use meshguard_auth_handshake::entries::MemoryAuthMap;
use meshguard_auth_handshake::metrics::Metrics;
use meshguard_auth_handshake::mutual::{self, Datapath, Held, MemoryReplay, NodeCredentials, Settings, Signal};
use meshguard_auth_handshake::svids::SvidState;
use meshguard_auth_handshake::testing::{TestCa, now_unix, workload_id};
use meshguard_common::cluster::{ClusterView, NodeRecord, Workload};
use meshguard_common::key::PublicKey;
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_ebpf::AuthPair;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

const TD: &str = "cluster.local";

const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
      authentication: required
"#;

struct Creds(parking_lot::Mutex<Svid>);

impl NodeCredentials for Creds {
    fn node_svid(&self) -> Option<Svid> {
        Some(self.0.lock().clone())
    }
}

struct Node {
    name: String,
    map: MemoryAuthMap,
    replayed: MemoryReplay,
    signals: mpsc::UnboundedSender<Signal>,
    svids: watch::Sender<Arc<SvidState>>,
    view: watch::Sender<Arc<ClusterView>>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

struct Cluster {
    ca: TestCa,
    port: u16,
    view: ClusterView,
    nodes: Vec<Node>,
}

fn svid(ca: &TestCa, id: &SpiffeId, ttl: i64) -> Svid {
    let (chain, key) = ca.leaf(id.as_str(), ttl);
    Svid { spiffe_id: id.clone(), chain, key_pkcs8: Arc::new(Zeroizing::new(key)), issued_at: now_unix(), expires_at: now_unix() + ttl }
}

fn id(sa: &str) -> SpiffeId {
    workload_id(TD, "shop", sa)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    /// Two nodes; `pods` as (service account, node index).
    fn view(pods: &[(&str, usize)], policy: Option<&str>) -> ClusterView {
        let mut v = ClusterView { trust_domain: Some(TrustDomain::new(TD).unwrap()), ..Default::default() };
        for i in 1..=2u32 {
            let name = format!("node-{i}");
            let endpoint: SocketAddr = format!("127.0.0.{i}:51820").parse().unwrap();
            let key = PublicKey::from_hex(&format!("{:064x}", i)).unwrap();
            v.nodes.insert(name.clone(), NodeRecord { name: name.clone(), public_key: key, endpoint, pod_cidrs: vec![] });
            v.node_ids.insert(name, i);
        }
        for (n, sa) in ["web", "api", "db"].iter().enumerate() {
            v.identities.insert(id(sa), 300 + n as u32);
        }
        for (sa, node) in pods {
            let w = Workload {
                name: format!("{sa}-{node}"),
                namespace: "shop".into(),
                service_account: (*sa).into(),
                node: format!("node-{node}"),
                ips: vec![],
                labels: [("app".to_owned(), (*sa).to_owned())].into(),
            };
            v.workloads.insert(w.key(), w);
        }
        if let Some(p) = policy {
            let p = MeshPolicy::from_yaml(p).unwrap();
            v.policies.insert(p.key(), p);
        }
        v
    }

    async fn start(pods: &[(&str, usize)], policy: Option<&str>) -> Self {
        let mut c = Self::start_unissued(pods, policy).await;
        c.issue(3600, |_| true);
        c
    }

    /// The agents run, but no node holds any workload SVID yet.
    async fn start_unissued(pods: &[(&str, usize)], policy: Option<&str>) -> Self {
        let ca = TestCa::new(TD);
        let port = free_port();
        let view = Self::view(pods, policy);
        let mut nodes = Vec::new();
        for i in 1..=2usize {
            let name = format!("node-{i}");
            let node_id = TrustDomain::new(TD).unwrap().node_id(&name).unwrap();
            let creds = Arc::new(Creds(parking_lot::Mutex::new(svid(&ca, &node_id, 3600))));
            let (svids, svids_rx) = watch::channel(Arc::new(SvidState::default()));
            let (view_tx, view_rx) = watch::channel(Arc::new(view.clone()));
            let (sig_tx, sig_rx) = mpsc::unbounded_channel();
            let map = MemoryAuthMap::default();
            let replayed = MemoryReplay::default();
            let metrics = Metrics::new();
            let settings = Settings {
                node: name.clone(),
                trust_domain: TrustDomain::new(TD).unwrap(),
                port,
                listen: SocketAddr::new(format!("127.0.0.{i}").parse::<IpAddr>().unwrap(), port),
                prove_ahead: true,
            };
            let task = tokio::spawn(mutual::run(
                settings,
                creds,
                svids_rx,
                view_rx,
                Datapath::Memory(map.clone(), sig_rx, replayed.clone()),
                metrics.clone(),
            ));
            nodes.push(Node { name, map, replayed, signals: sig_tx, svids, view: view_tx, metrics, task });
        }
        Self { ca, port, view, nodes }
    }

    /// Every node gets SVIDs for the workloads placed on it.
    fn issue_all(&mut self, ttl: i64) {
        self.issue(ttl, |_| true);
    }

    /// Every node gets SVIDs for the workloads placed on it whose service
    /// account `wanted` accepts.
    fn issue(&mut self, ttl: i64, wanted: impl Fn(&str) -> bool) {
        for n in &self.nodes {
            let mut st = SvidState {
                bundle: CaBundle { x509_authorities: vec![self.ca.cert.clone()], jwks: vec![], sequence: 1 },
                ..Default::default()
            };
            for w in self.view.workloads.values().filter(|w| w.node == n.name && wanted(&w.service_account)) {
                let i = w.spiffe_id(&TrustDomain::new(TD).unwrap()).unwrap();
                st.svids.insert(i.clone(), svid(&self.ca, &i, ttl));
            }
            n.svids.send_replace(Arc::new(st));
        }
    }

    fn set_view(&mut self, v: ClusterView) {
        self.view = v;
        for n in &self.nodes {
            n.view.send_replace(Arc::new(self.view.clone()));
        }
    }

    fn map(&self, node: usize) -> BTreeMap<AuthPair, SystemTime> {
        self.nodes[node - 1].map.0.lock().clone()
    }

    fn replayed(&self, node: usize) -> Vec<Held> {
        self.nodes[node - 1].replayed.0.lock().unwrap().clone()
    }

    fn metrics(&self, node: usize) -> String {
        self.nodes[node - 1].metrics.encode()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.task.abort();
        }
    }
}

fn pair(l: u32, r: u32, node: u32) -> AuthPair {
    AuthPair { local_identity: l, remote_identity: r, remote_node: node }
}

const WEB: u32 = 300;
const API: u32 = 301;
const DB: u32 = 302;

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_pairs_are_proved_ahead_and_deleted_within_a_second_when_a_workload_leaves() {
    let mut c = Cluster::start(&[("web", 1), ("api", 2)], Some(POLICY)).await;
    // node-2 hosts the subject (api): it proves (api, web, node-1) before any packet.
    wait_for("both entries", Duration::from_secs(10), || {
        c.map(2).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 2))
    })
    .await;
    // Nothing else was written: the pair the policy admits, one entry per side.
    assert_eq!(c.map(1).len(), 1, "{:?}", c.map(1));
    assert_eq!(c.map(2).len(), 1, "{:?}", c.map(2));
    let m2 = c.metrics(2);
    assert_eq!(metric(&m2, "meshguard_auth_handshakes_total{result=\"ok\",reason=\"\",role=\"initiator\"}"), 1.0, "{m2}");
    assert_eq!(metric(&c.metrics(1), "meshguard_auth_handshakes_total{result=\"ok\",reason=\"\",role=\"responder\"}"), 1.0);
    assert_eq!(metric(&m2, "meshguard_auth_handshake_seconds_count"), 1.0);

    // web leaves node-1: both nodes drop their entries within a second.
    let gone = Cluster::view(&[("api", 2)], Some(POLICY));
    c.set_view(gone);
    let took = wait_for("both entries deleted", Duration::from_secs(1), || c.map(1).is_empty() && c.map(2).is_empty()).await;
    eprintln!("deleted on both nodes {took:?} after the workload left");
    assert_eq!(metric(&c.metrics(1), "meshguard_auth_deletions_total{reason=\"workload_left\"}"), 1.0);
    assert_eq!(metric(&c.metrics(2), "meshguard_auth_deletions_total{reason=\"workload_left\"}"), 1.0);
    assert_eq!(metric(&c.metrics(2), "meshguard_auth_entries"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_loses_every_entry_towards_it_within_a_second() {
    let mut c = Cluster::start(&[("web", 1), ("api", 2)], Some(POLICY)).await;
    wait_for("both entries", Duration::from_secs(10), || {
        c.map(2).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 2))
    })
    .await;
    // node-1 leaves the cluster view (its workloads with it).
    let mut v = Cluster::view(&[("api", 2)], Some(POLICY));
    v.nodes.remove("node-1");
    v.node_ids.remove("node-1");
    c.set_view(v);
    let took = wait_for("node-2's entries towards node-1 deleted", Duration::from_secs(1), || c.map(2).is_empty()).await;
    eprintln!("entries towards a removed node deleted in {took:?}");
    let m2 = c.metrics(2);
    assert_eq!(metric(&m2, "meshguard_auth_deletions_total{reason=\"node_removed\"}"), 1.0, "{m2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datapath_signal_gets_an_entry_and_is_timed() {
    let c = Cluster::start(&[("web", 1), ("db", 2)], None).await;
    // No policy: nothing is proved ahead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.map(1).is_empty() && c.map(2).is_empty());
    let first = held_frame(1);
    c.nodes[0].signals.send(Signal { pair: pair(WEB, DB, 2), at: Instant::now(), held: Some(first.clone()) }).unwrap();
    let took = wait_for("the signalled entry", Duration::from_secs(5), || {
        c.map(1).contains_key(&pair(WEB, DB, 2)) && c.map(2).contains_key(&pair(DB, WEB, 1))
    })
    .await;
    eprintln!("signal to entry on both sides: {took:?}");
    // The packet that raised the signal is replayed once, after the write.
    wait_for("the held packet replayed", Duration::from_secs(1), || !c.replayed(1).is_empty()).await;
    assert_eq!(c.replayed(1), vec![first]);
    assert!(c.replayed(2).is_empty());
    assert_eq!(metric(&c.metrics(1), "meshguard_auth_held_packets_total{result=\"replayed\"}"), 1.0);
    // The histogram is observed just after the map write, on the agent's task.
    wait_for("the signal-to-entry time", Duration::from_secs(1), || {
        metric(&c.metrics(1), "meshguard_auth_signal_to_entry_seconds_count") == 1.0
    })
    .await;
    assert_eq!(metric(&c.metrics(1), "meshguard_auth_signals_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_the_responder_cannot_prove_gets_no_entry_on_either_side() {
    // db is placed on node-2 from the start, but node-2 holds no SVID for it.
    let mut c = Cluster::start_unissued(&[("web", 1), ("api", 2), ("db", 2)], Some(POLICY)).await;
    c.issue(3600, |sa| sa != "db");
    // Both agents have the view and their SVIDs once the policy's pair is proved.
    wait_for("the first entries", Duration::from_secs(10), || {
        c.map(2).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 2))
    })
    .await;
    c.nodes[0].signals.send(Signal { pair: pair(WEB, DB, 2), at: Instant::now(), held: Some(held_frame(2)) }).unwrap();
    wait_for("the refusal to be counted", Duration::from_secs(5), || {
        metric(&c.metrics(1), "meshguard_auth_handshakes_total{result=\"refused\",reason=\"no_svid\",role=\"initiator\"}") >= 1.0
    })
    .await;
    assert!(metric(&c.metrics(2), "meshguard_auth_handshakes_total{result=\"refused\",reason=\"no_svid\",role=\"responder\"}") >= 1.0);
    assert!(!c.map(1).contains_key(&pair(WEB, DB, 2)));
    assert!(!c.map(2).contains_key(&pair(DB, WEB, 1)));
    // Its held packet is never replayed: it expires, counted.
    wait_for("the held packet to expire", mutual::HOLD + Duration::from_secs(2), || {
        metric(&c.metrics(1), "meshguard_auth_held_packets_total{result=\"expired\"}") == 1.0
    })
    .await;
    assert!(c.replayed(1).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_ahead_of_the_view_waits_for_it_and_one_it_never_names_is_counted() {
    let mut c = Cluster::start(&[("web", 1), ("api", 2)], None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The datapath already numbers a new identity (cache, 303) the agent's
    // view does not name yet.
    const CACHE: u32 = 303;
    let first = held_frame(3);
    c.nodes[0].signals.send(Signal { pair: pair(WEB, CACHE, 2), at: Instant::now(), held: Some(first.clone()) }).unwrap();
    // And one for an identity no view will ever name.
    c.nodes[0].signals.send(Signal { pair: pair(WEB, 999, 2), at: Instant::now(), held: Some(held_frame(4)) }).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.map(1).is_empty(), "nothing can be proved before the view names the pair");
    let mut v = Cluster::view(&[("web", 1), ("api", 2), ("cache", 2)], None);
    v.identities.insert(id("cache"), CACHE);
    // node-2 (the responder) learns of cache and gets its SVID first; the
    // margin only orders two in-process tasks.
    c.view = v.clone();
    c.issue_all(3600);
    c.nodes[1].view.send_replace(Arc::new(v.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.nodes[0].view.send_replace(Arc::new(v));
    wait_for("the parked pair's entries", Duration::from_secs(5), || {
        c.map(1).contains_key(&pair(WEB, CACHE, 2)) && c.map(2).contains_key(&pair(CACHE, WEB, 1))
    })
    .await;
    wait_for("the held packet replayed", Duration::from_secs(1), || !c.replayed(1).is_empty()).await;
    assert_eq!(c.replayed(1), vec![first]);
    // The other lapses after HOLD: its signal and its packet are counted.
    wait_for("the unnamed pair's signal to lapse", mutual::HOLD + Duration::from_secs(2), || {
        metric(&c.metrics(1), "meshguard_auth_signals_unresolved_total") == 1.0
    })
    .await;
    wait_for("its held packet to expire", Duration::from_secs(1), || {
        metric(&c.metrics(1), "meshguard_auth_held_packets_total{result=\"expired\"}") == 1.0
    })
    .await;
    assert_eq!(c.replayed(1).len(), 1);
    assert_eq!(metric(&c.metrics(1), "meshguard_auth_signals_total"), 2.0);
}

/// A frame as the datapath would hold it (its bytes do not matter here).
fn held_frame(tag: u8) -> Held {
    Held { direction: meshguard_ebpf::policy::Direction::Egress, ifindex: 7, frame: vec![tag; 60] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_pairs_are_written_both_ways_by_the_local_agent() {
    let c = Cluster::start(&[("web", 1), ("api", 1)], Some(POLICY)).await;
    wait_for("both directions", Duration::from_secs(5), || {
        c.map(1).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 1))
    })
    .await;
    assert!(c.map(2).is_empty(), "node-2 is not involved");
    assert!(metric(&c.metrics(1), "meshguard_auth_handshakes_total{result=\"ok\",reason=\"\",role=\"local\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_renews_without_a_gap_and_a_retired_authority_deletes() {
    let mut c = Cluster::start(&[("web", 1), ("api", 2)], Some(POLICY)).await;
    wait_for("the entries", Duration::from_secs(10), || {
        c.map(2).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 2))
    })
    .await;
    // New SVIDs (new keys) on both nodes: both sides re-prove at once
    // (the entry now rests on the new keys), and no entry is ever absent.
    let renewals = |c: &Cluster, n| metric(&c.metrics(n), "meshguard_auth_renewals_total");
    c.issue_all(7200);
    let t = Instant::now();
    loop {
        assert!(
            c.map(2).contains_key(&pair(API, WEB, 1)) && c.map(1).contains_key(&pair(WEB, API, 2)),
            "an entry disappeared during rotation"
        );
        if renewals(&c, 1) >= 1.0 && renewals(&c, 2) >= 1.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "not renewed within 2 s of the key change");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("re-proved on new keys after {:?}", t.elapsed());
    assert_eq!(metric(&c.metrics(2), "meshguard_auth_deletions_total"), 0.0, "rotation deletes nothing");

    // The CA rotates to a new authority and retires the old one: every
    // entry resting on a certificate of the old one goes (node SVIDs too).
    let new = TestCa::new(TD);
    for n in &c.nodes {
        let mut st = (**n.svids.borrow()).clone();
        st.bundle = CaBundle { x509_authorities: vec![new.cert.clone()], jwks: vec![], sequence: 2 };
        n.svids.send_replace(Arc::new(st));
    }
    wait_for("retired entries deleted", Duration::from_secs(1), || c.map(1).is_empty() && c.map(2).is_empty()).await;
    assert!(metric(&c.metrics(2), "meshguard_auth_deletions_total{reason=\"authority_retired\"}") >= 1.0);
}

/// Connects to `port` on `to` from the address `from`.
async fn connect_from(from: &str, to: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    s.connect(format!("{to}:{port}").parse().unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_abuse_is_refused_and_counted_while_legitimate_handshakes_complete() {
    let c = Cluster::start(&[("web", 1), ("api", 2), ("db", 2)], Some(POLICY)).await;
    wait_for("the policy pair", Duration::from_secs(10), || c.map(2).contains_key(&pair(API, WEB, 1))).await;
    let port = c.port;

    // A flood from an address that is no node's: closed before any TLS.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = connect_from("127.0.0.9", "127.0.0.2", port).await {
            flood.push(s);
        }
    }
    // Slowloris from a node's address: a few bytes of a ClientHello, then silence.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", "127.0.0.2", port).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        slow.push(s);
    }
    // Garbage from a node's address.
    let mut g = connect_from("127.0.0.1", "127.0.0.2", port).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();

    // Meanwhile a legitimate new pair completes (node-1 asks node-2 for db).
    let mut st = (**c.nodes[1].svids.borrow()).clone();
    st.svids.insert(id("db"), svid(&c.ca, &id("db"), 3600));
    c.nodes[1].svids.send_replace(Arc::new(st));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    c.nodes[0].signals.send(Signal { pair: pair(WEB, DB, 2), at: Instant::now(), held: None }).unwrap();
    wait_for("the legitimate pair", Duration::from_secs(3), || c.map(1).contains_key(&pair(WEB, DB, 2))).await;
    eprintln!("legitimate handshake during the abuse: {:?}", t.elapsed());

    // The garbage connection is closed by the agent; slowloris ends at the handshake timeout.
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(2), g.read(&mut buf)).await.expect("garbage closed promptly");
    assert!(matches!(r, Ok(n) if n < buf.len()), "{r:?}");
    for mut s in slow {
        let r = tokio::time::timeout(meshguard_auth_handshake::peers::HANDSHAKE_TIMEOUT + Duration::from_secs(2), s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "slow connection not closed: {r:?}");
    }
    let m = c.metrics(2);
    assert!(
        metric(&m, "meshguard_auth_handshakes_total{result=\"refused\",reason=\"unknown_address\",role=\"connection\"}") >= 150.0,
        "{m}"
    );
    assert!(metric(&m, "meshguard_auth_handshakes_total{result=\"refused\",reason=\"tls\",role=\"connection\"}") >= 1.0, "{m}");
    // Counted just after the close, on the agent's task: allow it a moment.
    wait_for("the three timeouts counted", Duration::from_secs(2), || {
        metric(&c.metrics(2), "meshguard_auth_handshakes_total{result=\"refused\",reason=\"timeout\",role=\"connection\"}") >= 3.0
    })
    .await;
    drop(flood);
}
