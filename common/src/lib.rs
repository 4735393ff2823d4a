//! Types that several meshguard binaries share.
//!
//! Kept deliberately small: identities ([`spiffe`]), WireGuard key encoding
//! ([`key`]), the cluster view every agent works from and the trait its
//! sources implement ([`cluster`]), and the `MeshPolicy` resource ([`policy`]).
//! With the `registry` feature: identity-ca's protobufs and the registry client
//! ([`registry`]), and X.509-SVID verification for TLS ([`svid`]).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod cluster;
pub mod flow;
pub mod key;
pub mod logging;
pub mod policy;
pub mod retry;
pub mod spiffe;

#[cfg(feature = "registry")]
pub mod registry;
#[cfg(feature = "registry")]
pub mod svid;
