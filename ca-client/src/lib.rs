//! The client side of identity-ca, shared by every component that talks to it.
//!
//! identity-ca's gRPC protobufs and the registry client that implements
//! [`ClusterSource`](meshguard_common::cluster::ClusterSource) ([`registry`]),
//! and X.509-SVID verification, node TLS and the node credential file
//! ([`svid`]). Kept out of `meshguard-common` so that crate holds only the
//! types every component shares.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod registry;
pub mod svid;
