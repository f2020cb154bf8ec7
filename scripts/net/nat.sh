#!/usr/bin/env bash
# NAT mode: bridge mode plus masquerading of the bridge's subnet (nftables
# table ringvm_nat) and IPv4 forwarding, so guests can reach beyond the host
# through its uplink. The previous net.ipv4.ip_forward value is restored by
# teardown.sh.
#
# usage: scripts/net/nat.sh [TAP] [BRIDGE] [HOST_CIDR]
#   defaults: rvtap0 rvbr0 10.213.0.1/24
#   guest:    ip=10.213.0.2 peer=10.213.0.1
# Idempotent; scripts/net/teardown.sh removes what it created.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
command -v nft >/dev/null || die "needs nftables (apt-get install nftables)"
TAP=${1:-$TAP_DEFAULT}
BRIDGE=${2:-$BRIDGE_DEFAULT}
HOST_CIDR=${3:-$HOST_CIDR_DEFAULT}
check_cidr "$HOST_CIDR"

"$(dirname "${BASH_SOURCE[0]}")/bridge.sh" "$TAP" "$BRIDGE" "$HOST_CIDR" | sed "s/^bridge:/$NAME:/"
# The network address of HOST_CIDR (python3 is on every lab host; ipcalc is not).
SUBNET=$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_interface(sys.argv[1]).network)' "$HOST_CIDR")

# Declare, delete, re-create in one transaction: idempotent and atomic.
nft -f - <<NFT
table ip $NAT_TABLE {}
delete table ip $NAT_TABLE
table ip $NAT_TABLE {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr $SUBNET ip daddr != $SUBNET masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "$BRIDGE" accept
        oifname "$BRIDGE" ct state established,related accept
    }
}
NFT
record "nft $NAT_TABLE $BRIDGE"
say "nft table ip $NAT_TABLE: masquerade $SUBNET leaving through anything but $BRIDGE"
record_sysctl net.ipv4.ip_forward
sysctl -qw net.ipv4.ip_forward=1
say "net.ipv4.ip_forward=1"
