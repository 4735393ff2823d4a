//! Generates the SPIFFE Workload API (upstream workload.proto, unchanged).
//! Needs `protoc` (Debian: protobuf-compiler) or `PROTOC` pointing at one.

fn main() {
    let proto = "proto/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    if let Err(e) = tonic_prost_build::configure().build_client(true).compile_protos(&[proto], &["proto"]) {
        panic!("cannot compile {proto}: {e} (install protoc: apt-get install protobuf-compiler)");
    }
}
