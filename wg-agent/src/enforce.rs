//! Enforcement: keeping the eBPF policy datapath in step with the cluster
//! view and with the pods on this node.
//!
//! - [`compile`]: `MeshPolicy` objects → the datapath's policy entries (pure);
//! - [`endpoints`]: the node-local pod descriptions the CNI plugin writes;
//! - [`pods`]: what each local pod interface should be — enforced with its
//!   identity, or held closed (pure; there is no open state);
//! - [`Enforcer`]: drives a [`DatapathApi`](meshguard_ebpf::DatapathApi) —
//!   the kernel's [`Datapath`](meshguard_ebpf::Datapath), or
//!   `meshguard_ebpf::testing::FakeDatapath` in tests — with the ipcache, the
//!   compiled policy and one attachment per local pod interface;
//!   [`Enforcer::hand_off`] serves the CNI plugin's requests: a pod is
//!   enforced (or held closed) before ADD returns;
//! - [`events`]: drop and auth events, logged and counted.

pub mod compile;
pub mod endpoints;
mod enforcer;
pub mod events;
pub mod pods;

pub use enforcer::{EnforceError, EnforceState, Enforcer, PodState, PodStatus, SyncMode, handoff};
