//! Generates identity-ca's gRPC code.
//! Needs `protoc` (Debian: protobuf-compiler) or `PROTOC` pointing at one.

fn main() {
    let proto = "proto/meshguard/ca/v1/ca.proto";
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={proto}");
    if let Err(e) = tonic_prost_build::configure().compile_protos(&[proto], &["proto"]) {
        panic!("cannot compile {proto}: {e} (install protoc: apt-get install protobuf-compiler)");
    }
}
