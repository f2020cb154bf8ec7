#!/usr/bin/env bash
# Isolated mode: a bridge with no host address and no uplink, for
# guest-to-guest traffic only (e.g. netbench mode=ping in one guest against
# mode=echo in another). IPv6 is disabled on the bridge and its taps so the
# host sends nothing into it.
#
# usage: scripts/net/isolated.sh [BRIDGE] [TAP...]
#   defaults: rvbr0 rvtap0 rvtap1
#   guests:   ip=10.213.0.2 peer=10.213.0.3 mode=ping / ip=10.213.0.3 peer=10.213.0.2 mode=echo
# Idempotent; scripts/net/teardown.sh removes what it created.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
BRIDGE=${1:-$BRIDGE_DEFAULT}
shift || true
TAPS=("$@")
[ ${#TAPS[@]} -gt 0 ] || TAPS=(rvtap0 rvtap1)

ensure_bridge "$BRIDGE"
sysctl -qw "net.ipv6.conf.$BRIDGE.disable_ipv6=1"
if [ -n "$(ip -o -4 addr show dev "$BRIDGE")" ]; then
    ip -4 addr flush dev "$BRIDGE"
    say "removed the host addresses of $BRIDGE (isolated: the host takes no part)"
fi
for tap in "${TAPS[@]}"; do
    ensure_tap "$tap"
    sysctl -qw "net.ipv6.conf.$tap.disable_ipv6=1"
    enslave "$tap" "$BRIDGE"
done
say "isolated bridge $BRIDGE with ${TAPS[*]}: no host address, no uplink"
