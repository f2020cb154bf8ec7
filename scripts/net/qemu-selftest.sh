#!/usr/bin/env bash
# End-to-end check of netbench and the tap scripts under QEMU 10, entirely
# inside a network namespace it creates and removes (no host interface is
# touched, no traffic leaves the namespace):
#   routed:   ping the namespace's kernel (replies, histogram), back to back,
#             peer that does not answer ARP (3), echo ignored (7), UDP flood,
#             bad parameters (5)
#   bridge:   ping through a bridge
#   isolated: guest-to-guest ping against a guest in mode=echo
#
# usage: scripts/net/qemu-selftest.sh      (root, /dev/kvm, QEMU 10; ~2 min)
# Environment: NS=name (default rvselftest), KERNEL= (guest ELF).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NS=${NS:-rvselftest}
export NETNS=$NS TIMEOUT=${TIMEOUT:-120}
[ "$(id -u)" = 0 ] || { echo "qemu-selftest: needs root" >&2; exit 1; }
if [ -z "${KERNEL:-}" ]; then
    (cd "$ROOT/guests" && cargo build --release --offline -q)
fi

cleanup() {
    ip netns exec "$NS" "$HERE/teardown.sh" >/dev/null 2>&1 || true
    ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
fails=0

# run NAME WANT_CODE PYTHON_CHECK netbench-params...: runs netbench, checks the exit code and the JSON.
run() {
    local name=$1 want=$2 check=$3 out rc
    shift 3
    set +e
    out=$("$ROOT/perf/qemu-netbench.sh" "$@" 2>/tmp/qemu-selftest.$$.err)
    rc=$?
    set -e
    if [ "$rc" != "$want" ]; then
        echo "FAIL $name: exit $rc, want $want"; sed 's/^/    /' /tmp/qemu-selftest.$$.err; fails=$((fails + 1)); return
    fi
    if [ -n "$check" ] && ! python3 - "$out" "$check" <<'PY'
import json, sys
r = json.loads(next(l for l in sys.argv[1].splitlines() if l.startswith('{"netbench":1,')))
ok = eval(sys.argv[2], {}, {"r": r})
s = {k: r[k] for k in ("sent", "received", "lost") if k in r}
s["rtt_us_p50"] = r["rtt_ns"]["p50"] / 1000
if "udp" in r: s["pps"] = r["udp"]["pps"]
print(("" if ok else "check failed: ") + json.dumps(s))
sys.exit(0 if ok else 1)
PY
    then
        fails=$((fails + 1)); echo "FAIL $name"; return
    fi
    echo "ok   $name (exit $rc)"
}

G="ip=10.213.0.2 peer=10.213.0.1"
in_ns "$HERE/routed.sh" >/dev/null
run "routed ping" 0 'r["received"] == 50 and r["lost"] == 0 and len(r["hist"]) > 0 and r["rtt_ns"]["min"] > 0' $G count=50
run "routed ping back to back" 0 'r["received"] == 1000 and r["rx"]["bad"] == 0' $G count=1000 interval_us=0 size=1000
run "routed flood" 0 'r["udp"]["packets"] > 0 and r["udp"]["pps"] > 0 and r["device"]["bad_used"] == 0' $G mode=flood runtime=2
run "peer unresolved" 3 '' ip=10.213.0.2 peer=10.213.0.9 count=1
in_ns sysctl -qw net.ipv4.icmp_echo_ignore_all=1
run "all lost" 7 'r["sent"] == 3 and r["lost"] == 3' $G count=3 timeout_ms=100
in_ns sysctl -qw net.ipv4.icmp_echo_ignore_all=0
for bad in size=1473 peer=10.213.0.2 bogus=1; do
    run "bad parameter $bad" 5 '' ip=10.213.0.2 peer=10.213.0.1 "$bad"
done
in_ns "$HERE/teardown.sh" >/dev/null

in_ns "$HERE/bridge.sh" >/dev/null
run "bridge ping" 0 'r["received"] == 20' $G count=20
in_ns "$HERE/teardown.sh" >/dev/null

in_ns "$HERE/isolated.sh" rvbr0 rvtap0 rvtap1 >/dev/null
TAP=rvtap1 MAC=52:54:00:00:00:03 LOG="$ROOT/perf/out/qemu-netbench-echo.log" PIN=0 \
    "$ROOT/perf/qemu-netbench.sh" mode=echo ip=10.213.0.3 count=100 runtime=60 >/tmp/qemu-selftest.$$.echo 2>&1 &
echo_pid=$!
TAP=rvtap0 MAC=52:54:00:00:00:02 PIN=0 \
    run "guest-to-guest ping" 0 'r["received"] == 100' mode=ping ip=10.213.0.2 peer=10.213.0.3 count=100 interval_us=0
if wait "$echo_pid"; then echo "ok   guest-to-guest echo side"; else echo "FAIL guest-to-guest echo side"; fails=$((fails + 1)); fi
rm -f /tmp/qemu-selftest.$$.*

if [ "$fails" -ne 0 ]; then
    echo "qemu-selftest: $fails failed"
    exit 1
fi
echo "qemu-selftest: all passed"
