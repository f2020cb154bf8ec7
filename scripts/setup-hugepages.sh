#!/usr/bin/env bash
# Reserves 2 MiB hugepages for ringvm's --hugepages 2M (default 1024 pages = 2 GiB).
# Usage: scripts/setup-hugepages.sh [PAGES]   (needs root; idempotent: never lowers the pool)
set -euo pipefail
want=${1:-1024}
sys=/sys/kernel/mm/hugepages/hugepages-2048kB
[ -d "$sys" ] || { echo "this kernel has no 2 MiB hugepages ($sys missing)" >&2; exit 1; }
have=$(cat "$sys/nr_hugepages")
if [ "$have" -lt "$want" ]; then
    echo "$want" > "$sys/nr_hugepages" || { echo "cannot reserve hugepages: run as root" >&2; exit 1; }
fi
now=$(cat "$sys/nr_hugepages"); free=$(cat "$sys/free_hugepages")
echo "2M hugepages: $now reserved, $free free"
[ "$now" -ge "$want" ] || { echo "only $now of $want pages could be reserved (fragmented memory?)" >&2; exit 1; }
