#!/usr/bin/env bash
# Removes what the scripts/net mode scripts created in this network
# namespace: taps, bridges, the ringvm_nat nftables table, and the
# net.ipv4.ip_forward value nat.sh changed (restored).
#
# usage: scripts/net/teardown.sh            everything recorded
#        scripts/net/teardown.sh NAME...    these taps/bridges (and the NAT
#                                           table if it served a named bridge)
# Links that exist but were not recorded are removed when named. Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
STATE=$(state_file)
touch_state=0
[ -e "$STATE" ] && touch_state=1

declare -A want=()
all=1
if [ $# -gt 0 ]; then
    all=0
    for n in "$@"; do check_name "$n"; want[$n]=1; done
fi

forget() {
    [ "$touch_state" = 1 ] || return 0
    grep -vxF "$*" "$STATE" >"$STATE.tmp" || true
    mv "$STATE.tmp" "$STATE"
}

del_link() {
    if link_exists "$1"; then
        ip link del dev "$1"
        say "deleted $1"
    fi
    forget "link $1"
}

nat_removed=0
if [ "$touch_state" = 1 ]; then
    while read -r kind a b; do
        case "$kind" in
            nft)
                if [ "$all" = 1 ] || [ -n "${want[$b]:-}" ]; then
                    if command -v nft >/dev/null && nft list table ip "$a" >/dev/null 2>&1; then
                        nft delete table ip "$a"
                        say "deleted nft table ip $a"
                    fi
                    forget "nft $a $b"
                    nat_removed=1
                fi
                ;;
        esac
    done < <(cat "$STATE")
    if [ "$nat_removed" = 1 ]; then
        while read -r kind a b; do
            if [ "$kind" = sysctl ]; then
                sysctl -qw "$a=$b"
                say "restored $a=$b"
                forget "sysctl $a $b"
            fi
        done < <(cat "$STATE")
    fi
    if [ "$all" = 1 ]; then
        # Taps before bridges: the order they were recorded is bridge first.
        mapfile -t links < <(awk '$1 == "link" { print $2 }' "$STATE" | tac)
        for l in "${links[@]}"; do del_link "$l"; done
    fi
fi
if [ "$all" = 0 ]; then
    for n in "${!want[@]}"; do del_link "$n"; done
fi
if [ "$touch_state" = 1 ] && [ ! -s "$STATE" ]; then
    rm -f "$STATE"
    rmdir "$(dirname "$STATE")" 2>/dev/null || true
fi
say "done"
