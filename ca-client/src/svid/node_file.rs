//! The node credential file: the node's X.509-SVID and its private key, as
//! auth-handshake keeps it in its state directory (`node-svid.json`).
//!
//! auth-handshake writes it (after attesting, and at every renewal); other
//! processes on the node that must speak for the node — wg-agent publishing
//! the node's WireGuard key — read it (see [`super::node_tls`]). The file is
//! 0600 and replaced atomically (write a temporary file, fsync, rename,
//! fsync the directory), so a reader sees the old credential or the new one,
//! never a mix. Key bytes are zeroized wherever this module holds them, and
//! never appear in a `Debug` or an error.
//!
//! ```json
//! {"spiffe_id": "spiffe://td/meshguard/node/node-1",
//!  "chain": ["<base64 DER, leaf first>", ...],
//!  "key_pkcs8": "<base64 PKCS#8 DER>",
//!  "issued_at": 1700000000, "expires_at": 1700003600}
//! ```

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use meshguard_common::spiffe::SpiffeId;

/// The file's name in auth-handshake's state directory.
pub const NODE_SVID_FILE: &str = "node-svid.json";
/// A node credential is a few KiB; anything much larger is not one.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    #[error(
        "node credential file {path} does not exist: auth-handshake writes it once the node is attested; start it, or point at its stateDir"
    )]
    NotFound { path: String },
    #[error("cannot read node credential file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node credential file {path} is invalid: {reason}; auth-handshake rewrites it when it attests again")]
    Invalid { path: String, reason: String },
    #[error("cannot write node credential file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A node X.509-SVID and its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCredential {
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER; zeroized on drop.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Unix seconds: when this process received it (renewal is timed from it).
    pub issued_at: i64,
    /// Unix seconds: the leaf's notAfter.
    pub expires_at: i64,
}

/// The file's JSON. The key's base64 text is zeroized when dropped.
#[derive(Serialize, Deserialize)]
struct FileFormat {
    spiffe_id: String,
    chain: Vec<String>,
    key_pkcs8: String,
    issued_at: i64,
    expires_at: i64,
}

// === impl NodeCredential ===

impl NodeCredential {
    /// Unix seconds at which to renew: half-way through its life.
    pub fn renew_at(&self) -> i64 {
        self.issued_at + (self.expires_at - self.issued_at) / 2
    }
}

impl fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredential")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain", &self.chain.len())
            .field("key_pkcs8", &"<redacted>")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Drop for FileFormat {
    fn drop(&mut self) {
        self.key_pkcs8.zeroize();
    }
}

