//! The CA proper: its signing authorities (keys and certificates), X.509-SVID
//! and JWT-SVID signing, the trust bundle, and rotation.
//!
//! Rotation is prepare → activate → retire. A prepared authority is in the
//! bundle but signs nothing, so every verifier learns it before the first
//! SVID it signs; on activation the old one becomes `previous`, still in the
//! bundle, so SVIDs it signed keep verifying until they expire; retiring it
//! removes it (refused while unexpired SVIDs it signed are on record).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zeroize::Zeroize;

use crate::config::BACKDATE;
use crate::csr::CsrKey;
use crate::store::{self, AUTHORITIES, SERIALS, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot generate or sign a certificate: {source}")]
    Sign {
        #[source]
        source: rcgen::Error,
    },
    #[error("stored authority {id} is unusable: {reason}; restore the state directory from backup")]
    BadAuthority { id: String, reason: String },
    #[error("an authority is already prepared ({id}): activate it before preparing another")]
    AlreadyPrepared { id: String },
    #[error("no authority is prepared: run `identity-ca ca prepare` first")]
    NothingPrepared,
    #[error("a previous authority ({id}) is still in the bundle: retire it before activating another")]
    PreviousStillPresent { id: String },
    #[error("no previous authority to retire")]
    NothingToRetire,
    #[error("authority {id} signed {count} SVIDs that are still valid (the last expires at {until}); wait or retire with --force")]
    StillInUse { id: String, count: usize, until: i64 },
    #[error("bug: no active authority")]
    BugNoActive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    Prepared,
    Active,
    Previous,
}

/// How long the CA makes things live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub svid: Duration,
    pub node_svid: Duration,
    pub ca: Duration,
    pub jwt_svid: Duration,
}

/// One signing authority.
pub struct Authority {
    pub id: String,
    pub state: AuthorityState,
    pub cert_der: CertificateDer<'static>,
    pub not_before: i64,
    pub not_after: i64,
    issuer: Issuer<'static, KeyPair>,
    /// The JWT bundle's public key (`jwks`).
    jwt_signer: EcdsaKeyPair,
    /// Signs JWT-SVIDs (jsonwebtoken, ES256), from the same key.
    jwt_key: jsonwebtoken::EncodingKey,
}

/// What is stored per authority. The key is PKCS#8 DER in base64.
#[derive(Serialize, Deserialize)]
struct AuthorityRecord {
    id: String,
    state: AuthorityState,
    cert_der: String,
    key_pkcs8: String,
    not_before: i64,
    not_after: i64,
}

/// What is stored per issued SVID, keyed by serial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidRecord {
    pub spiffe_id: String,
    pub node: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub authority_id: String,
}

/// An issued X.509-SVID: the certificate chain, leaf first.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: Vec<u8>,
    pub expires_at: i64,
}

/// The trust bundle at one moment.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// RFC 7517 JWK Set.
    pub jwks: Vec<u8>,
    pub sequence: u64,
}

