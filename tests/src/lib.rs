//! meshguard's end-to-end tests (`tests/tests/`). They run on the simulated
//! cluster that `meshctl` owns ([`meshguard_meshctl::sim`]), the same engine
//! the demo and the benchmarks drive; this crate holds only the tests.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]
