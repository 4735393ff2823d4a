#!/bin/sh
# Sets up the machine and runs the whole test suite (as root: the end-to-end
# tests build network namespaces, TUN devices and eBPF programs).
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
PATH="$HOME/.cargo/bin:$PATH"
exec cargo test --workspace --locked
