//! Compiles the C programs under `bpf/` with clang (BPF target, BTF on) into
//! `OUT_DIR`; `src/objects.rs` embeds them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The compiler; override with `MESHGUARD_CLANG` (e.g. a clang without the
/// `-19` suffix). clang-19 is what the project's machines have.
const CLANG_ENV: &str = "MESHGUARD_CLANG";
const DEFAULT_CLANG: &str = "clang-19";

/// (source, object, extra flags).
const OBJECTS: &[(&str, &str, &[&str])] = &[
    ("meshguard.c", "meshguard.o", &[]),
    // The datapath again, with the per-run flow key of lib/bench.h.
    ("meshguard.c", "meshguard_bench.o", &["-DMG_BENCH_NEWFLOW"]),
    ("floors.c", "floors.o", &[]),
    ("abi.c", "abi.o", &[]),
    ("replay.c", "replay.o", &[]),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let bpf = manifest.join("bpf");
    println!("cargo:rerun-if-env-changed={CLANG_ENV}");
    for dir in [bpf.clone(), bpf.join("lib")] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for entry in std::fs::read_dir(&dir).expect("read ebpf/bpf") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "c" || e == "h") {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }

    let clang = std::env::var(CLANG_ENV).unwrap_or_else(|_| DEFAULT_CLANG.to_owned());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    // <asm/types.h> and friends live under the multiarch include directory.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for (src, obj, extra) in OBJECTS {
        compile(&clang, &bpf.join(src), &out.join(obj), extra, Path::new(&multiarch));
    }
}

fn compile(clang: &str, src: &Path, obj: &Path, extra: &[&str], multiarch: &Path) {
    let mut cmd = Command::new(clang);
    cmd.args(["-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall", "-Werror", "-Wno-unused-function"])
        .arg("-I")
        .arg(multiarch)
        .args(extra)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {clang} to build the eBPF programs ({e}): install clang-19 (apt-get install --no-install-recommends clang-19 libbpf-dev) or set {CLANG_ENV}")
    });
    assert!(status.success(), "{clang} failed on {}: see the messages above", src.display());
}
