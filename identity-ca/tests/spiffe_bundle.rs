//! Issue 18: `identity-ca bundle show --format spiffe` is read back by an
//! independent SPIFFE implementation, the Python `spiffe` package from PyPI
//! (py-spiffe 0.3.2, on `cryptography` and PyJWT), in the virtualenv
//! `scripts/setup.sh` makes.
//!
//! py-spiffe 0.3.2 has no parser for the whole SPIFFE bundle document: its
//! `JwtBundle.parse` wants a `kid` on every key, and X509-SVID §6.1 forbids
//! one on `x509-svid` entries. So the script does the consumer's first step
//! from X509-SVID §6.2 and JWT-SVID §6.2 itself (pick the entries by `use`)
//! and hands each kind to py-spiffe's own parsers, then verifies a real
//! X.509-SVID and JWT-SVID from this CA with what they parsed.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use meshguard_common::spiffe::TrustDomain;
use meshguard_identity_ca::authority::{Ca, Lifetimes};
use meshguard_identity_ca::csr::{self, CsrKey};
use meshguard_identity_ca::spiffe_bundle::{self, REFRESH_HINT};
use meshguard_identity_ca::store::Store;

/// The Python SPIFFE library from PyPI (`spiffe`), in the virtualenv
/// `scripts/setup.sh` makes. `MESHGUARD_PYTHON` overrides it.
fn python_with_spiffe() -> String {
    let python = std::env::var("MESHGUARD_PYTHON").unwrap_or_else(|_| "/opt/meshguard/python/bin/python3".to_owned());
    let ok = std::process::Command::new(&python).args(["-c", "import spiffe"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{python} cannot import the Python `spiffe` package: run ./scripts/setup.sh (it installs it from PyPI)");
    python
}

/// argv: the bundle document, the trust domain, an X.509-SVID leaf (base64
/// DER), a JWT-SVID and its audience. Prints one JSON line.
const PY_CONSUMER: &str = r#"
import base64, json, sys
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from jwt import PyJWK
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle
doc = json.loads(sys.argv[1])
td = TrustDomain(sys.argv[2])
x509_entries = [k for k in doc["keys"] if k.get("use") == "x509-svid"]
jwt_entries = [k for k in doc["keys"] if k.get("use") == "jwt-svid"]
ders, key_matches_cert, one_cert_each, no_kid = [], [], [], []
for k in x509_entries:
    one_cert_each.append(len(k["x5c"]) == 1)
    no_kid.append("kid" not in k)
    der = base64.b64decode(k["x5c"][0], validate=True)
    ders.append(der)
    # The key beside the certificate, read by PyJWT, must be the certificate's own.
    jwk = PyJWK({n: v for n, v in k.items() if n not in ("use", "x5c")}).key
    cert_key = x509.load_der_x509_certificate(der).public_key()
    key_matches_cert.append(jwk.public_numbers() == cert_key.public_numbers())
x509_bundle = X509Bundle.parse_raw(td, b"".join(ders))
jwt_bundle = JwtBundle.parse(td, json.dumps({"keys": jwt_entries}).encode())
leaf = x509.load_der_x509_certificate(base64.b64decode(sys.argv[3]))
signers = 0
for authority in x509_bundle.x509_authorities:
    try:
        leaf.verify_directly_issued_by(authority)
        signers += 1
    except Exception:
        pass
jwt = JwtSvid.parse_and_validate(sys.argv[4], jwt_bundle, {sys.argv[5]})
print(json.dumps({
    "sequence": doc["spiffe_sequence"],
    "refresh_hint": doc["spiffe_refresh_hint"],
    "x509_authorities": sorted(base64.b64encode(a.public_bytes(Encoding.DER)).decode() for a in x509_bundle.x509_authorities),
    "one_cert_each": one_cert_each,
    "no_kid": no_kid,
    "key_matches_cert": key_matches_cert,
    "jwt_kids": sorted(jwt_bundle.jwt_authorities.keys()),
    "leaf_signers": signers,
    "jwt_verified_id": str(jwt.spiffe_id),
}))
"#;

/// A CA in rotation (active + prepared), so the bundle has two authorities of
/// each kind; one SVID of each type signed by the active one.
#[test]
fn python_spiffe_reads_the_spiffe_bundle_and_verifies_svids_with_it() {
    let python = python_with_spiffe();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let store = Store::open(dir.path(), "db", td.as_str()).unwrap();
    let hour = Duration::from_secs(3600);
    let ca = Ca::open(td.clone(), store, Lifetimes { svid: hour, node_svid: hour, ca: 24 * hour, jwt_svid: hour }).unwrap();
    ca.prepare().unwrap();
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities.len(), 2);

    let id = td.workload_id("shop", "web").unwrap();
    let key = CsrKey::parse(&csr::generate().unwrap().1).unwrap();
    let leaf = ca.sign_x509(&[(id.clone(), key)], hour, "node-1").unwrap().remove(0).chain.remove(0);
    let audience = "spiffe://cluster.local/ns/shop/sa/db";
    let (jwt, _) = ca.sign_jwt(&id, &[audience.to_owned()], hour).unwrap();

    let doc = spiffe_bundle::render(&bundle.x509_authorities, &bundle.jwks, bundle.sequence, REFRESH_HINT).unwrap();
    let out = std::process::Command::new(&python)
        .args(["-c", PY_CONSUMER, &doc, td.as_str(), &B64.encode(&leaf), &jwt, audience])
        .output()
        .unwrap();
    assert!(out.status.success(), "py-spiffe could not use the bundle:\n{}\nthe bundle:\n{doc}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(got["sequence"], bundle.sequence);
    assert_eq!(got["refresh_hint"], REFRESH_HINT.as_secs());
    let mut want: Vec<String> = bundle.x509_authorities.iter().map(|d| B64.encode(d)).collect();
    want.sort();
    assert_eq!(got["x509_authorities"], serde_json::json!(want), "py-spiffe's X.509 authorities are the CA's");
    assert_eq!(got["one_cert_each"], serde_json::json!([true, true]));
    assert_eq!(got["no_kid"], serde_json::json!([true, true]));
    assert_eq!(got["key_matches_cert"], serde_json::json!([true, true]), "each x509-svid key is its certificate's");
    let mut kids: Vec<String> = ca.list().iter().map(|a| a.id.clone()).collect();
    kids.sort();
    assert_eq!(got["jwt_kids"], serde_json::json!(kids), "py-spiffe's JWT authorities are the CA's");
    assert_eq!(got["leaf_signers"], 1, "exactly one authority from the bundle signed the X.509-SVID");
    assert_eq!(got["jwt_verified_id"], id.as_str(), "py-spiffe verified the JWT-SVID with the bundle's JWT authorities");
}
