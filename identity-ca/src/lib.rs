//! identity-ca: the trust domain's SPIFFE CA, node attestation, and the
//! standalone registry of nodes, workloads and policies.
//!
//! | module | job |
//! |---|---|
//! | [`config`] | the YAML config and its defaults |
//! | [`store`] | the embedded database (redb) |
//! | [`authority`] | CA keys, X.509-/JWT-SVID signing, bundle, rotation |
//! | [`spiffe_bundle`] | the bundle in the SPIFFE bundle format, for federation |
//! | [`csr`] | checking PKCS#10 requests |
//! | [`attest`] | node attestation: join tokens, Kubernetes TokenReview |
//! | [`registry`] | nodes, workloads, policies and their watch stream |
//! | [`k8s_pods`] | Kubernetes mode: pods and MeshPolicy objects into the registry |
//! | [`k8s_nodes`] | Kubernetes mode: MeshNode objects into the registry |
//! | [`k8s_numbers`] | Kubernetes mode: MeshIdentity numbers adopted at start, the registry's numbers out as MeshIdentity objects |
//! | [`node_api`] | the mutual-TLS gRPC API nodes call |
//! | [`admin`] | the root-only admin API on a unix socket |
//! | [`server`] | wiring it all up and running it |

// tonic::Status (about 176 bytes) is the error type of every gRPC handler and
// of the helpers they call; boxing it everywhere would buy nothing.
#![allow(clippy::result_large_err)]
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod attest;
pub mod authority;
pub mod config;
pub mod csr;
pub mod k8s_nodes;
pub mod k8s_numbers;
pub mod k8s_pods;
pub mod metrics;
pub mod node_api;
pub mod registry;
pub mod server;
pub mod spiffe_bundle;
pub mod store;
