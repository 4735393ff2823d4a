//! Rotation under `authentication: required` (root only): one long TCP
//! stream from web (node-1) to api (node-2) runs while every workload SVID
//! is renewed several times and the CA's authority is rotated (prepare,
//! activate, retire). The stream must not notice: one connection, every
//! byte in order (mg-probe's `stream-serve` checks the content), no silence
//! longer than a second, and the auth entries for the pair live on both
//! nodes at every sample.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshguard_ebpf::AuthPair;
use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};
use meshguard_meshctl::sim::identity::Identity;

/// The stream's port (7001) and the echo's (7000) both require authentication.
const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}, {protocol: TCP, port: 7001}]
      authentication: required
"#;

const STREAM_PORT: u16 = 7001;
/// Workload and node SVIDs live 10 s (the CA's minimum): agents renew every ~5 s.
const SVID_TTL: Duration = Duration::from_secs(10);
const STREAM_SECONDS: u64 = 42;
const STREAM_RATE: u64 = 500_000;
const MAX_GAP_MS: u64 = 1000;

fn start(c: &Cluster) -> Identity<'_> {
    let id = c.identity().svid_ttl(SVID_TTL).node_svid_ttl(SVID_TTL).start().unwrap();
    id.apply_policy(POLICY).unwrap();
    id.use_registry_for_agents();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();
    c.spawn_in_pod("shop/api", &bin_path("mg-probe"), &["stream-serve", "--port", &STREAM_PORT.to_string()]).unwrap();
    wait_until("the stream server to listen", Duration::from_secs(10), || {
        c.exec("shop/api", "ss", &["-Hltn", &format!("sport = :{STREAM_PORT}")])
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    })
    .unwrap();
    id
}

/// The numbers the registry gave shop/`sa`'s identity and `node`.
fn numbers(id: &Identity<'_>, sa: &str, node: &str) -> (u32, u32) {
    id.numbers("shop", sa, node).unwrap()
}

fn live_pairs(c: &Cluster, node: &str) -> Vec<AuthPair> {
    c.live_auth_pairs(node)
}

/// How long `pair`'s entry on `node` still lives; None when it is missing or expired.
fn live_left(c: &Cluster, node: &str, pair: AuthPair) -> Option<Duration> {
    c.auth_entries(node).into_iter().find(|(p, left)| *p == pair && !left.is_zero()).map(|(_, left)| left)
}

/// The X.509 authorities in the bundle `pod` receives from its node's Workload API.
fn pod_bundle(id: &Identity<'_>, pod: &str) -> Vec<Vec<u8>> {
    id.fetch(pod).ok().and_then(|o| o.svid().ok()).map(|s| s.bundle_der()).unwrap_or_default()
}

/// `pod`'s current SVID verifies against `authorities` alone.
fn signed_by(id: &Identity<'_>, pod: &str, authorities: &[Vec<u8>]) -> bool {
    id.fetch(pod).ok().and_then(|o| o.svid().ok()).is_some_and(|s| s.verify(authorities, std::time::SystemTime::now()).is_ok())
}

fn metric(id: &Identity<'_>, node: &str, prefix: &str) -> f64 {
    id.auth_metric(node, prefix).unwrap_or_else(|e| panic!("{node}'s auth-handshake metrics: {e}"))
}

const RENEWALS: &str = "meshguard_auth_renewals_total";
/// Every reason an entry can be deleted for; none may happen to the
/// stream's pair (the cluster has no other pair) while it runs: not
/// key_changed or authority_retired (the rotation), and not expired either
/// (a renewal that came too late: the entry lapsed, if only for an instant
/// the ~100 ms samples may miss).
const DELETION_REASONS: [&str; 5] = ["workload_left", "node_removed", "authority_retired", "key_changed", "expired"];

