#!/bin/bash
# connect() of a new authorized pair across nodes, auth required vs auth
# off, in the same run, on the simulated cluster with every real agent.
#
#   sudo ./bench/auth-connect.sh
#
# Builds the release binaries, then runs tests/benches/auth_connect.rs:
# 24 new pairs proved ahead, 24 proved on their first packet (the SYN
# held and replayed), 48 connects with no policy; p50/p99/max and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, eBPF)" >&2; exit 1; }
cargo build --release --locked --workspace --bins
MESHGUARD_BIN_DIR="$PWD/target/release" cargo bench --locked -p meshguard-tests --bench auth_connect
