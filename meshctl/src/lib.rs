//! meshctl, the operator CLI, and the simulated-cluster engine it owns.
//!
//! [`cli`] is the command line (`meshctl demo|up|down|exec|status|policy|observe`).
//! [`sim`] builds nodes and pods as network namespaces on one machine and
//! runs every component for real; `meshctl up`/`demo`, the end-to-end tests
//! (`tests/`) and the benchmarks (`bench/`) all drive it.
//!
//! ```no_run
//! use meshguard_meshctl::sim::cluster::cluster;
//! let c = cluster().nodes(3).pod("shop/web").on("node-1").pod("shop/api").on("node-2").build().unwrap();
//! c.start_agents().unwrap();
//! ```

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod cli;
pub mod sim;