/// (node, reason) -> deletions so far, on both nodes.
fn deletions(id: &Identity<'_>) -> Vec<(String, f64)> {
    ["node-1", "node-2"]
        .iter()
        .flat_map(|n| {
            DELETION_REASONS
                .iter()
                .map(move |r| (format!("{n} {r}"), metric(id, n, &format!("meshguard_auth_deletions_total{{reason=\"{r}\"}}"))))
        })
        .collect()
}

#[test]
fn root_svid_and_authority_rotation_during_a_long_tcp_stream_lose_no_byte_and_no_auth_entry() {
    let c = cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
        .build()
        .unwrap();
    let id = start(&c);
    let (api, n2) = numbers(&id, "api", "node-2");
    let (web, n1) = numbers(&id, "web", "node-1");
    // node-2 admits web's packets to api; node-1 admits api's answers to web.
    let at_api = AuthPair { local_identity: api, remote_identity: web, remote_node: n1 };
    let at_web = AuthPair { local_identity: web, remote_identity: api, remote_node: n2 };
    wait_until("the pair's auth entries on both nodes", Duration::from_secs(20), || {
        live_pairs(&c, "node-2").contains(&at_api) && live_pairs(&c, "node-1").contains(&at_web)
    })
    .unwrap();
    let old_authorities = id.ca_bundle().unwrap();
    assert_eq!(old_authorities.len(), 1, "one authority before the rotation");
    let renewals_before = [metric(&id, "node-1", RENEWALS), metric(&id, "node-2", RENEWALS)];
    let deletions_before = deletions(&id);

    // The stream: one TCP connection, a known byte pattern at a steady rate,
    // verified byte by byte by the server, which reports its longest silence.
    let addr = format!("{}:{STREAM_PORT}", c.pod("shop/api").ip);
    let (pid, log) = c
        .background_in_pod(
            "shop/web",
            &bin_path("mg-probe"),
            &["stream", &addr, "--seconds", &STREAM_SECONDS.to_string(), "--rate", &STREAM_RATE.to_string()],
            "stream.log",
        )
        .unwrap();
    let t0 = Instant::now();
    let stamp = |what: &str| eprintln!("[{:5.1} s] {what}", t0.elapsed().as_secs_f64());

    let done = AtomicBool::new(false);
    let (samples, missing, min_left, deletions_after) = std::thread::scope(|s| {
        // Every ~100 ms, both sides' entries for the pair.
        let sampler = s.spawn(|| {
            let (mut samples, mut missing, mut min_left) = (0u32, Vec::new(), [Duration::MAX; 2]);
            while !done.load(Ordering::Relaxed) {
                let left1 = live_left(&c, "node-1", at_web);
                let left2 = live_left(&c, "node-2", at_api);
                let (ok1, ok2) = (left1.is_some(), left2.is_some());
                for (m, l) in min_left.iter_mut().zip([left1, left2]) {
                    *m = (*m).min(l.unwrap_or(Duration::ZERO));
                }
                samples += 1;
                if !ok1 || !ok2 {
                    missing.push(format!(
                        "{:.2} s: node-1 entry {} node-2 entry {}",
                        t0.elapsed().as_secs_f64(),
                        if ok1 { "live" } else { "MISSING" },
                        if ok2 { "live" } else { "MISSING" }
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (samples, missing, min_left)
        });

        let run = || {
            // Workload SVIDs renew every ~5 s from the start; let one round pass
            // under the old authority.
            std::thread::sleep(Duration::from_secs(6));
            stamp("ca prepare");
            id.admin(&["ca", "prepare"]).unwrap();
            let all = id.ca_bundle().unwrap();
            let new_authority: Vec<Vec<u8>> = all.iter().filter(|a| !old_authorities.contains(a)).cloned().collect();
            assert_eq!(new_authority.len(), 1, "prepare adds one authority to the bundle");
            wait_until("both pods' bundles to carry the new authority", Duration::from_secs(10), || {
                ["shop/web", "shop/api"].iter().all(|p| pod_bundle(&id, p).contains(&new_authority[0]))
            })
            .unwrap();
            stamp("agents have the new authority in their bundle; ca activate");
            id.admin(&["ca", "activate"]).unwrap();
            wait_until("both pods' SVIDs renewed under the new authority", Duration::from_secs(12), || {
                signed_by(&id, "shop/web", &new_authority) && signed_by(&id, "shop/api", &new_authority)
            })
            .unwrap();
            stamp("both workload SVIDs are signed by the new authority");
            // Retire as soon as the CA allows it: once every SVID the old
            // authority signed (workload and node) has expired.
            wait_until("the CA to let the old authority retire", Duration::from_secs(2 * SVID_TTL.as_secs() + 5), || {
                id.admin(&["ca", "retire"]).is_ok()
            })
            .unwrap();
            stamp("ca retire");
            assert_eq!(id.ca_bundle().unwrap(), new_authority, "only the new authority is left");
            wait_until("both pods' bundles to drop the old authority", Duration::from_secs(10), || {
                ["shop/web", "shop/api"].iter().all(|p| {
                    let b = pod_bundle(&id, p);
                    !b.is_empty() && !b.contains(&old_authorities[0])
                })
            })
            .unwrap();
            stamp("agents dropped the old authority");
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run();
            let status = c.wait_child(pid, Duration::from_secs(STREAM_SECONDS + 30)).unwrap();
            stamp(&format!("stream ended: {status}"));
            deletions(&id)
        }));
        done.store(true, Ordering::Relaxed);
        let (samples, missing, min_left) = sampler.join().unwrap();
        match result {
            Ok(d) => (samples, missing, min_left, d),
            Err(e) => std::panic::resume_unwind(e),
        }
    });

    let out = std::fs::read_to_string(&log).unwrap();
    eprintln!("stream: {}", out.trim());
    let report: serde_json::Value =
        out.lines().find_map(|l| serde_json::from_str(l).ok()).unwrap_or_else(|| panic!("mg-probe stream printed no report: {out}"));
    let sent = report["sent"].as_u64().unwrap();
    let received = report["server"]["received"].as_u64().unwrap();
    let max_gap = report["server"]["max_gap_ms"].as_u64().unwrap();
    assert!(!out.contains("mg-probe:"), "the stream failed: {out}");
    assert!(report["server"]["pattern_ok"].as_bool().unwrap(), "a byte arrived altered or out of order: {out}");
    assert_eq!(received, sent, "bytes lost");
    assert!(sent >= STREAM_RATE * STREAM_SECONDS * 9 / 10, "the stream sent only {sent} bytes");
    assert!(max_gap <= MAX_GAP_MS, "the stream stalled for {max_gap} ms");

    assert!(samples >= 100, "only {samples} samples of the auth entries");
    assert!(missing.is_empty(), "the pair's auth entry was missing in {} of {samples} samples:\n{}", missing.len(), missing.join("\n"));

    let renewals = [metric(&id, "node-1", RENEWALS) - renewals_before[0], metric(&id, "node-2", RENEWALS) - renewals_before[1]];
    eprintln!(
        "{sent} bytes streamed in one connection, all verified; longest gap {max_gap} ms; \
         auth entries live in all {samples} samples (least time left seen: node-1 {:?}, node-2 {:?}); \
         renewals during the stream: node-1 {}, node-2 {}",
        min_left[0], min_left[1], renewals[0], renewals[1]
    );
    assert!(renewals.iter().all(|r| *r >= 1.0), "auth renewals during the stream: {renewals:?}");
    let deleted: Vec<String> =
        deletions_before.iter().zip(&deletions_after).filter(|(b, a)| a.1 > b.1).map(|(b, a)| format!("{}: {}", a.0, a.1 - b.1)).collect();
    assert!(deleted.is_empty(), "auth entries deleted while the stream ran (node reason: count): {deleted:?}");
}
