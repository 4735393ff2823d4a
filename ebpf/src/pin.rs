//! bpffs and the pin layout of one datapath instance.
//!
//! Several simulated nodes share one machine and one bpffs, so every
//! instance has its own pin root (`/sys/fs/bpf/meshguard/<instance>` by
//! default) holding `maps/`, `progs/` and `links/`. What is pinned outlives
//! the agent: the programs stay attached and keep enforcing (fail closed),
//! and a new agent adopts the maps, conntrack included.

// Mounting bpffs is a syscall edge: see the SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use crate::abi;

/// `BPF_FS_MAGIC` from <linux/magic.h>.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot mount bpffs at {path}: {source}; run as root or mount it first (mount -t bpf bpf {path})")]
    Mount {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("pin root {path} is not on bpffs: choose a path below {bpffs}", bpffs = abi::BPFFS)]
    NotBpffs { path: String },
    #[error("cannot create or remove {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Where one instance pins its maps, programs and links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

// === impl PinLayout ===

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `/sys/fs/bpf/meshguard/<instance>`.
    pub fn for_instance(instance: &str) -> Self {
        Self::new(Path::new(abi::DEFAULT_PIN_PARENT).join(instance))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join(abi::PIN_MAPS_DIR)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn progs(&self) -> PathBuf {
        self.root.join(abi::PIN_PROGS_DIR)
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join(abi::PIN_LINKS_DIR)
    }

    /// The TCX link of `program` on interface `ifindex`.
    pub fn link(&self, ifindex: u32, program: &str) -> PathBuf {
        self.links().join(format!("{ifindex}-{program}"))
    }

    /// Whether an instance was pinned here before (its config map exists).
    pub fn exists(&self) -> bool {
        self.map(abi::MAP_CONFIG).exists()
    }

    /// Mounts bpffs if needed and creates the instance's directories.
    pub fn prepare(&self) -> Result<(), PinError> {
        ensure_bpffs()?;
        for dir in [self.maps(), self.progs(), self.links()] {
            std::fs::create_dir_all(&dir).map_err(|source| PinError::Io { path: dir.display().to_string(), source })?;
        }
        if !is_bpffs(&self.root) {
            return Err(PinError::NotBpffs { path: self.root.display().to_string() });
        }
        Ok(())
    }

    /// Removes the whole instance: unpinning the links detaches the
    /// programs, unpinning the maps frees them once nothing holds them.
    pub fn remove(&self) -> Result<(), PinError> {
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinError::Io { path: self.root.display().to_string(), source }),
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory the size of `struct statfs`, which statfs fills on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statfs returned 0, so it initialised `st`.
    // f_type's width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let is = rc == 0 && unsafe { st.assume_init() }.f_type as i64 == BPF_FS_MAGIC;
    is
}

/// Mounts bpffs at /sys/fs/bpf unless it is mounted (as Cilium's agent does).
pub fn ensure_bpffs() -> Result<(), PinError> {
    let path = Path::new(abi::BPFFS);
    if is_bpffs(path) {
        return Ok(());
    }
    let err = |source| PinError::Mount { path: abi::BPFFS.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: all three are valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Another agent may have mounted it in the meantime.
        if !is_bpffs(path) {
            return Err(err(e));
        }
    }
    Ok(())
}
