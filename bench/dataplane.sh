#!/bin/bash
# Data-plane throughput: wg-agent against the userspace WireGuard peers,
# side by side in one run, on the same two network namespaces.
#
#   sudo ./bench/dataplane.sh [SECONDS]
#
# For each implementation: two namespaces joined by a veth pair, one
# WireGuard interface in each (configured with the stock `wg` tool), and
# iperf3 through the tunnel: one TCP stream each way, then four parallel
# streams. Prints Gbit/s and each peer's ratio to wg-agent.
# Peers: wireguard-go (Debian package), boringtun-cli and gotatun-cli
# (`cargo install --locked`, installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-10}
RUN="mgb$$"
A="$RUN-a"
B="$RUN-b"
IFA="wga$$"; IFA=${IFA:0:15}
IFB="wgb$$"; IFB=${IFB:0:15}
OUT="bench/out"
mkdir -p "$OUT"

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)" >&2; exit 1; }
for tool in iperf3 wg wireguard-go ip; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install --no-install-recommends iperf3 wireguard-tools wireguard-go iproute2" >&2; exit 1; }
done
export PATH="$HOME/.cargo/bin:$PATH"
command -v boringtun-cli >/dev/null || cargo install --locked boringtun-cli
command -v gotatun >/dev/null || cargo install --locked gotatun-cli   # installs `gotatun`
cargo build --release --locked -p meshguard-wg-agent >&2
WG_AGENT="$PWD/target/release/wg-agent"

cleanup() {
    for ns in "$A" "$B"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -f "/var/run/wireguard/$IFA.sock" "/var/run/wireguard/$IFB.sock"
}
trap cleanup EXIT

start_impl() { # impl netns ifname
    local impl=$1 ns=$2 IF=$3 log="$OUT/$impl-$ns.log"
    case "$impl" in
        wg-agent) ip netns exec "$ns" "$WG_AGENT" device "$IF" >"$log" 2>&1 & ;;
        wireguard-go) ip netns exec "$ns" env LOG_LEVEL=error wireguard-go -f "$IF" >"$log" 2>&1 & ;;
        boringtun-cli) ip netns exec "$ns" boringtun-cli "$IF" --foreground --disable-drop-privileges >"$log" 2>&1 & ;;
        gotatun-cli) ip netns exec "$ns" gotatun "$IF" --foreground --disable-drop-privileges >"$log" 2>&1 & ;;
    esac
    disown   # killed at cleanup; no job-control noise
    for _ in $(seq 100); do
        [ -S "/var/run/wireguard/$IF.sock" ] && ip -n "$ns" link show "$IF" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "$impl did not come up in $ns; see $log" >&2
    return 1
}

setup() { # impl
    cleanup
    ip netns add "$A"; ip netns add "$B"
    ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
    ip -n "$A" addr add 192.168.200.1/24 dev eth0
    ip -n "$B" addr add 192.168.200.2/24 dev eth0
    for ns in "$A" "$B"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
    wg genkey >"$OUT/a.key"; wg genkey >"$OUT/b.key"; chmod 600 "$OUT"/*.key
    local pa pb
    pa=$(wg pubkey <"$OUT/a.key"); pb=$(wg pubkey <"$OUT/b.key")
    # Distinct interface names: the UAPI socket directory is shared.
    start_impl "$1" "$A" "$IFA"
    ip netns exec "$A" wg set "$IFA" private-key "$OUT/a.key" listen-port 51820 \
        peer "$pb" allowed-ips 10.200.0.2/32 endpoint 192.168.200.2:51820
    ip -n "$A" addr add 10.200.0.1/24 dev "$IFA"; ip -n "$A" link set "$IFA" mtu 1420 up
    start_impl "$1" "$B" "$IFB"
    ip netns exec "$B" wg set "$IFB" private-key "$OUT/b.key" listen-port 51820 \
        peer "$pa" allowed-ips 10.200.0.1/32 endpoint 192.168.200.1:51820
    ip -n "$B" addr add 10.200.0.2/24 dev "$IFB"; ip -n "$B" link set "$IFB" mtu 1420 up
    ip netns exec "$A" ping -c 3 -i 0.2 -W 2 10.200.0.2 >/dev/null
}

iperf() { # extra-args... -> Gbit/s
    ip netns exec "$B" iperf3 -s -1 -D -p 5201 >/dev/null 2>&1
    sleep 0.3
    ip netns exec "$A" iperf3 -c 10.200.0.2 -p 5201 -t "$SECS" -J "$@" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'
}

declare -A RESULT
IMPLS=(wg-agent wireguard-go boringtun-cli gotatun-cli)
for impl in "${IMPLS[@]}"; do
    echo "== $impl" >&2
    setup "$impl"
    RESULT[$impl,1]=$(iperf)
    RESULT[$impl,r]=$(iperf -R)
    RESULT[$impl,4]=$(iperf -P 4)
    cleanup
done

printf '\n%-14s %12s %12s %12s\n' "Gbit/s" "1 stream" "reverse" "4 streams"
for impl in "${IMPLS[@]}"; do
    printf '%-14s %12s %12s %12s\n' "$impl" "${RESULT[$impl,1]}" "${RESULT[$impl,r]}" "${RESULT[$impl,4]}"
done
printf '\n%-14s %12s %12s %12s\n' "wg-agent / X" "1 stream" "reverse" "4 streams"
for impl in "${IMPLS[@]:1}"; do
    printf '%-14s' "$impl"
    for k in 1 r 4; do
        printf ' %12s' "$(python3 -c "print('%.2fx' % (${RESULT[wg-agent,$k]}/max(${RESULT[$impl,$k]},1e-9)))")"
    done
    echo
done