pub struct Ca {
    trust_domain: TrustDomain,
    store: Store,
    lifetimes: Lifetimes,
    authorities: RwLock<Vec<Arc<Authority>>>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn to_time(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// 16 random bytes, positive as DER INTEGER requires (top bit clear, not all zero).
fn random_serial() -> Vec<u8> {
    let mut s = vec![0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s[0] &= 0x7f;
    s[0] |= 0x01;
    s
}

const BUNDLE_SEQUENCE_KEY: &str = "bundle_sequence";

// === impl Ca ===

impl Ca {
    /// Loads the authorities from `store`, creating the first one on a new store.
    pub fn open(trust_domain: TrustDomain, store: Store, lifetimes: Lifetimes) -> Result<Self, CaError> {
        let records: Vec<(String, AuthorityRecord)> = store.load_all(AUTHORITIES, "authorities")?;
        let mut list = Vec::with_capacity(records.len());
        for (_, rec) in records {
            list.push(Arc::new(Authority::from_record(rec)?));
        }
        let sequence = store.meta_u64(BUNDLE_SEQUENCE_KEY)?;
        let bundle = Arc::new(Bundle { trust_domain: trust_domain.clone(), x509_authorities: Vec::new(), jwks: Vec::new(), sequence });
        let (bundle_tx, _) = watch::channel(bundle);
        let ca = Self { trust_domain, store, lifetimes, authorities: RwLock::new(list), bundle_tx };
        if !ca.list().iter().any(|a| a.state == AuthorityState::Active) {
            let a = ca.generate(AuthorityState::Active)?;
            tracing::info!(authority = %a.id, trust_domain = %ca.trust_domain, "created the first CA authority");
            ca.commit_authorities(vec![a])?;
        } else {
            ca.publish_bundle(sequence);
        }
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn list(&self) -> Vec<Arc<Authority>> {
        self.authorities.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn active(&self) -> Result<Arc<Authority>, CaError> {
        self.list().into_iter().find(|a| a.state == AuthorityState::Active).ok_or(CaError::BugNoActive)
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Marked changed whenever the bundle changes (rotation).
    pub fn watch_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// A new authority: a self-signed P-256 CA certificate whose one URI SAN
    /// is the trust domain's own SPIFFE ID.
    fn generate(&self, state: AuthorityState) -> Result<Authority, CaError> {
        let sign = |source| CaError::Sign { source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let mut id_bytes = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let id = hex::encode(id_bytes);
        let now = now_unix();
        let not_before = now - BACKDATE.as_secs() as i64;
        let not_after = now + self.lifetimes.ca.as_secs() as i64;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshguard");
        dn.push(DnType::CommonName, format!("meshguard CA {} {id}", self.trust_domain));
        p.distinguished_name = dn;
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        p.not_before = to_time(not_before);
        p.not_after = to_time(not_after);
        let td_uri = self.trust_domain.id_string().try_into().map_err(sign)?;
        p.subject_alt_names = vec![SanType::URI(td_uri)];
        // Leaves only, straight from the root: no intermediate may be minted.
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).map_err(sign)?;
        let mut pkcs8 = key.serialize_der();
        let rec = AuthorityRecord { id, state, cert_der: B64.encode(cert.der()), key_pkcs8: B64.encode(&pkcs8), not_before, not_after };
        pkcs8.zeroize();
        Authority::from_record(rec)
    }

    /// Stores `changed` authorities (replacing by id) and the new bundle sequence
    /// in one transaction, then swaps them in.
    fn commit_authorities(&self, changed: Vec<Authority>) -> Result<(), CaError> {
        self.commit_changes(changed, &[])
    }

    fn commit_changes(&self, changed: Vec<Authority>, removed: &[String]) -> Result<(), CaError> {
        let mut guard = self.authorities.write().unwrap_or_else(|e| e.into_inner());
        let sequence = self.bundle().sequence + 1;
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(AUTHORITIES).map_err(store::err("open table"))?;
            for a in &changed {
                let mut rec = a.to_record();
                t.insert(a.id.as_str(), store::encode(&rec).as_slice()).map_err(store::err("write"))?;
                rec.key_pkcs8.zeroize();
            }
            for id in removed {
                t.remove(id.as_str()).map_err(store::err("write"))?;
            }
            let mut meta = tx.open_table(store::META).map_err(store::err("open table"))?;
            meta.insert(BUNDLE_SEQUENCE_KEY, sequence.to_be_bytes().as_slice()).map_err(store::err("write"))?;
        }
        Store::commit(tx)?;
        for a in changed {
            let a = Arc::new(a);
            match guard.iter_mut().find(|x| x.id == a.id) {
                Some(slot) => *slot = a,
                None => guard.push(a),
            }
        }
        guard.retain(|a| !removed.contains(&a.id));
        drop(guard);
        self.publish_bundle(sequence);
        Ok(())
    }

    fn publish_bundle(&self, sequence: u64) {
        // Oldest first, the same on every run.
        let mut list = self.list();
        list.sort_by(|a, b| (a.not_before, &a.id).cmp(&(b.not_before, &b.id)));
        let bundle = Bundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: list.iter().map(|a| a.cert_der.clone()).collect(),
            jwks: jwks(&list),
            sequence,
        };
        self.bundle_tx.send_replace(Arc::new(bundle));
    }

    // --- rotation

    pub fn prepare(&self) -> Result<Arc<Authority>, CaError> {
        if let Some(p) = self.list().into_iter().find(|a| a.state == AuthorityState::Prepared) {
            return Err(CaError::AlreadyPrepared { id: p.id.clone() });
        }
        let a = self.generate(AuthorityState::Prepared)?;
        let id = a.id.clone();
        self.commit_authorities(vec![a])?;
        tracing::info!(authority = %id, "prepared a new CA authority; it is in the bundle and signs nothing yet");
        self.find(&id)
    }

    pub fn activate(&self) -> Result<Arc<Authority>, CaError> {
        let list = self.list();
        if let Some(prev) = list.iter().find(|a| a.state == AuthorityState::Previous) {
            return Err(CaError::PreviousStillPresent { id: prev.id.clone() });
        }
        let prepared = list.iter().find(|a| a.state == AuthorityState::Prepared).ok_or(CaError::NothingPrepared)?;
        let active = self.active()?;
        let new = prepared.with_state(AuthorityState::Active)?;
        let old = active.with_state(AuthorityState::Previous)?;
        let id = new.id.clone();
        self.commit_authorities(vec![new, old])?;
        tracing::info!(authority = %id, previous = %active.id, "activated CA authority; the previous one stays in the bundle until retired");
        self.find(&id)
    }

    pub fn retire(&self, force: bool) -> Result<Arc<Authority>, CaError> {
        let prev = self.list().into_iter().find(|a| a.state == AuthorityState::Previous).ok_or(CaError::NothingToRetire)?;
        if !force {
            let now = now_unix();
            let live: Vec<SvidRecord> =
                self.svids(false)?.into_iter().map(|(_, r)| r).filter(|r| r.authority_id == prev.id && r.expires_at > now).collect();
            if !live.is_empty() {
                let until = live.iter().map(|r| r.expires_at).max().unwrap_or(now);
                return Err(CaError::StillInUse { id: prev.id.clone(), count: live.len(), until });
            }
        }
        self.commit_changes(Vec::new(), std::slice::from_ref(&prev.id))?;
        tracing::info!(authority = %prev.id, force, "retired CA authority; it is no longer in the bundle");
        Ok(prev)
    }

    fn find(&self, id: &str) -> Result<Arc<Authority>, CaError> {
        self.list().into_iter().find(|a| a.id == id).ok_or(CaError::BugNoActive)
    }

    // --- signing

    /// Signs one X.509-SVID per `(id, key)` with the active authority and
    /// records every serial in one transaction. All or nothing.
    pub fn sign_x509(&self, requests: &[(SpiffeId, CsrKey)], ttl: Duration, node: &str) -> Result<Vec<IssuedSvid>, CaError> {
        let active = self.active()?;
        let now = now_unix();
        let mut out = Vec::with_capacity(requests.len());
        for (id, key) in requests {
            out.push(active.sign_leaf(id, key, now, ttl)?);
        }
        let signed_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(SERIALS).map_err(store::err("open table"))?;
            for s in &out {
                let rec = SvidRecord {
                    spiffe_id: s.spiffe_id.to_string(),
                    node: node.to_owned(),
                    issued_at: now,
                    expires_at: s.expires_at,
                    authority_id: active.id.clone(),
                };
                t.insert(store::serial_key(s.expires_at, signed_at, &s.serial).as_slice(), store::encode(&rec).as_slice())
                    .map_err(store::err("write"))?;
            }
        }
        Store::commit(tx)?;
        Ok(out)
    }

    /// Signs a JWT-SVID (ES256) for `id` with the active authority's key.
    pub fn sign_jwt(&self, id: &SpiffeId, audience: &[String], ttl: Duration) -> Result<(String, i64), CaError> {
        let active = self.active()?;
        let now = now_unix();
        let exp = (now + ttl.as_secs() as i64).min(active.not_after);
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(active.id.clone());
        let claims = serde_json::json!({"sub": id.as_str(), "aud": audience, "exp": exp, "iat": now});
        let token = jsonwebtoken::encode(&header, &claims, &active.jwt_key)
            .map_err(|e| CaError::BadAuthority { id: active.id.clone(), reason: format!("jwt signing failed: {e}") })?;
        Ok((token, exp))
    }

    /// Every SVID on record, by serial; expired ones only with `include_expired`.
    pub fn svids(&self, include_expired: bool) -> Result<Vec<(Vec<u8>, SvidRecord)>, CaError> {
        let now = now_unix();
        let tx = self.store.read()?;
        let t = tx.open_table(SERIALS).map_err(store::err("open table"))?;
        // Keys start with the expiry: the live ones are a suffix.
        let from = if include_expired { Vec::new() } else { store::serial_key_from(now + 1) };
        let mut out = Vec::new();
        for entry in t.range(from.as_slice()..).map_err(store::err("read"))? {
            let (k, v) = entry.map_err(store::err("read"))?;
            let serial = store::serial_of_key(k.value());
            let rec: SvidRecord = store::decode("serials", &hex::encode(serial), v.value())?;
            out.push((serial.to_vec(), rec));
        }
        Ok(out)
    }

    /// Forgets SVIDs that expired more than `grace` ago.
    pub fn prune_serials(&self, grace: Duration) -> Result<usize, CaError> {
        let cutoff = now_unix() - grace.as_secs() as i64;
        let end = store::serial_key_from(cutoff + 1);
        let tx = self.store.write()?;
        let mut removed = 0;
        {
            let mut t = tx.open_table(SERIALS).map_err(store::err("open table"))?;
            // Keys start with the expiry: the expired ones are a prefix.
            t.retain_in(..end.as_slice(), |_, _| {
                removed += 1;
                false
            })
            .map_err(store::err("write"))?;
        }
        Store::commit(tx)?;
        Ok(removed)
    }
}

/// The JWK Set of every authority's public key, `use: jwt-svid` as the SPIFFE
/// bundle format says.
fn jwks(list: &[Arc<Authority>]) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = list
        .iter()
        .map(|a| {
            let point = a.jwt_signer.public_key().as_ref();
            serde_json::json!({
                "kty": "EC",
                "crv": "P-256",
                "x": B64URL.encode(&point[1..33]),
                "y": B64URL.encode(&point[33..65]),
                "kid": a.id,
                "use": "jwt-svid",
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"keys": keys})).unwrap_or_default()
}

// === impl Authority ===

impl Authority {
    fn from_record(rec: AuthorityRecord) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadAuthority { id: rec.id.clone(), reason };
        let cert = B64.decode(&rec.cert_der).map_err(|e| bad(e.to_string()))?;
        let mut pkcs8 = B64.decode(&rec.key_pkcs8).map_err(|e| bad(e.to_string()))?;
        let result = (|| {
            let cert_der = CertificateDer::from(cert);
            let key = KeyPair::try_from(pkcs8.as_slice()).map_err(|e| bad(e.to_string()))?;
            let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(e.to_string()))?;
            let jwt_signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &ring::rand::SystemRandom::new())
                .map_err(|e| bad(e.to_string()))?;
            let jwt_key = jsonwebtoken::EncodingKey::from_ec_der(&pkcs8);
            Ok(Self {
                id: rec.id.clone(),
                state: rec.state,
                cert_der,
                not_before: rec.not_before,
                not_after: rec.not_after,
                issuer,
                jwt_signer,
                jwt_key,
            })
        })();
        pkcs8.zeroize();
        result
    }

