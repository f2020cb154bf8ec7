#!/usr/bin/env bash
# Bridge mode: the tap is a port of a Linux bridge that carries a host
# address. Guests on the bridge reach the host and each other; nothing is
# forwarded beyond the host (nat.sh adds that).
#
# usage: scripts/net/bridge.sh [TAP] [BRIDGE] [HOST_CIDR]
#   defaults: rvtap0 rvbr0 10.213.0.1/24
#   guest:    ip=10.213.0.2 peer=10.213.0.1 (any free address in the subnet for ip=)
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
guest_ip=$(python3 -c 'import ipaddress, sys
i = ipaddress.ip_interface(sys.argv[1])
print(next(h for h in i.network.hosts() if h != i.ip))' "$HOST_CIDR")
say "guest: ip=$guest_ip peer=$host_ip (or any free address in $HOST_CIDR)"
