//! meshctl's command line without a cluster (no root needed): usage errors,
//! exit codes, and commands that need a cluster when none is up.
//!
//! Being an integration test of this package also makes `cargo test
//! --workspace` build meshctl's binaries (meshctl, mg-probe, mg-spiffe),
//! which the end-to-end tests in tests/ run inside the simulated cluster.

use std::process::{Command, Output};

fn meshctl(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl")).arg("--state-dir").arg(state).args(args).output().unwrap()
}

#[test]
fn usage_errors_exit_2_and_no_cluster_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshctl(dir.path(), &["up", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = meshctl(dir.path(), &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster is up"));
    let out = meshctl(dir.path(), &["policy", "apply", "-f", "/nonexistent.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn every_subcommand_shows_an_example() {
    let dir = tempfile::tempdir().unwrap();
    for sub in [
        &["demo"][..],
        &["up"],
        &["down"],
        &["exec"],
        &["status"],
        &["observe"],
        &["policy", "apply"],
        &["policy", "get"],
        &["policy", "delete"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = meshctl(dir.path(), &args);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Example"), "{sub:?} --help has no example:\n{help}");
    }
    let top = String::from_utf8_lossy(&meshctl(dir.path(), &["--help"]).stdout).into_owned();
    assert!(top.contains("Exit codes"), "{top}");
}
