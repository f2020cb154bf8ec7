#!/usr/bin/env bash
# Routed (point-to-point) mode: a tap with a host address /32 and a /32
# route to the guest's address through it. No bridge, no NAT: the guest
# reaches the host only (enable forwarding yourself to go further).
#
# usage: scripts/net/routed.sh [TAP] [HOST_IP] [GUEST_IP]
#   defaults: rvtap0 10.213.0.1 10.213.0.2
#   guest:    ip=GUEST_IP peer=HOST_IP
# Idempotent; scripts/net/teardown.sh removes what it created.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
TAP=${1:-$TAP_DEFAULT}
HOST_IP=${2:-10.213.0.1}
GUEST_IP=${3:-10.213.0.2}
check_ip "$HOST_IP"
check_ip "$GUEST_IP"
[ "$HOST_IP" != "$GUEST_IP" ] || die "host and guest addresses are the same"

ensure_tap "$TAP"
ip addr replace "$HOST_IP/32" dev "$TAP"
say "host address $HOST_IP/32 on $TAP"
ip route replace "$GUEST_IP/32" dev "$TAP" src "$HOST_IP"
say "route $GUEST_IP/32 via $TAP"
say "guest: ip=$GUEST_IP peer=$HOST_IP"
