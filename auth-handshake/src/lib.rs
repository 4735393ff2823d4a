//! auth-handshake: the per-node identity agent.
//!
//! | module | job |
//! |---|---|
//! | [`config`] | the YAML config and its defaults |
//! | [`ca_client`] | attestation, the node SVID, calls to identity-ca |
//! | [`svids`] | the SVIDs of this node's workloads, renewed at half-life |
//! | [`caller`] | Workload API caller (pid) → workload |
//! | [`peer_process`] | the process that opened a Workload API connection, bound at accept (pidfd) |
//! | [`workload_api`] | the SPIFFE Workload API on a unix socket |
//! | [`jwt`] | JWT-SVID validation |
//! | [`handshake`] | the mutual-authentication protocol, without I/O |
//! | [`peers`] | the handshake port and connections to other nodes, with their limits |
//! | [`entries`] | the auth entries this node holds, and the auth map |
//! | [`mutual`] | the agent that proves pairs and keeps the auth map |
//! | [`metrics`] | Prometheus metrics |
//! | [`agent`] | wiring it all up and running it |

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod agent;
pub mod authority;
pub mod ca_client;
pub mod caller;
pub mod config;
pub mod entries;
pub mod handshake;
pub mod jwt;
pub mod metrics;
pub mod mutual;
pub mod peer_process;
pub mod peers;
pub mod svids;
#[cfg(feature = "testing")]
pub mod testing;
pub mod workload_api;

/// The upstream SPIFFE Workload API (`workload.proto`, no package), generated.
#[allow(clippy::all, rust_2018_idioms, missing_docs)]
pub mod proto {
    tonic::include_proto!("_");
}
