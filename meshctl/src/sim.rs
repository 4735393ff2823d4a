//! The simulated cluster: nodes and pods as network namespaces, real agents,
//! captures on the underlay.

pub mod bins;
pub mod capture;
pub mod cluster;
pub mod cmd;
pub mod identity;
pub mod spec;
pub mod uapi;
