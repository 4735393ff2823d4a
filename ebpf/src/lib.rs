//! meshguard's kernel datapath: C eBPF programs (under `bpf/`, built by
//! `build.rs` with clang) that enforce identity policy for every IP
//! protocol on each pod's host-side interface, and the Rust API the node
//! agent and auth-handshake drive them with.
//!
//! - [`Datapath`]: load or adopt a pinned instance, attach pods, keep the
//!   ipcache, policy, auth and conntrack maps, read counters;
//! - [`policy`]: policy entries (identities, protocol, port ranges,
//!   wildcards, allow/auth-required/deny) and their trie encoding;
//! - [`AuthTable`]: the pinned auth map on its own, for auth-handshake;
//! - [`events`]: drops and auth-required signals from the ring buffer;
//! - [`replay`]: replays a frame held with an auth-required signal;
//! - [`abi`]: the kernel/user ABI, checked against the object's BTF.
//!
//! See README.md for the model, precedence, fragments and pinning.

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod abi;
pub mod auth;
pub mod btf;
pub mod datapath;
pub mod events;
pub mod objects;
pub mod pin;
pub mod policy;
pub mod replay;
mod ringbuf;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use auth::{AuthPair, AuthTable};
pub use datapath::{
    AttachMode, Counters, CtTimeouts, Datapath, DatapathApi, DatapathConfig, DatapathError, GcStats, Interface, IpcacheEntry, MapSizes,
    PodEndpoint,
};
pub use pin::PinLayout;
