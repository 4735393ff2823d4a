//! The node's WireGuard key: created on first start, kept across restarts,
//! replaced on rotation. The file is base64 like `wg genkey` output, mode
//! 0600 in a 0700 directory, and its content never reaches a log.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use boringtun::x25519;
use meshguard_common::key::{PublicKey, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot access node key {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}` or rotate the key")]
    Permissions { path: String, mode: u32 },
    #[error("node key {path} is not a base64 WireGuard key: {reason}; rotate it with `wg-agent rotate-key`")]
    Invalid { path: String, reason: String },
}

pub fn public_of(secret: &SecretKey) -> PublicKey {
    let s = x25519::StaticSecret::from(*secret.as_bytes());
    PublicKey(x25519::PublicKey::from(&s).to_bytes())
}

/// Reads the key, or creates one if there is none.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, PublicKey), KeyFileError> {
    match std::fs::metadata(path) {
        Ok(_) => load(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = SecretKey::generate();
            write(path, &secret)?;
            let public = public_of(&secret);
            tracing::info!(path = %path.display(), public_key = %public, "created node key");
            Ok((secret, public))
        }
        Err(source) => Err(KeyFileError::Io { path: path.display().to_string(), source }),
    }
}

pub fn load(path: &Path) -> Result<(SecretKey, PublicKey), KeyFileError> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Io { path: p.clone(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: p, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io { path: p.clone(), source })?;
    let secret = SecretKey::from_base64(text.trim()).map_err(|e| KeyFileError::Invalid { path: p, reason: e.to_string() })?;
    let public = public_of(&secret);
    Ok((secret, public))
}

/// Replaces the key with a fresh one and returns the new public key.
pub fn rotate(path: &Path) -> Result<PublicKey, KeyFileError> {
    let secret = SecretKey::generate();
    write(path, &secret)?;
    let public = public_of(&secret);
    tracing::info!(path = %path.display(), public_key = %public, "rotated node key");
    Ok(public)
}

/// Writes the key atomically: a 0600 temporary file, then a rename.
fn write(path: &Path, secret: &SecretKey) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    let mut text = secret.to_base64();
    text.push('\n');
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    zeroize::Zeroize::zeroize(&mut text);
    written.map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_kept_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/node.key");
        let (_, first) = load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        let (_, again) = load_or_create(&path).unwrap();
        assert_eq!(first, again, "a restart keeps the key");
        let rotated = rotate(&path).unwrap();
        assert_ne!(rotated, first);
        assert_eq!(load(&path).unwrap().1, rotated);
    }

    #[test]
    fn refuses_loose_permissions_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Invalid { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Permissions { mode: 0o644, .. })));
    }
}
