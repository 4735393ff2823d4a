//! SVID signings per second, and the CA's memory with 100,000 registered
//! workloads. Run: `cargo bench -p meshguard-identity-ca --bench signing`.
//!
//! Signing is measured on the CA core (CSR check, certificate build, ECDSA
//! P-256 signature, serial recorded durably in redb), batches of 100 as a
//! node sends them, on two threads; several rounds, the median reported,
//! because a shared machine's disk and CPU make single runs noisy. A
//! one-thread breakdown first says where the time goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshguard_common::cluster::Workload;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_identity_ca::authority::{Ca, Lifetimes};
use meshguard_identity_ca::csr::{self, CsrKey};
use meshguard_identity_ca::registry::Registry;
use meshguard_identity_ca::store::Store;

const THREADS: usize = 2;
const BATCH: usize = 100;
const PER_THREAD: usize = 5_000;
const WORKLOADS: usize = 100_000;
const ROUNDS: usize = 5;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::new("cluster.local").expect("td");
    let store = Store::open(dir.path(), "bench.redb", td.as_str()).expect("store");
    let lifetimes = Lifetimes {
        svid: Duration::from_secs(3600),
        node_svid: Duration::from_secs(3600),
        ca: Duration::from_secs(86400 * 365),
        jwt_svid: Duration::from_secs(300),
    };
    let ca = Arc::new(Ca::open(td.clone(), store.clone(), lifetimes).expect("ca"));

    // CSRs are made by nodes, not the CA: prepare them outside the clock (as DER).
    let csrs: Vec<Vec<u8>> = (0..BATCH).map(|_| csr::generate().expect("csr").1).collect();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/web").expect("id");

    // Where the time goes, one thread: the CSR check (an ECDSA verification,
    // the proof of possession), the signing (certificate build + ECDSA
    // signature + serial recorded), and one empty durable commit.
    let t = Instant::now();
    for _ in 0..10 {
        for c in &csrs {
            std::hint::black_box(CsrKey::parse(c).expect("csr"));
        }
    }
    let check_us = t.elapsed().as_secs_f64() * 1e6 / (10 * BATCH) as f64;
    let batch: Vec<(SpiffeId, CsrKey)> = csrs.iter().map(|c| (id.clone(), CsrKey::parse(c).expect("csr"))).collect();
    let t = Instant::now();
    for _ in 0..10 {
        ca.sign_x509(&batch, Duration::from_secs(3600), "node-1").expect("sign");
    }
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / (10 * BATCH) as f64;
    let t = Instant::now();
    for _ in 0..20 {
        let tx = store.write().expect("tx");
        tx.open_table(meshguard_identity_ca::store::META).expect("table");
        Store::commit(tx).expect("commit");
    }
    let commit_us = t.elapsed().as_secs_f64() * 1e6 / 20.0;
    println!(
        "per SVID, one thread: CSR check {check_us:.0} µs, signing {sign_us:.0} µs (incl. 1/{BATCH} of a durable commit of {commit_us:.0} µs) = {:.0} signings/s per core",
        1e6 / (check_us + sign_us)
    );

    let mut rates = Vec::new();
    for round in 1..=ROUNDS {
        let start = Instant::now();
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let ca = ca.clone();
                let csrs = csrs.clone();
                let id = id.clone();
                std::thread::spawn(move || {
                    for _ in 0..PER_THREAD / BATCH {
                        let batch: Vec<(SpiffeId, CsrKey)> = csrs.iter().map(|c| (id.clone(), CsrKey::parse(c).expect("csr"))).collect();
                        ca.sign_x509(&batch, Duration::from_secs(3600), "node-1").expect("sign");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        let elapsed = start.elapsed();
        let n = THREADS * PER_THREAD;
        let rate = n as f64 / elapsed.as_secs_f64();
        println!("signing round {round}: {n} X.509-SVIDs in {elapsed:.2?} on {THREADS} threads = {rate:.0} signings/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "signing: median {:.0} signings/s (min {:.0}, max {:.0}) over {ROUNDS} rounds on {THREADS} threads (batches of {BATCH}, CSR verified, serial stored durably)",
        rates[ROUNDS / 2],
        rates[0],
        rates[ROUNDS - 1]
    );

    let before = rss_kib();
    let registry = Registry::open(store, td).expect("registry");
    let ws: Vec<Workload> = (0..WORKLOADS)
        .map(|i| Workload {
            name: format!("pod-{i}"),
            namespace: format!("ns-{}", i % 100),
            service_account: format!("sa-{}", i % 1000),
            node: format!("node-{}", i % 100),
            ips: vec![std::net::IpAddr::from([10, 244, (i / 250 % 256) as u8, (i % 250) as u8])],
            labels: [("app".to_owned(), format!("app-{}", i % 50))].into(),
        })
        .collect();
    let t = Instant::now();
    for chunk in ws.chunks(10_000) {
        registry.put_workloads(chunk.to_vec()).expect("put");
    }
    let after = rss_kib();
    println!(
        "registry: {} workloads stored in {:.2?}; CA resident memory {} MiB before, {} MiB after (+{} MiB)",
        registry.workload_count(),
        t.elapsed(),
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    let t = Instant::now();
    let ok = registry.hosts("node-7", &SpiffeId::parse("spiffe://cluster.local/ns/ns-7/sa/sa-7").unwrap_or(id));
    println!("authorization lookup with {WORKLOADS} workloads: {:?} ({ok})", t.elapsed());
}
