//! Finding the project's binaries from a test, a demo or (later) `meshctl`.
//!
//! `cargo test --workspace` builds every binary before any test runs, into
//! the same `target/<profile>/` directory as the test executables (which
//! live one level down, in `deps/`).

use std::path::PathBuf;

/// Overrides where binaries are looked up (e.g. an installed prefix).
pub const BIN_DIR_ENV: &str = "MESHGUARD_BIN_DIR";

pub fn bin_path(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!("binary {name:?} not found (looked in {candidates:?}); build it with `cargo build --workspace` or set {BIN_DIR_ENV}");
}

/// Fails loudly — never skips — when the test cannot do what it is for.
pub fn require_root() {
    let euid = effective_uid();
    assert!(
        euid == 0,
        "this test builds network namespaces, TUN devices and eBPF programs and must run as root \
         (euid is {euid}); run the suite with `sudo ./scripts/test.sh`"
    );
    for tool in ["ip", "tcpdump"] {
        assert!(crate::sim::cmd::output(tool, &["-V"]).is_ok(), "this test needs `{tool}`; install the packages with ./scripts/setup.sh");
    }
}

/// The effective uid, read from `/proc/self/status` (no FFI needed).
pub fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}
