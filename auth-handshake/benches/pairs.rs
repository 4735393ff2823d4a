//! New authenticated pairs per second between two nodes' handshake
//! sessions on this machine, over real TCP on loopback, with real TLS 1.3
//! and ECDSA P-256 SVIDs (rcgen): one session proving many pairs
//! (pipelined), against a new TLS session per pair. Then the agent's memory
//! for 1,000 identities and 10,000 live entries.
//!
//! `cargo bench -p meshguard-auth-handshake --bench pairs` (release build).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshguard_auth_handshake::entries::{Book, MemoryAuthMap};
use meshguard_auth_handshake::handshake::{Authenticated, Directory, Event, Role, Session};
use meshguard_auth_handshake::testing::{TestCa, TestNode, workload_id};
use meshguard_ebpf::AuthPair;
use rustls::pki_types::UnixTime;

const TD: &str = "cluster.local";

/// Drives one session over a blocking socket until `done` says so.
fn drive(s: &mut Session, sock: &mut TcpStream, dir: &Directory, mut on: impl FnMut(Vec<Event>) -> bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        out.clear();
        s.transmit(&mut out);
        if !out.is_empty() {
            sock.write_all(&out).unwrap();
        }
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let events = s.receive(&buf[..n], dir, UnixTime::now()).expect("session");
        if on(events) {
            out.clear();
            s.transmit(&mut out);
            let _ = sock.write_all(&out);
            return;
        }
    }
}

struct Setup {
    n1: TestNode,
    n2: TestNode,
    ids: Vec<meshguard_common::spiffe::SpiffeId>,
    api: meshguard_common::spiffe::SpiffeId,
}

fn setup(identities: usize) -> Setup {
    let ca = TestCa::new(TD);
    let mut n1 = ca.node("node-1", "127.0.0.1");
    let mut n2 = ca.node("node-2", "127.0.0.1");
    n1.knows_node(&n2);
    // Both nodes are on loopback here; node-2 knows node-1 by that address.
    n2.dir.node_addrs.insert("node-1".into(), "127.0.0.1".parse().unwrap());
    n2.dir.node_addrs.remove("node-2");
    let api = workload_id(TD, "shop", "api");
    n2.host(ca.workload(&api, 3600));
    n1.place(&api, "node-2");
    let mut ids = Vec::new();
    for i in 0..identities {
        let id = workload_id(TD, "load", &format!("sa-{i}"));
        n1.host(ca.workload(&id, 3600));
        n2.place(&id, "node-1");
        ids.push(id);
    }
    Setup { n1, n2, ids, api }
}

/// One session, `pairs` proofs pipelined. Returns (elapsed, proved).
fn one_session(st: &Setup, pairs: usize) -> (Duration, usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let n2dir = st.n2.dir.clone();
    let mut server = st.n2.server_for("127.0.0.1".parse().unwrap()).unwrap();
    let t = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_nodelay(true).unwrap();
        drive(&mut server, &mut sock, &n2dir, |_| false);
    });
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let mut client = st.n1.client_to(&st.n2);
    let start = Instant::now();
    let mut done = 0;
    for i in 0..pairs {
        let ev = client.request(st.ids[i % st.ids.len()].clone(), st.api.clone(), &st.n1.dir).unwrap();
        done += ev.iter().filter(|e| matches!(e, Event::Authenticated(_))).count();
    }
    drive(&mut client, &mut sock, &st.n1.dir, |ev| {
        done += ev.iter().filter(|e| matches!(e, Event::Authenticated(_))).count();
        done >= pairs
    });
    let elapsed = start.elapsed();
    client.close();
    let mut out = Vec::new();
    client.transmit(&mut out);
    let _ = sock.write_all(&out);
    drop(sock);
    t.join().unwrap();
    (elapsed, done)
}

/// A new TCP connection and TLS session per pair.
fn session_per_pair(st: &Setup, pairs: usize) -> Duration {
    let start = Instant::now();
    for i in 0..pairs {
        let single =
            Setup { n1: clone_node(&st.n1), n2: clone_node(&st.n2), ids: vec![st.ids[i % st.ids.len()].clone()], api: st.api.clone() };
        let (_, done) = one_session(&single, 1);
        assert_eq!(done, 1);
    }
    start.elapsed()
}

fn clone_node(n: &TestNode) -> TestNode {
    TestNode {
        name: n.name.clone(),
        addr: n.addr,
        creds: n.creds.clone(),
        chain: n.chain.clone(),
        bundle: n.bundle.clone(),
        dir: n.dir.clone(),
    }
}

/// Counts live heap bytes, so memory figures are exact rather than RSS
/// deltas (which freed memory from earlier phases hides).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// keeps a count of the bytes outstanding.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let st = setup(1000);
    // Warm up.
    one_session(&st, 500);

    let pairs = 20_000;
    let (el, done) = one_session(&st, pairs);
    assert_eq!(done, pairs);
    let reuse = pairs as f64 / el.as_secs_f64();
    println!(
        "one session, {pairs} pairs pipelined: {:.0} new authenticated pairs/s ({:.1} us each; both ends proved and written)",
        reuse,
        el.as_secs_f64() * 1e6 / pairs as f64
    );

    let fresh_pairs = 1000;
    let el = session_per_pair(&st, fresh_pairs);
    let fresh = fresh_pairs as f64 / el.as_secs_f64();
    println!("a new TCP connection and TLS 1.3 session per pair: {fresh:.0} pairs/s");
    println!("session reuse is {:.1}x a full handshake per pair", reuse / fresh);

    // Memory: what the agent holds for 1,000 identities on its node (their
    // keys and chains, ready to sign) and for 10,000 live entries.
    let ca = TestCa::new(TD);
    let before = live();
    let keys: Vec<_> = (0..1000).map(|i| ca.workload(&workload_id(TD, "load", &format!("sa-{i}")), 3600)).collect();
    let with_keys = live();
    let st2 = setup(10);
    let mut book = Book::default();
    let mut map = MemoryAuthMap::default();
    let node_chain = st2.n1.chain.clone();
    let remote = st2.n2.dir.keys[&st2.api].chain.clone();
    let entries_before = live();
    for i in 0..10_000u32 {
        let k = &keys[i as usize % keys.len()];
        let proof = Authenticated {
            local: k.id.clone(),
            remote: workload_id(TD, "peer", &format!("sa-{}", i / 1000)),
            remote_node: format!("node-{}", i % 100),
            expires_at: i64::MAX / 2,
            role: Role::Initiator,
            // As a session builds it: the remote chain as received, per entry.
            chains: [k.chain.clone(), Arc::new(remote.to_vec()), node_chain.clone(), node_chain.clone()],
        };
        let pair = AuthPair { local_identity: 256 + i % 1000, remote_identity: 2000 + i, remote_node: i % 100 };
        book.insert(proof, pair, 0, &mut map).unwrap();
    }
    let with_entries = live();
    let entries = with_entries - entries_before;
    println!(
        "memory (live heap): 1,000 identities with keys and chains {} KiB ({} B each); 10,000 live entries {} KiB ({} B each, the remote chain included)",
        (with_keys - before) / 1024,
        (with_keys - before) / 1000,
        entries / 1024,
        entries / 10_000
    );
    drop(keys);
    drop((book, st2));
}
