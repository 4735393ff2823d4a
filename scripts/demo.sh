#!/bin/sh
# Sets up the machine and runs the demo: two simulated nodes, a pod on each,
# pod traffic encrypted node to node, proven by a capture of the underlay.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked -p meshguard-wg-agent -p meshguard-tests --bins
exec target/debug/mesh-demo
