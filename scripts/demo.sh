#!/bin/sh
# Sets up the machine and runs the main job: `meshctl demo` — three
# simulated nodes with identity-ca, wg-agent and auth-handshake, a sample
# MeshPolicy over TCP, UDP, SCTP and ICMP, and a traffic matrix judged
# against the policy and against a capture of the underlay.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked -p meshguard-wg-agent -p meshguard-identity-ca -p meshguard-auth-handshake -p meshguard-meshctl --bins
exec target/debug/meshctl demo "$@"
