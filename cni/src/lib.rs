//! `meshguard-cni`, a chained CNI plugin: after the main plugin (ptp,
//! bridge, the cluster's own) has wired a pod, it hands the pod's host-side
//! interface to the node agent and returns only once the agent enforces it,
//! so the pod's containers never start unenforced.
//!
//! - [`spec`]: the CNI specification's configuration, `prevResult` and error object.
//! - [`env`]: the `CNI_*` environment and `CNI_ARGS`.
//! - [`protocol`]: the hand-off to the agent, shared with `wg-agent`.
//! - [`plugin`]: the commands.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod env;
pub mod plugin;
pub mod protocol;
pub mod spec;
