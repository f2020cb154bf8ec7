#!/usr/bin/env bash
# Bridge mode: the tap is a port of a Linux bridge that carries a host
# address. Guests on the bridge reach the host and each other; nothing is
# forwarded beyond the host (nat.sh adds that).
#
# usage: scripts/net/bridge.sh [TAP] [BRIDGE] [HOST_CIDR]
#   defaults: rvtap0 rvbr0 10.213.0.1/24
#   guest:    ip=10.213.0.2 peer=10.213.0.1 (any free address in the subnet)
# Idempotent; scripts/net/teardown.sh removes what it created.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
TAP=${1:-$TAP_DEFAULT}
BRIDGE=${2:-$BRIDGE_DEFAULT}
HOST_CIDR=${3:-$HOST_CIDR_DEFAULT}
check_cidr "$HOST_CIDR"

ensure_bridge "$BRIDGE"
ensure_tap "$TAP"
enslave "$TAP" "$BRIDGE"
ip addr replace "$HOST_CIDR" dev "$BRIDGE"
say "host address $HOST_CIDR on $BRIDGE"
host_ip=${HOST_CIDR%/*}
say "guest: ip=<free address in $HOST_CIDR> peer=$host_ip"