/// Reads and checks the node credential file at `path`: well-formed, a
/// leaf that is an X.509-SVID (checked as the standard says) naming the
/// SPIFFE ID the file names, and a key. Expiry is the caller's business.
pub fn load(path: &Path) -> Result<NodeCredential, NodeFileError> {
    let p = || path.display().to_string();
    let invalid = |reason: String| NodeFileError::Invalid { path: p(), reason };
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => NodeFileError::NotFound { path: p() },
        _ => NodeFileError::Read { path: p(), source },
    })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(format!("{} bytes, more than the {MAX_FILE_BYTES} a node credential can be", meta.len())));
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => NodeFileError::NotFound { path: p() },
        _ => NodeFileError::Read { path: p(), source },
    })?);
    // serde_json's error names a line and column, never the content.
    let f: FileFormat = serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not the node credential JSON: {e}")))?;
    let spiffe_id = SpiffeId::parse(&f.spiffe_id).map_err(|e| invalid(format!("spiffe_id: {e}")))?;
    let chain = f
        .chain
        .iter()
        .enumerate()
        .map(|(i, c)| B64.decode(c).map_err(|e| invalid(format!("chain[{i}] is not base64: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // Not the decode error's text: it could quote the key's bytes.
    let key_pkcs8 = Zeroizing::new(B64.decode(&f.key_pkcs8).map_err(|_| invalid("key_pkcs8 is not base64".into()))?);
    if key_pkcs8.is_empty() {
        return Err(invalid("key_pkcs8 is empty".into()));
    }
    let leaf = super::check_leaf(chain.first().ok_or_else(|| invalid("chain is empty".into()))?).map_err(|e| invalid(e.to_string()))?;
    if leaf.spiffe_id != spiffe_id {
        return Err(invalid(format!("the certificate is {}, the file says {spiffe_id}", leaf.spiffe_id)));
    }
    Ok(NodeCredential { spiffe_id, chain, key_pkcs8, issued_at: f.issued_at, expires_at: f.expires_at })
}

/// Writes `cred` to `path` atomically, mode 0600.
pub fn save(path: &Path, cred: &NodeCredential) -> Result<(), NodeFileError> {
    let f = FileFormat {
        spiffe_id: cred.spiffe_id.to_string(),
        chain: cred.chain.iter().map(|c| B64.encode(c)).collect(),
        key_pkcs8: B64.encode(cred.key_pkcs8.as_slice()),
        issued_at: cred.issued_at,
        expires_at: cred.expires_at,
    };
    // Sized up front so the buffer holding the key never reallocates (which
    // would leave an unzeroized copy behind).
    let size = 256 + f.spiffe_id.len() + f.key_pkcs8.len() + f.chain.iter().map(|c| c.len() + 4).sum::<usize>();
    let mut bytes = Zeroizing::new(Vec::with_capacity(size));
    serde_json::to_writer(&mut *bytes, &f)
        .map_err(|e| NodeFileError::Invalid { path: path.display().to_string(), reason: e.to_string() })?;
    write_private_atomic(path, &bytes)
}

/// Replaces `path` with `bytes`: a 0600 temporary file beside it, fsynced,
/// renamed over it, and the directory fsynced so the rename is durable.
fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), NodeFileError> {
    let io = |source| NodeFileError::Write { path: path.display().to_string(), source };
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::svid::testing::{node_credential, test_ca};

    #[test]
    fn round_trips_privately_and_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_SVID_FILE);
        let ca = test_ca("td");
        let cred = node_credential(&ca, "node-1", 3600);
        save(&path, &cred).unwrap();
        assert_eq!(load(&path).unwrap(), cred);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A rewrite leaves no temporary file behind.
        let renewed = node_credential(&ca, "node-1", 3600);
        save(&path, &renewed).unwrap();
        assert_eq!(load(&path).unwrap(), renewed);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [NODE_SVID_FILE]);
    }

    #[test]
    fn missing_or_garbage_files_give_a_clear_error_without_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_SVID_FILE);
        let e = load(&path).unwrap_err();
        assert!(matches!(e, NodeFileError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("auth-handshake"), "{e}");

        let ca = test_ca("td");
        let cred = node_credential(&ca, "node-1", 3600);
        save(&path, &cred).unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        let key_b64 = B64.encode(cred.key_pkcs8.as_slice());
        let other = node_credential(&ca, "node-2", 3600);
        let cases = [
            ("garbage", "{not json".to_owned()),
            ("empty", String::new()),
            ("bad key", good.replace(&key_b64, &format!("{}!!", &key_b64[..40]))),
            ("no key", good.replace(&key_b64, "")),
            ("bad id", good.replace("spiffe://td/meshguard/node/node-1", "not-an-id")),
            ("other id", good.replace("spiffe://td/meshguard/node/node-1", "spiffe://td/meshguard/node/node-2")),
            ("chain not a cert", good.replace(&B64.encode(&cred.chain[0]), &B64.encode(b"nope"))),
            ("another node's chain", good.replace(&B64.encode(&cred.chain[0]), &B64.encode(&other.chain[0]))),
        ];
        for (what, text) in cases {
            std::fs::write(&path, &text).unwrap();
            let e = load(&path).unwrap_err();
            assert!(matches!(e, NodeFileError::Invalid { .. }), "{what}: {e}");
            let shown = format!("{e} {e:?}");
            assert!(shown.contains(&path.display().to_string()), "{what}: {shown}");
            assert!(!shown.contains(&key_b64[..16]), "{what}: the key leaked: {shown}");
        }
        let shown = format!("{cred:?}");
        assert!(!shown.contains(&key_b64[..16]) && shown.contains("redacted"), "{shown}");
    }
}
