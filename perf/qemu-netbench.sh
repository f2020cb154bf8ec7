#!/usr/bin/env bash
# Runs the netbench guest under QEMU 10 (the baseline VMM) on a tap device
# and exits with netbench's own exit code (0 ok, 2 no device, 3 device error
# or peer unresolved, 5 bad parameter, 6 guest panic, 7 all pings lost;
# 124 timeout, 125 QEMU failed, 126 guest ended without the exit port).
#
# usage: perf/qemu-netbench.sh [netbench params...]
#   e.g. scripts/net/routed.sh rvtap0 10.213.0.1 10.213.0.2
#        perf/qemu-netbench.sh ip=10.213.0.2 peer=10.213.0.1 mode=ping count=1000 interval_us=0
#        perf/qemu-netbench.sh ip=10.213.0.2 peer=10.213.0.1 mode=flood runtime=5
#
# Environment:
#   TAP=name        tap device (default rvtap0; create it with scripts/net/*.sh)
#   VHOST=on|off    vhost-net back end (default off; needs /dev/vhost-net)
#   NETNS=name      run QEMU inside this network namespace (ip netns exec)
#   MAC=addr        the device's MAC (default QEMU's 52:54:00:12:34:56)
#   RX_QSIZE=n      rx_queue_size (default 256; QEMU allows 256..1024)
#   TX_QSIZE=n      tx_queue_size (default 256; QEMU allows more only for vhost-user/vDPA)
#   KERNEL=path     guest ELF (default guests/target/release/netbench, built if missing)
#   VCPU_CPU=n      host CPU for the vCPU thread                          (default 0)
#   IO_CPU=n        host CPU for QEMU's main loop (virtio-net back end) and the
#                   vhost worker (default 1, or 0 on 1-CPU hosts)
#   PIN=0           do not pin threads
#   CPU=model       QEMU -cpu (default host,+invtsc)
#   TIMEOUT=s       wall-clock limit for QEMU (default 300)
#   QEMU_EXTRA=...  extra QEMU arguments
#   LOG=path        full serial log (default perf/out/qemu-netbench.log)
#
# The taps scripts/net/*.sh create are multi_queue (ringvm opens them that
# way); QEMU opens a tap with IFF_MULTI_QUEUE only when the netdev has
# queues > 1, so for such a tap the netdev gets queues=2 (the device, with
# mq off, uses the first pair; the second tap queue stays idle).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/perf/out"
mkdir -p "$OUT"
TAP=${TAP:-rvtap0}
VHOST=${VHOST:-off}
NETNS=${NETNS:-}
RX_QSIZE=${RX_QSIZE:-256}
TX_QSIZE=${TX_QSIZE:-256}
KERNEL=${KERNEL:-$ROOT/guests/target/release/netbench}
TIMEOUT=${TIMEOUT:-300}
LOG=${LOG:-$OUT/qemu-netbench.log}
PARAMS="$*"

command -v qemu-system-x86_64 >/dev/null || { echo "qemu-netbench: qemu-system-x86_64 not found (perf/qemu-blkbench.sh shows how to install QEMU 10)" >&2; exit 125; }
[ -r /dev/kvm ] || { echo "qemu-netbench: /dev/kvm is not accessible; KVM is required" >&2; exit 125; }
case "$VHOST" in on|off) ;; *) echo "qemu-netbench: VHOST must be on or off" >&2; exit 125 ;; esac
if [ "$VHOST" = on ] && [ ! -e /dev/vhost-net ]; then
    echo "qemu-netbench: VHOST=on needs /dev/vhost-net (modprobe vhost_net)" >&2
    exit 125
fi
if [ ! -e "$KERNEL" ]; then
    (cd "$ROOT/guests" && cargo build --release)
fi

in_ns() {
    if [ -n "$NETNS" ]; then ip netns exec "$NETNS" "$@"; else "$@"; fi
}
flags=$(in_ns cat "/sys/class/net/$TAP/tun_flags" 2>/dev/null) || {
    echo "qemu-netbench: no tap '$TAP'${NETNS:+ in netns $NETNS} (create one with scripts/net/routed.sh or bridge.sh)" >&2
    exit 125
}
queues=1
if [ $(( flags & 0x100 )) -ne 0 ]; then  # IFF_MULTI_QUEUE
    queues=2
fi

