# Shared by scripts/net/*.sh (sourced, not run). Each mode script creates
# only what is missing, says what it did, and records what it created in a
# state file so teardown.sh can remove exactly that.
#
# State: $RINGVM_NET_STATE, default /run/ringvm-net/<netns name or "default">/created,
# one line per object: "link NAME", "nft TABLE BRIDGE", "sysctl KEY OLD_VALUE".

set -euo pipefail

TAP_DEFAULT=rvtap0
BRIDGE_DEFAULT=rvbr0
HOST_CIDR_DEFAULT=10.213.0.1/24
NAT_TABLE=ringvm_nat

NAME=$(basename "$0" .sh)

say() { echo "$NAME: $*"; }
die() { echo "$NAME: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "needs root (CAP_NET_ADMIN); run it with sudo"
    command -v ip >/dev/null || die "needs iproute2 (apt-get install iproute2)"
}

state_file() {
    local ns
    ns=$(ip netns identify $$ 2>/dev/null || true)
    echo "${RINGVM_NET_STATE:-/run/ringvm-net/${ns:-default}}/created"
}

record() {
    local f
    f=$(state_file)
    mkdir -p "$(dirname "$f")"
    grep -qxF "$*" "$f" 2>/dev/null || echo "$*" >>"$f"
}

# Records "sysctl KEY OLD" the first time only, so a re-run keeps the original value.
record_sysctl() {
    local f key=$1 old
    f=$(state_file)
    grep -q "^sysctl $key " "$f" 2>/dev/null && return 0
    old=$(sysctl -n "$key")
    record "sysctl $key $old"
}

check_name() {
    [ -n "$1" ] && [ "${#1}" -le 15 ] && [[ "$1" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad interface name '$1' (1-15 of A-Z a-z 0-9 _ . -)"
}

check_cidr() {
    [[ "$1" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] || die "bad address '$1' (want a.b.c.d/len)"
}

check_ip() {
    [[ "$1" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] || die "bad address '$1' (want a.b.c.d)"
}

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

# A persistent tap with a vnet header and multiqueue support, as ringvm opens
# it by name. TAP_USER=name lets that user open it without root.
ensure_tap() {
    local tap=$1
    check_name "$tap"
    if link_exists "$tap"; then
        [ -e "/sys/class/net/$tap/tun_flags" ] || die "$tap exists and is not a tun/tap device"
        say "tap $tap exists (tun_flags $(cat "/sys/class/net/$tap/tun_flags"))"
    else
        ip tuntap add dev "$tap" mode tap vnet_hdr multi_queue ${TAP_USER:+user "$TAP_USER"}
        record "link $tap"
        say "created tap $tap (vnet_hdr multi_queue${TAP_USER:+, user $TAP_USER})"
    fi
    ip link set dev "$tap" up
}

ensure_bridge() {
    local br=$1
    check_name "$br"
    if link_exists "$br"; then
        [ -d "/sys/class/net/$br/bridge" ] || die "$br exists and is not a bridge"
        say "bridge $br exists"
    else
        ip link add name "$br" type bridge
        record "link $br"
        say "created bridge $br"
    fi
    ip link set dev "$br" up
}

enslave() {
    local tap=$1 br=$2
    ip link set dev "$tap" master "$br"
    say "$tap is a port of $br"
}
