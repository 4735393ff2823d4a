//! The CA's state in an embedded database (redb): authorities and their
//! keys, issued serials, join tokens, attested nodes and the registry.
//!
//! Every change is one committed, durable transaction, so a restart at any
//! point finds either the state before a call or the state after it. The
//! file holds private keys: its directory is 0700 and the file 0600.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Serialize, de::DeserializeOwned};

pub const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
pub const AUTHORITIES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("authorities");
/// Issued SVIDs, keyed by [`serial_key`] (expiry, then serial): a batch of
/// signings lands together at the table's end, dirtying a page or two rather
/// than one page per random serial, and expired records are a prefix.
pub const SERIALS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("serials_by_expiry");
/// The earlier layout, keyed by the serial alone; moved into [`SERIALS`] on open.
pub const LEGACY_SERIALS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("serials");
pub const JOIN_TOKENS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("join_tokens");
pub const ATTESTED_NODES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("attested_nodes");
pub const NODES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("nodes");
pub const WORKLOADS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workloads");
pub const POLICIES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("policies");
/// SPIFFE ID → numeric identity; never shrinks (numbers are never reused).
pub const IDENTITY_NUMBERS: TableDefinition<'_, &str, u32> = TableDefinition::new("identity_numbers");
/// Node name → node id; never shrinks.
pub const NODE_IDS: TableDefinition<'_, &str, u32> = TableDefinition::new("node_ids");

/// Tables keyed by text, which [`Store::load_all`] and friends work on.
pub type StrTable = TableDefinition<'static, &'static str, &'static [u8]>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare state directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state database {op} failed: {source}; check the state directory's disk and permissions")]
    Db {
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("state database record {table}/{key} is corrupt: {reason}; restore the state directory from backup")]
    Corrupt { table: &'static str, key: String, reason: String },
    #[error("trust domain mismatch: the state directory belongs to {stored}, the config says {configured}; point stateDir elsewhere")]
    TrustDomainMismatch { stored: String, configured: String },
}

#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db { op, source: e.into() }
}

// === impl Store ===

impl Store {
    /// Opens (or creates) the database in `dir`, and binds it to `trust_domain`.
    pub fn open(dir: &Path, file: &str, trust_domain: &str) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: dir.display().to_string(), source };
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let path = dir.join(file);
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io)?;
        // An existing file keeps whatever mode it had: force it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let db = Database::builder().create_file(f).map_err(db_err("open"))?;
        let store = Self { db: std::sync::Arc::new(db) };
        store.init(trust_domain)?;
        Ok(store)
    }

    /// Rewrites the database in redb's newest file format (v3, the only one
    /// redb 3 reads); `Ok(false)` when it already is. Run with the CA
    /// stopped (redb's file lock refuses a second opener) and the state
    /// directory backed up: the rewrite is one transaction, but there is no
    /// way back to v2. See docs/runbooks.md, "Upgrading the CA's database".
    pub fn upgrade_format(dir: &Path, file: &str) -> Result<bool, StoreError> {
        let path = dir.join(file);
        if !path.is_file() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no database here");
            return Err(StoreError::Io { path: path.display().to_string(), source });
        }
        let mut db = Database::open(&path).map_err(db_err("open"))?;
        db.upgrade().map_err(db_err("upgrade"))
    }

    fn init(&self, trust_domain: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        {
            for t in [AUTHORITIES, ATTESTED_NODES, NODES, WORKLOADS, POLICIES] {
                tx.open_table(t).map_err(db_err("create table"))?;
            }
            tx.open_table(SERIALS).map_err(db_err("create table"))?;
            migrate_serials(&tx)?;
            tx.open_table(JOIN_TOKENS).map_err(db_err("create table"))?;
            tx.open_table(IDENTITY_NUMBERS).map_err(db_err("create table"))?;
            tx.open_table(NODE_IDS).map_err(db_err("create table"))?;
            let mut meta = tx.open_table(META).map_err(db_err("create table"))?;
            let stored = meta.get("trust_domain").map_err(db_err("read"))?.map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match stored {
                Some(stored) if stored != trust_domain => {
                    return Err(StoreError::TrustDomainMismatch { stored, configured: trust_domain.to_owned() });
                }
                Some(_) => {}
                None => {
                    meta.insert("trust_domain", trust_domain.as_bytes()).map_err(db_err("write"))?;
                }
            }
        }
        tx.commit().map_err(db_err("commit"))
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.db.begin_write().map_err(db_err("begin"))
    }

    pub fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().map_err(db_err("begin"))
    }

    pub fn commit(tx: redb::WriteTransaction) -> Result<(), StoreError> {
        tx.commit().map_err(db_err("commit"))
    }

    /// Every record of a text-keyed table, decoded.
    pub fn load_all<T: DeserializeOwned>(&self, table: StrTable, name: &'static str) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(table).map_err(db_err("open table"))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err("read"))? {
            let (k, v) = entry.map_err(db_err("read"))?;
            let key = k.value().to_owned();
            let value = decode(name, &key, v.value())?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Puts (or with `None` deletes) one record of a text-keyed table.
    pub fn put<T: Serialize>(&self, table: StrTable, key: &str, value: Option<&T>) -> Result<(), StoreError> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(table).map_err(db_err("open table"))?;
            match value {
                Some(v) => {
                    t.insert(key, encode(v).as_slice()).map_err(db_err("write"))?;
                }
                None => {
                    t.remove(key).map_err(db_err("write"))?;
                }
            }
        }
        Self::commit(tx)
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(META).map_err(db_err("open table"))?;
        let v = t.get(key).map_err(db_err("read"))?;
        Ok(v.and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
    }
}

