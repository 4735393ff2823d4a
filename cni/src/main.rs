//! `meshguard-cni`: run by the container runtime once per pod sandbox and
//! command, configuration on stdin, result or error object on stdout
//! (docs/cni.md).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use meshguard_cni::plugin::{self, Outcome};
use meshguard_cni::spec::{self, CniError, code};

/// A network configuration is a few KiB; anything near this is not one.
const MAX_STDIN_BYTES: u64 = 1 << 20;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().take(MAX_STDIN_BYTES + 1).read_to_end(&mut stdin) {
        Ok(n) if n as u64 > MAX_STDIN_BYTES => {
            let e = CniError::new(code::IO_FAILURE, format!("the configuration on stdin is longer than {MAX_STDIN_BYTES} bytes"), "");
            Outcome { stdout: e.to_json(spec::LATEST_VERSION), exit: 1 }
        }
        Ok(_) => plugin::run(&|k| std::env::var(k).ok(), &stdin),
        Err(e) => {
            let e = CniError::new(code::IO_FAILURE, "cannot read the configuration on stdin", e.to_string());
            Outcome { stdout: e.to_json(spec::LATEST_VERSION), exit: 1 }
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    ExitCode::from(outcome.exit)
}
