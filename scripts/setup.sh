#!/bin/sh
# Installs what meshguard needs on a Debian 12 machine (run as root).
# Idempotent: safe to run before every build.
set -eu

# clang/llvm build the eBPF programs; bpftool inspects them; iproute2,
# iputils-ping and tcpdump drive and watch the simulated cluster;
# wireguard-go and wireguard-tools are the interop peer and the `wg` tool;
# protobuf-compiler builds the gRPC APIs.
PACKAGES="
  build-essential pkg-config ca-certificates curl
  clang-19 llvm-19 libbpf-dev linux-libc-dev bpftool
  iproute2 iputils-ping tcpdump
  wireguard-go wireguard-tools
  protobuf-compiler
"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and the tests create network namespaces)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $PACKAGES

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        :
    else
        echo "setup.sh: installing the Rust toolchain with rustup" >&2
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
fi

# bpffs is not mounted at boot everywhere; the datapath pins its maps there.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
