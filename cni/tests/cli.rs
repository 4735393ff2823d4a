//! The plugin as a container runtime runs it: a process, its environment
//! and stdin. (Also what makes `cargo test --workspace` build the binary
//! the end-to-end tests in tests/tests/cni.rs run.)

use std::io::Write as _;
use std::process::{Command, Stdio};

fn run(env: &[(&str, &str)], stdin: &str) -> (Option<i32>, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshguard-cni"));
    cmd.env_clear().stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn version_and_bad_environment() {
    let (code, v) = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion": "1.0.0"}"#);
    assert_eq!(code, Some(0));
    let versions: Vec<&str> = v["supportedVersions"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert!(versions.contains(&"1.0.0") && versions.contains(&"0.4.0"), "{v}");
    // No command: the spec's error object, a non-zero exit.
    let (code, v) = run(&[], r#"{"cniVersion": "1.0.0"}"#);
    assert_ne!(code, Some(0));
    assert!(v["code"].as_u64().is_some() && v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}