ncpu=$(nproc)
VCPU_CPU=${VCPU_CPU:-0}
IO_CPU=${IO_CPU:-$(( ncpu > 1 ? 1 : 0 ))}
# A path socket (not abstract): it must work across network namespaces.
QMP_DIR=$(mktemp -d /tmp/ringvm-netbench-qmp.XXXXXX)
QMP="$QMP_DIR/qmp.sock"
trap 'rm -rf "$QMP_DIR"' EXIT
CPU=${CPU:-host,+invtsc}
# tsc_khz= and -arch-capabilities on the nested PVM host
. "$ROOT/perf/pvm-host.sh"
mac_opt=${MAC:+,mac=$MAC}

set +e
# romfile= : no iPXE option ROM (faster boot, and it cannot send anything on the tap).
in_ns timeout --foreground "$TIMEOUT" qemu-system-x86_64 \
    -machine q35,accel=kvm -cpu "$CPU" -m 256M -smp 1 \
    -nographic -no-reboot -nic none \
    -kernel "$KERNEL" -append "$PARAMS" \
    -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=$VHOST,queues=$queues" \
    -device "virtio-net-pci,netdev=n0,disable-legacy=on,romfile=,rx_queue_size=$RX_QSIZE,tx_queue_size=$TX_QSIZE$mac_opt" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -qmp "unix:$QMP,server=on,wait=off" \
    ${QEMU_EXTRA:-} </dev/null >"$LOG" 2>&1 &
qpid=$!
if [ "${PIN:-1}" != 0 ]; then
    python3 - "$QMP" "$VCPU_CPU" "$IO_CPU" "$ROOT/perf" <<'PY' >"$OUT/qemu-netbench.pin.log" 2>&1 &
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[4])
from qmp import Qmp
q = Qmp(sys.argv[1])
cmd = q.cmd
vcpu_cpu, io_cpu = sys.argv[2:4]
cpus = cmd("query-cpus-fast")
for c in cpus:
    subprocess.run(["taskset", "-pc", vcpu_cpu, str(c["thread-id"])], check=False)
# The main loop runs the virtio-net back end (tx bottom half, tap reads):
# the thread whose id is the process id. vhost workers are kernel threads
# named vhost-<pid>.
pid = None
with open(f"/proc/{cpus[0]['thread-id']}/status") as st:
    for line in st:
        if line.startswith("Tgid:"):
            pid = int(line.split()[1])
subprocess.run(["taskset", "-pc", io_cpu, str(pid)], check=False)
# (Kernels before 6.4: a kernel thread; since: a thread of the QEMU process.)
def vhost_tids():
    dirs = [d for d in os.listdir("/proc") if d.isdigit()]
    dirs += [f"{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task")]
    for d in dirs:
        try:
            if open(f"/proc/{d}/comm").read().strip() == f"vhost-{pid}":
                yield d.rsplit("/", 1)[-1]
        except OSError:
            pass
for _ in range(20):
    tids = set(vhost_tids())
    for t in tids:
        subprocess.run(["taskset", "-pc", io_cpu, t], check=False)
    if tids:
        break
    time.sleep(0.1)
PY
fi
wait "$qpid"
status=$?
set -e

# Firmware output may precede the guest's first line on the same line.
tr -d '\r' <"$LOG" | grep -aoE '(netbench: |bad parameter|device error|no device|panic).*' >&2 || true
json=$(tr -d '\r' <"$LOG" | grep -aoE '\{"netbench":1,.*' || true)
[ -z "$json" ] || echo "$json"
if [ "$status" -eq 124 ]; then
    echo "qemu-netbench: timed out after ${TIMEOUT}s (log: $LOG)" >&2
    exit 124
elif [ "$status" -eq 1 ] && [ -z "$json" ]; then
    # Guest code 0 is status 1, but netbench always reports before it: this is QEMU's own failure.
    echo "qemu-netbench: QEMU failed with status 1 (log: $LOG)" >&2
    tail -n 5 "$LOG" >&2
    exit 125
elif [ $((status & 1)) -eq 1 ]; then
    exit $((status >> 1))
elif [ "$status" -eq 0 ]; then
    echo "qemu-netbench: guest ended without the exit port (triple fault or reset; log: $LOG)" >&2
    exit 126
else
    echo "qemu-netbench: QEMU failed with status $status (log: $LOG)" >&2
    tail -n 5 "$LOG" >&2
    exit 125
fi