/// The [`SERIALS`] key of an SVID: its expiry (unix seconds), when it was
/// signed (unix nanoseconds: SVIDs signed together sort together, even when
/// thousands share an expiry second), and its serial; all big-endian.
pub fn serial_key(expires_at: i64, signed_at_nanos: u64, serial: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(SERIAL_KEY_PREFIX + serial.len());
    k.extend_from_slice(&u64::try_from(expires_at).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(&signed_at_nanos.to_be_bytes());
    k.extend_from_slice(serial);
    k
}

/// The smallest [`SERIALS`] key with expiry `expires_at`.
pub fn serial_key_from(expires_at: i64) -> Vec<u8> {
    serial_key(expires_at, 0, &[])
}

/// Bytes before the serial in a [`SERIALS`] key.
const SERIAL_KEY_PREFIX: usize = 16;

/// The serial in a [`SERIALS`] key.
pub fn serial_of_key(key: &[u8]) -> &[u8] {
    key.get(SERIAL_KEY_PREFIX..).unwrap_or_default()
}

/// Moves records of the serial-keyed layout into [`SERIALS`], in the
/// caller's transaction (so all or nothing), and drops the old table.
fn migrate_serials(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Expiry {
        expires_at: i64,
    }
    let exists = tx.list_tables().map_err(db_err("list tables"))?.any(|t| t.name() == LEGACY_SERIALS.name());
    if !exists {
        return Ok(());
    }
    {
        let old = tx.open_table(LEGACY_SERIALS).map_err(db_err("open table"))?;
        let mut new = tx.open_table(SERIALS).map_err(db_err("open table"))?;
        for entry in old.iter().map_err(db_err("read"))? {
            let (k, v) = entry.map_err(db_err("read"))?;
            let e: Expiry = decode("serials", &format!("{:02x?}", k.value()), v.value())?;
            new.insert(serial_key(e.expires_at, 0, k.value()).as_slice(), v.value()).map_err(db_err("write"))?;
        }
    }
    tx.delete_table(LEGACY_SERIALS).map_err(db_err("delete table"))?;
    Ok(())
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(table: &'static str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, key: key.to_owned(), reason: e.to_string() })
}

/// Maps any redb error into a [`StoreError`] for `op`; for callers that run
/// their own transactions.
pub fn err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    db_err(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_bound_to_a_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::open(&state, "db.redb", "td").unwrap();
        store.put(WORKLOADS, "a/b", Some(&42u32)).unwrap();
        drop(store);
        let mode = std::fs::metadata(state.join("db.redb")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(matches!(Store::open(&state, "db.redb", "other"), Err(StoreError::TrustDomainMismatch { .. })));
        let store = Store::open(&state, "db.redb", "td").unwrap();
        assert_eq!(store.load_all::<u32>(WORKLOADS, "workloads").unwrap(), vec![("a/b".to_owned(), 42)]);
    }

    #[test]
    fn serials_of_the_old_layout_are_moved_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "db.redb", "td").unwrap();
        let tx = store.write().unwrap();
        {
            let mut t = tx.open_table(LEGACY_SERIALS).unwrap();
            t.insert([7u8; 16].as_slice(), br#"{"expires_at":200,"other":"kept"}"#.as_slice()).unwrap();
            t.insert([3u8; 16].as_slice(), br#"{"expires_at":100}"#.as_slice()).unwrap();
        }
        Store::commit(tx).unwrap();
        drop(store);
        let store = Store::open(dir.path(), "db.redb", "td").unwrap();
        let tx = store.read().unwrap();
        assert!(!tx.list_tables().unwrap().any(|t| t.name() == "serials"), "the old table is gone");
        let t = tx.open_table(SERIALS).unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            t.iter().unwrap().map(|e| e.unwrap()).map(|(k, v)| (serial_of_key(k.value()).to_vec(), v.value().to_vec())).collect();
        assert_eq!(
            got,
            vec![(vec![3u8; 16], br#"{"expires_at":100}"#.to_vec()), (vec![7u8; 16], br#"{"expires_at":200,"other":"kept"}"#.to_vec())]
        );
    }
}
