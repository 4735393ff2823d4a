//! identity-ca's redb file holds the CA keys: a database written by this
//! release must open in the next, and the documented upgrade to redb's
//! file format v3 (the only one redb 3 reads) must keep everything.
//!
//! The fixture was written by this release's code (redb 2.6, file format
//! v2) with `MESHGUARD_WRITE_STORE_FIXTURE=1 cargo test -p
//! meshguard-identity-ca --test store_format`; beside it, what it holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshguard_common::cluster::Workload;
use meshguard_common::policy::MeshPolicy;
use meshguard_identity_ca::config::{Config, DB_FILE};
use meshguard_identity_ca::server::CaServer;
use meshguard_identity_ca::store::Store;

const TD: &str = "cluster.local";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
const FIXTURE_DB: &str = "identity-ca.redb2.redb";
const FIXTURE_CONTENT: &str = "identity-ca.redb2.json";

/// What the fixture holds, as this release reads it back.
async fn content(ca: &CaServer) -> serde_json::Value {
    let authorities: Vec<_> = ca
        .state
        .ca
        .list()
        .iter()
        .map(|a| serde_json::json!({"id": a.id, "notAfter": a.not_after, "certSha256": hex_sha256(&a.cert_der)}))
        .collect();
    serde_json::json!({
        "authorities": authorities,
        "bundleSequence": ca.state.ca.bundle().sequence,
        "view": serde_json::to_value(ca.state.registry.view()).unwrap(),
    })
}

fn hex_sha256(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn config(state: &Path) -> Config {
    let mut cfg = Config::for_test(TD, state);
    cfg.state_dir = state.join("state");
    // Long enough that the fixture's authority outlives the project.
    cfg.ca_ttl = Duration::from_secs(30 * 365 * 24 * 3600);
    cfg.join_token_ttl = cfg.ca_ttl;
    cfg
}

async fn write_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaServer::start(config(dir.path())).await.unwrap();
    for (name, node) in [("web", "node-1"), ("api", "node-2"), ("db", "node-2")] {
        let w = Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![],
            labels: [("app".to_owned(), name.to_owned())].into(),
        };
        ca.state.registry.put_workload(w).unwrap();
    }
    let policy = "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: api, namespace: shop}\n\
                  spec:\n  selector: {matchLabels: {app: api}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: web}}}]\n";
    ca.state.registry.put_policy(MeshPolicy::from_yaml(policy).unwrap()).unwrap();
    let (token, _) = ca.state.tokens.create("node-3", Duration::from_secs(30 * 365 * 24 * 3600)).unwrap();
    let mut expected = content(&ca).await;
    expected["joinTokenForNode3"] = token.into();
    ca.shutdown().await;
    let db = dir.path().join("state").join(DB_FILE);
    // redb preallocates: compact so the committed fixture stays small.
    redb::Database::open(&db).unwrap().compact().unwrap();
    std::fs::create_dir_all(fixture_dir()).unwrap();
    std::fs::copy(&db, fixture_dir().join(FIXTURE_DB)).unwrap();
    std::fs::write(fixture_dir().join(FIXTURE_CONTENT), serde_json::to_string_pretty(&expected).unwrap() + "\n").unwrap();
}

/// A copy of the fixture as a state directory (the fixture stays untouched).
fn copy_of_fixture(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let from = fixture_dir().join(FIXTURE_DB);
    assert!(from.is_file(), "{} is missing: regenerate it as this file's header says", from.display());
    std::fs::copy(from, state.join(DB_FILE)).unwrap();
    state
}

async fn opens_with_everything(dir: &Path, expected: &serde_json::Value) {
    let ca = CaServer::start(config(dir)).await.unwrap();
    let mut got = content(&ca).await;
    got["joinTokenForNode3"] = expected["joinTokenForNode3"].clone();
    assert_eq!(&got, expected, "the database read back differs from what was written");
    assert_eq!(ca.state.signing_problem(), None, "the stored authority does not sign");
    ca.shutdown().await;
}

#[tokio::test]
async fn a_database_written_by_this_release_opens_and_upgrades_to_file_format_v3() {
    if std::env::var_os("MESHGUARD_WRITE_STORE_FIXTURE").is_some() {
        write_fixture().await;
    }
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture_dir().join(FIXTURE_CONTENT)).unwrap()).unwrap();

    // Today's format, opened as it is.
    let dir = tempfile::tempdir().unwrap();
    copy_of_fixture(dir.path());
    opens_with_everything(dir.path(), &expected).await;

    // The documented upgrade path: `identity-ca store upgrade`, then start.
    let dir = tempfile::tempdir().unwrap();
    let state = copy_of_fixture(dir.path());
    assert!(Store::upgrade_format(&state, DB_FILE).unwrap(), "the fixture should be in file format v2");
    assert!(!Store::upgrade_format(&state, DB_FILE).unwrap(), "a second upgrade has nothing to do");
    opens_with_everything(dir.path(), &expected).await;
    // The stored join token still attests once.
    let ca = CaServer::start(config(dir.path())).await.unwrap();
    assert_eq!(ca.state.tokens.consume(expected["joinTokenForNode3"].as_str().unwrap()).unwrap(), "node-3");
    ca.shutdown().await;

    // No database, or one held open by a running CA: a clear error, nothing changed.
    let empty = tempfile::tempdir().unwrap();
    assert!(Store::upgrade_format(empty.path(), DB_FILE).unwrap_err().to_string().contains("no database here"));
    let dir = tempfile::tempdir().unwrap();
    let state = copy_of_fixture(dir.path());
    let running = CaServer::start(config(dir.path())).await.unwrap();
    assert!(Store::upgrade_format(&state, DB_FILE).is_err(), "upgraded under a running CA");
    running.shutdown().await;
    opens_with_everything(dir.path(), &expected).await;
}
