# meshguard's one image: every binary the Kubernetes manifests in deploy/
# run (wg-agent, auth-handshake, identity-ca, meshguard-cni and its
# installer) and the operator CLI.
#
#   docker build -t REGISTRY/meshguard:TAG .
#
# The eBPF programs are compiled into the binaries (include_bytes), so the
# runtime stage needs no object files and no compiler.

# The binaries copied into the image; deploy's test checks each is a binary
# of the workspace and that every command the manifests run is here.
ARG BINARIES="wg-agent auth-handshake identity-ca meshguard-cni meshctl"

FROM rust:1-bookworm AS build
ARG BINARIES
# As scripts/setup.sh: clang-19 builds the eBPF programs against libbpf's
# headers and the multiarch kernel headers; protoc builds the gRPC APIs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang-19 llvm-19 libbpf-dev linux-libc-dev protobuf-compiler pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep the registry and target/ between builds; target/ is not
# in a layer, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for bin in $BINARIES; do cp "target/release/$bin" /out/; done

FROM debian:12-slim
# jq: meshguard-install-cni edits the node's CNI configuration with it.
# ca-certificates: the Kubernetes client's TLS stack loads the system roots
# beside the cluster's CA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends jq ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
COPY deploy/kubernetes/install-cni.sh /usr/local/bin/meshguard-install-cni
LABEL org.opencontainers.image.source="https://github.com/meshguard/meshguard" \
      org.opencontainers.image.description="meshguard: WireGuard between nodes, SPIFFE identity, eBPF policy" \
      org.opencontainers.image.licenses="Apache-2.0"
# No USER: the node agents run as root with a few capabilities, identity-ca
# as uid 65532; the manifests say which, per container.
