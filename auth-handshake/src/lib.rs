//! See Cargo.toml description; built out by its issue.

#![deny(rust_2018_idioms)]
