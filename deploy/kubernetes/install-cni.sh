#!/bin/sh
# meshguard-install-cni: chains meshguard-cni after the cluster's network
# plugin on this node (docs/cni.md). In the image as
# /usr/local/bin/meshguard-install-cni; the agent DaemonSet runs it with the
# host's CNI directories under /host, as `kubectl debug node/NAME` mounts
# the host's root there too.
#
#   meshguard-install-cni install   copy the plugin, add it to the chain (idempotent)
#   meshguard-install-cni watch     install, then again every $INTERVAL seconds
#   meshguard-install-cni remove    take it out of every configuration, delete the binary
#
# The configuration chained into is the one the runtime uses: the first
# .conflist/.conf/.json in the directory by name (containerd and CRI-O load
# that one), or $CNI_CONFLIST. A single-plugin .conf becomes a .conflist of
# the same name, which the runtime then loads instead. Files are replaced
# by rename, so the runtime never reads half of one, and only when their
# contents change.
set -eu

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CNI_NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
CNI_CONFLIST=${CNI_CONFLIST:-}
PLUGIN=${PLUGIN:-/usr/local/bin/meshguard-cni}
# The plugin's keys (docs/cni.md); host paths, where the plugin runs.
AGENT_SOCKET=${AGENT_SOCKET:-/run/meshguard/cni.sock}
ENDPOINTS_DIR=${ENDPOINTS_DIR:-/var/lib/meshguard/endpoints}
INTERVAL=${INTERVAL:-10}
# Byte order, as the runtimes sort file names.
export LC_ALL=C

say() { echo "meshguard-install-cni: $*" >&2; }

# The configuration the runtime uses, or nothing.
active_config() {
    if [ -n "$CNI_CONFLIST" ]; then
        # Also once a .conf of that name has become a .conflist.
        for f in "$CNI_NET_DIR/$CNI_CONFLIST" "$CNI_NET_DIR/${CNI_CONFLIST%.*}.conflist"; do
            [ -f "$f" ] && { echo "$f"; return 0; }
        done
        return 0
    fi
    for f in "$CNI_NET_DIR"/*; do
        case "$f" in
        *.conflist | *.conf | *.json) [ -f "$f" ] && { echo "$f"; return 0; } ;;
        esac
    done
    return 0
}

# Writes stdin to $1 by rename from a temporary file beside it (a name the
# runtime ignores), unless $1 already holds exactly that.
replace() {
    tmp="$(dirname "$1")/.meshguard-install-cni.tmp"
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$1"
}

install_binary() {
    tmp="$CNI_BIN_DIR/.meshguard-cni.tmp"
    cmp -s "$PLUGIN" "$CNI_BIN_DIR/meshguard-cni" && return 0
    # A rename: a runtime running the old binary keeps it (no ETXTBSY).
    cp "$PLUGIN" "$tmp" && chmod 0755 "$tmp" && mv -f "$tmp" "$CNI_BIN_DIR/meshguard-cni" || {
        say "cannot install $CNI_BIN_DIR/meshguard-cni"
        return 1
    }
    say "installed $CNI_BIN_DIR/meshguard-cni"
}

install() {
    install_binary || return 1
    conf=$(active_config)
    if [ -z "$conf" ]; then
        say "no CNI configuration in $CNI_NET_DIR${CNI_CONFLIST:+ named $CNI_CONFLIST} yet: meshguard-cni chains after the cluster's network plugin, which writes it"
        return 1
    fi
    out=$conf
    case "$conf" in *.conf | *.json) out="${conf%.*}.conflist" ;; esac
    # A single plugin becomes a list of one; meshguard-cni goes last (it
    # needs the main plugin's prevResult), replacing any earlier entry.
    # Into a variable first: a file jq cannot read must stay as it is.
    merged=$(jq --arg socket "$AGENT_SOCKET" --arg endpoints "$ENDPOINTS_DIR" '
        (if has("plugins") then . else {cniVersion, name, plugins: [del(.cniVersion, .name)]} end)
        | .plugins = [.plugins[] | select(.type != "meshguard-cni")]
            + [{type: "meshguard-cni", agentSocket: $socket, endpointsDir: $endpoints}]
    ' "$conf") || {
        say "$conf is not a CNI configuration jq can read; left as it is"
        return 1
    }
    if printf '%s\n' "$merged" | replace "$out"; then
        say "chained meshguard-cni into $out"
    fi
    [ "$out" = "$conf" ] || { rm -f "$conf" && say "replaced $conf with $out"; }
}

remove() {
    for f in "$CNI_NET_DIR"/*.conflist; do
        [ -f "$f" ] || continue
        jq -e 'any(.plugins[]?; .type == "meshguard-cni")' "$f" >/dev/null 2>&1 || continue
        kept=$(jq '.plugins = [.plugins[] | select(.type != "meshguard-cni")]' "$f") || continue
        printf '%s\n' "$kept" | replace "$f" && say "took meshguard-cni out of $f"
    done
    rm -f "$CNI_BIN_DIR/meshguard-cni"
}

command -v jq >/dev/null || { say "needs jq"; exit 1; }
case "${1:-}" in
install) install ;;
watch)
    while :; do
        install || true
        sleep "$INTERVAL"
    done
    ;;
remove) remove ;;
*)
    echo "usage: meshguard-install-cni install|watch|remove" >&2
    exit 2
    ;;
esac
