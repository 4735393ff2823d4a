//! The state directory: one cluster per directory, its description in
//! `cluster.json`, and a lock so two `meshctl` invocations never build or
//! remove the same cluster at once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::cli::CliError;
use crate::sim::cluster::{Cluster, SavedCluster};

pub const STATE_FILE: &str = "cluster.json";
const LOCK_FILE: &str = "lock";

/// The state directory, held exclusively while the guard lives.
pub struct StateLock {
    pub dir: PathBuf,
    _lock: File,
}

/// Takes the directory's lock (creating the directory 0700); fails at once
/// when another meshctl holds it.
pub fn lock(dir: &Path) -> Result<StateLock, CliError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(LOCK_FILE))?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { dir: dir.to_owned(), _lock: file }),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(CliError::State(format!("another meshctl is building or removing the cluster in {}; wait for it", dir.display())))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(CliError::Io(e)),
    }
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// The saved cluster of `dir`, if one is up.
pub fn saved(dir: &Path) -> Result<Option<SavedCluster>, CliError> {
    let path = state_file(dir);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Cluster::read_saved(&path)?))
}

/// The running cluster of `dir`, or the error every command that needs one gives.
pub fn require(dir: &Path) -> Result<Cluster, CliError> {
    match saved(dir)? {
        Some(s) => Ok(Cluster::open(s)),
        None => {
            Err(CliError::State(format!("no cluster is up in {}; start one with `meshctl up` (or `meshctl demo --keep`)", dir.display())))
        }
    }
}
