#!/bin/bash
# Data-plane throughput: wg-agent against the userspace WireGuard peers,
# side by side in one run, on the same two network namespaces.
#
#   sudo ./bench/dataplane.sh [SECONDS]
#
# For each implementation: two namespaces joined by a veth pair, one
# WireGuard interface in each (configured with the stock `wg` tool), and
# iperf3 through the tunnel: one TCP stream each way, then four parallel
# streams, with ping running beside the single stream (RTT under load).
# Prints Gbit/s, CPU seconds per GB moved (both tunnel processes' own CPU
# time from /proc, the figure that carries from one machine to another),
# the RTT, and each peer's ratio to wg-agent.
# wg-agent runs three ways, to show what each offload contributes:
# wg-agent (TUN TSO + coalescing, UDP GRO), wg-agent-nogro (no UDP GRO),
# wg-agent-plain (neither; UDP GSO and recvmmsg only).
# Peers: wireguard-go (Debian package), boringtun-cli and gotatun-cli
# (`cargo install --locked`, installed here when missing).
# IMPLS="wg-agent gotatun-cli" ./bench/dataplane.sh runs a subset.
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

PIDS=()
start_impl() { # impl netns ifname
    local impl=$1 ns=$2 IF=$3 log="$OUT/$impl-$ns.log"
    # `ip netns exec` execs the program: $! is the implementation's own pid.
    case "$impl" in
        wg-agent) ip netns exec "$ns" "$WG_AGENT" device "$IF" >"$log" 2>&1 & ;;
        wg-agent-nogro) ip netns exec "$ns" "$WG_AGENT" device "$IF" --no-udp-gro >"$log" 2>&1 & ;;
        wg-agent-plain) ip netns exec "$ns" "$WG_AGENT" device "$IF" --no-tun-offload --no-udp-gro >"$log" 2>&1 & ;;
        wireguard-go) ip netns exec "$ns" env LOG_LEVEL=error wireguard-go -f "$IF" >"$log" 2>&1 & ;;
        boringtun-cli) ip netns exec "$ns" boringtun-cli "$IF" --foreground --disable-drop-privileges >"$log" 2>&1 & ;;
        gotatun-cli) ip netns exec "$ns" gotatun "$IF" --foreground --disable-drop-privileges >"$log" 2>&1 & ;;
    esac
    PIDS+=($!)
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
    PIDS=()
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

# Both tunnel processes' CPU time so far, in clock ticks (utime + stime).
cpu_ticks() {
    local t=0 pid f
    for pid in "${PIDS[@]}"; do
        read -ra f <"/proc/$pid/stat"
        # Fields 14 and 15; the name (field 2) has no spaces for these programs.
        t=$((t + f[13] + f[14]))
    done
    echo "$t"
}
TCK=$(getconf CLK_TCK)

iperf() { # extra-args... -> "Gbit/s CPU-s/GB"
    ip netns exec "$B" iperf3 -s -1 -D -p 5201 >/dev/null 2>&1
    sleep 0.3
    local t0 t1 json
    t0=$(cpu_ticks)
    json=$(ip netns exec "$A" iperf3 -c 10.200.0.2 -p 5201 -t "$SECS" -J "$@")
    t1=$(cpu_ticks)
    python3 -c 'import json,sys
d = json.loads(sys.argv[1])["end"]["sum_received"]
cpu = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
print("%.3f %.2f" % (d["bits_per_second"] / 1e9, cpu / max(d["bytes"] / 1e9, 1e-9)))' "$json" "$t0" "$t1" "$TCK"
}

# Average ping RTT in ms over the tunnel while `iperf` runs in the background.
rtt_under_load() {
    local out
    iperf >"$OUT/loaded.txt" &
    local job=$!
    sleep 1
    out=$(ip netns exec "$A" ping -q -c $((SECS * 4 - 8 > 4 ? SECS * 4 - 8 : 4)) -i 0.2 10.200.0.2 | tail -1)
    wait "$job"
    echo "$out" | awk -F/ '{print $5}'
}

declare -A RESULT
read -ra IMPLS <<<"${IMPLS:-wg-agent wg-agent-nogro wg-agent-plain wireguard-go boringtun-cli gotatun-cli}"
for impl in "${IMPLS[@]}"; do
    echo "== $impl" >&2
    setup "$impl"
    RESULT[$impl,idle]=$(ip netns exec "$A" ping -q -c 10 -i 0.2 10.200.0.2 | tail -1 | awk -F/ '{print $5}')
    read -r RESULT[$impl,1] RESULT[$impl,c1] <<<"$(iperf)"
    read -r RESULT[$impl,r] RESULT[$impl,cr] <<<"$(iperf -R)"
    read -r RESULT[$impl,4] RESULT[$impl,c4] <<<"$(iperf -P 4)"
    RESULT[$impl,load]=$(rtt_under_load)
    cleanup
done

printf '\n%-15s %10s %10s %10s   %9s %9s %9s   %8s %8s\n' "" "Gbit/s" "" "" "CPU s/GB" "" "" "RTT ms" ""
printf '%-15s %10s %10s %10s   %9s %9s %9s   %8s %8s\n' "" "1 stream" "reverse" "4 streams" "1 stream" "reverse" "4 streams" "idle" "loaded"
for impl in "${IMPLS[@]}"; do
    printf '%-15s %10s %10s %10s   %9s %9s %9s   %8s %8s\n' "$impl" \
        "${RESULT[$impl,1]}" "${RESULT[$impl,r]}" "${RESULT[$impl,4]}" \
        "${RESULT[$impl,c1]}" "${RESULT[$impl,cr]}" "${RESULT[$impl,c4]}" \
        "${RESULT[$impl,idle]}" "${RESULT[$impl,load]}"
done
if [ -n "${RESULT[wg-agent,1]:-}" ]; then
    printf '\n%-15s %10s %10s %10s   %9s %9s %9s\n' "wg-agent vs X" "1 stream" "reverse" "4 streams" "CPU/GB" "" ""
    for impl in "${IMPLS[@]}"; do
        [ "$impl" = wg-agent ] && continue
        printf '%-15s' "$impl"
        for k in 1 r 4; do
            printf ' %10s' "$(python3 -c "print('%.2fx' % (${RESULT[wg-agent,$k]}/max(${RESULT[$impl,$k]},1e-9)))")"
        done
        printf '  '
        for k in c1 cr c4; do
            # Below 1: wg-agent spends less CPU per GB.
            printf ' %9s' "$(python3 -c "print('%.2fx' % (${RESULT[wg-agent,$k]}/max(${RESULT[$impl,$k]},1e-9)))")"
        done
        echo
    done
fi

# The product path: pod to pod across nodes on the simulated cluster, the
# managed agents (strict, eBPF policy) beside the same pods with encryption
# off. PRODUCT=0 skips it.
if [ "${PRODUCT:-1}" != 0 ]; then
    cargo build --release --locked --workspace --bins >&2
    MESHGUARD_BIN_DIR="$PWD/target/release" SECS="$SECS" cargo bench --locked -p meshguard-tests --bench pod_to_pod
fi
