//! The simulated cluster meshguard's tests, demo and (later) `meshctl` run
//! on: nodes and pods as network namespaces on one machine, real agents, and
//! captures on the underlay.
//!
//! ```no_run
//! use meshguard_tests::cluster::cluster;
//! let c = cluster().nodes(3).pod("shop/web").on("node-1").pod("shop/api").on("node-2").build().unwrap();
//! c.start_agents().unwrap();
//! ```

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod bins;
pub mod capture;
pub mod cluster;
pub mod cmd;
pub mod identity;
pub mod uapi;
