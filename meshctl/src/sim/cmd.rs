//! Running commands, with errors that say what ran and what it printed.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run {cmd}: {source} (is it installed? see scripts/setup.sh)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
}

pub fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs to completion; `Ok(stdout)` only on exit status 0.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CmdError> {
    let out = output(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CmdError::Failed {
            cmd: describe(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs to completion and returns whatever happened.
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, CmdError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CmdError::Spawn { cmd: describe(program, args), source })
}

/// `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<String, CmdError> {
    run("ip", args)
}

/// `ip -n <ns> ...`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec <ns> <program> <args...>`
pub fn in_ns<S: AsRef<OsStr>>(ns: &str, program: &str, args: &[S]) -> Result<String, CmdError> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("netns"), OsStr::new("exec"), OsStr::new(ns), OsStr::new(program)];
    all.extend(args.iter().map(|a| a.as_ref()));
    run("ip", &all)
}

/// Like [`in_ns`] but returns the raw output whatever the exit status.
pub fn in_ns_output<S: AsRef<OsStr>>(ns: &str, program: &str, args: &[S]) -> Result<Output, CmdError> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("netns"), OsStr::new("exec"), OsStr::new(ns), OsStr::new(program)];
    all.extend(args.iter().map(|a| a.as_ref()));
    output("ip", &all)
}

/// Sets a sysctl inside a namespace (`/proc/sys/net` is per network namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), CmdError> {
    in_ns(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
}
