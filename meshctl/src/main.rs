//! `meshctl`: see [`meshguard_meshctl::cli`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use meshguard_meshctl::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