    fn to_record(&self) -> AuthorityRecord {
        AuthorityRecord {
            id: self.id.clone(),
            state: self.state,
            cert_der: B64.encode(&self.cert_der),
            key_pkcs8: B64.encode(self.issuer.key().serialize_der()),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }

    fn with_state(&self, state: AuthorityState) -> Result<Self, CaError> {
        let mut rec = self.to_record();
        rec.state = state;
        Self::from_record(rec)
    }

    /// A leaf X.509-SVID as the standard says: one URI SAN, cA false,
    /// digitalSignature only, serverAuth + clientAuth, never outliving the CA.
    fn sign_leaf(&self, id: &SpiffeId, key: &CsrKey, now: i64, ttl: Duration) -> Result<IssuedSvid, CaError> {
        let sign = |source| CaError::Sign { source };
        let serial = random_serial();
        let expires_at = (now + ttl.as_secs() as i64).min(self.not_after);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshguard");
        p.distinguished_name = dn;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = to_time(now - BACKDATE.as_secs() as i64);
        p.not_after = to_time(expires_at);
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(sign)?)];
        p.is_ca = IsCa::NoCa;
        let (oid, der) = meshguard_ca_client::svid::LEAF_BASIC_CONSTRAINTS;
        let mut bc = rcgen::CustomExtension::from_oid_content(oid, der.to_vec());
        bc.set_criticality(true);
        p.custom_extensions = vec![bc];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(key, &self.issuer).map_err(sign)?;
        Ok(IssuedSvid { spiffe_id: id.clone(), chain: vec![cert.der().clone()], serial, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA of trust domain `td` on a fresh store (kept while the dir lives).
    fn test_ca() -> (tempfile::TempDir, TrustDomain, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("td").unwrap();
        let store = Store::open(dir.path(), "db", "td").unwrap();
        let lifetimes = Lifetimes {
            svid: Duration::from_secs(3600),
            node_svid: Duration::from_secs(3600),
            ca: Duration::from_secs(86400),
            jwt_svid: Duration::from_secs(60),
        };
        let ca = Ca::open(td.clone(), store, lifetimes).unwrap();
        (dir, td, ca)
    }

    #[test]
    fn serial_records_list_and_prune_by_expiry() {
        let (_dir, td, ca) = test_ca();
        let id = td.workload_id("shop", "web").unwrap();
        let key = || CsrKey::parse(&crate::csr::generate().unwrap().1).unwrap();
        let live = ca.sign_x509(&[(id.clone(), key()), (id.clone(), key())], Duration::from_secs(3600), "node-1").unwrap();
        let dead = ca.sign_x509(&[(id.clone(), key())], Duration::ZERO, "node-1").unwrap();
        let serials = |all| ca.svids(all).unwrap().into_iter().map(|(s, _)| s).collect::<std::collections::BTreeSet<_>>();
        let live_serials: std::collections::BTreeSet<_> = live.iter().map(|s| s.serial.clone()).collect();
        assert_eq!(serials(false), live_serials);
        assert_eq!(serials(true).len(), 3);
        assert!(serials(true).contains(&dead[0].serial));
        assert_eq!(ca.prune_serials(Duration::ZERO).unwrap(), 1);
        assert_eq!(serials(true), live_serials);
        assert_eq!(ca.prune_serials(Duration::ZERO).unwrap(), 0);
    }

    /// Issue 18: the Python SPIFFE client (strict DER, via `cryptography`)
    /// refused every SVID: rcgen wrote basicConstraints `cA FALSE`, a
    /// DEFAULT value DER never encodes. Now an empty SEQUENCE, critical.
    #[test]
    fn a_leaf_encodes_basic_constraints_as_der_requires() {
        let (_dir, td, ca) = test_ca();
        let key = CsrKey::parse(&crate::csr::generate().unwrap().1).unwrap();
        let svid = ca.sign_x509(&[(td.workload_id("shop", "web").unwrap(), key)], Duration::from_secs(60), "node-1").unwrap();
        let der = svid[0].chain[0].as_ref();
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let bc = cert.extensions().iter().find(|e| e.oid.to_id_string() == "2.5.29.19").expect("basicConstraints");
        assert!(bc.critical);
        assert_eq!(bc.value, &[0x30, 0x00], "cA FALSE must be left out, not encoded");
        assert!(meshguard_ca_client::svid::check_leaf(der).is_ok());
    }
}
