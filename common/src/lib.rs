//! Types that several meshguard binaries share.
//!
//! Kept deliberately small: identities ([`spiffe`]), WireGuard key encoding
//! ([`key`]), the cluster view every agent works from and the trait its
//! sources implement ([`cluster`]), and the `MeshPolicy` resource ([`policy`]).
//! The client side of identity-ca (its protobufs, the registry source, SVID
//! verification and node TLS) lives in `meshguard-ca-client`.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod flow;
pub mod key;
pub mod logging;
pub mod output;
pub mod policy;
pub mod retry;
pub mod spiffe;
pub mod telemetry;
pub mod yaml;
