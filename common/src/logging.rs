//! Logging set-up every binary shares: `RUST_LOG` filters (default `info`),
//! `LOG_FORMAT=json` for one JSON object per line, always on stderr, with
//! colours only when stderr is a terminal (a log file gets plain text).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// `LOG_FORMAT=json` switches to one JSON object per line.
pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";
const DEFAULT_FILTER: &str = "info";

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
