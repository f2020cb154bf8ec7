#!/usr/bin/env bash
# Runs the blkbench guest under QEMU (the baseline VMM) and exits with
# blkbench's own exit code (0 ok, 2 no device, 3 device error, 4 verify
# mismatch, 5 bad parameter, 6 guest panic; 124 timeout, 125 QEMU failed,
# 126 guest ended without using the exit port).
#
# usage: perf/qemu-blkbench.sh [blkbench params...]
#   e.g. perf/qemu-blkbench.sh rw=randread bs=4k qd=32 runtime=10
#
# Environment:
#   IMG=path        disk image (default perf/out/blkbench.img, created sparse)
#   IMG_SIZE=1G     size when creating it
#   NUM_QUEUES=n    virtio-blk num-queues (default: max(queues= param, 1))
#   KERNEL=path     guest ELF (default guests/target/release/blkbench, built if missing)
#   VCPU_CPU=n      host CPU for the vCPU thread   (default 0)
#   IO_CPU=n        host CPU for the iothread      (default 1, or 0 on 1-CPU hosts)
#   PIN=0           do not pin threads
#   CPU=model       QEMU -cpu (default host,+invtsc)
#   TIMEOUT=s       wall-clock limit for QEMU (default 300)
#   TIMEOUT_SIGNAL= signal that ends QEMU at the limit (default TERM; KILL for an abrupt end)
#   QEMU_EXTRA=...  extra QEMU arguments
#   BACKEND=null    QEMU's null-co block driver (IMG_SIZE bytes, no data transfer, no
#                   zeroing) instead of the image: the VMM's own cost, like ringvm's
#                   backend=null
#   LOG=path        full serial log (default perf/out/qemu-blkbench.log)
#   READONLY=1      attach the image read-only (the guest sees VIRTIO_BLK_F_RO)
#   VHOST_SOCK=path the disk is a vhost-user-blk device served by the back end listening
#                   on this socket (`ringvm vhost-user-blk --socket path ...`) instead of
#                   QEMU's own virtio-blk; guest memory is then a shared memfd (IMG and
#                   BACKEND are not used)
#   VHOST_HUGETLB=1 with VHOST_SOCK: back the memfd with 2 MiB hugetlb pages
#   INSTALL_ONLY=1  install QEMU when missing and exit
#
# Pinning: QEMU has no command-line option to pin vCPU or iothread threads,
# so the script asks QMP for their thread ids (query-cpus-fast,
# query-iothreads) and applies taskset to each, as soon as they exist. The
# guest needs ~1 s of firmware before it starts, so pinning lands before the
# measured run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/perf/out"
mkdir -p "$OUT"
IMG=${IMG:-$OUT/blkbench.img}
IMG_SIZE=${IMG_SIZE:-1G}
KERNEL=${KERNEL:-$ROOT/guests/target/release/blkbench}
TIMEOUT=${TIMEOUT:-300}
LOG=${LOG:-$OUT/qemu-blkbench.log}
PARAMS="$*"

install_qemu() {
    # QEMU 10 from bookworm-backports, next to the existing Debian source.
    local mirror suite_file=/etc/apt/sources.list.d/bookworm-backports.sources
    if [ ! -e "$suite_file" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # the first Debian mirror of an active source line (not a comment)
        mirror=$(grep -rhE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                 | grep -oE 'https?://[^ ]*/debian/?([[:space:]]|$)' | grep -v security | head -n1 | tr -d '[:space:]' || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" > "$suite_file"
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports qemu-system-x86
}

command -v qemu-system-x86_64 >/dev/null || install_qemu
[ "${INSTALL_ONLY:-0}" = 1 ] && exit 0
[ -r /dev/kvm ] || { echo "qemu-blkbench: /dev/kvm is not accessible; KVM is required" >&2; exit 125; }
if [ ! -e "$KERNEL" ]; then
    (cd "$ROOT/guests" && cargo build --release)
fi
if [ ! -e "$IMG" ] && [ -z "${VHOST_SOCK:-}" ]; then
    truncate -s "$IMG_SIZE" "$IMG"
fi

# num-queues: enough for the queues= parameter.
queues=$(sed -nE 's/(^|.* )queues=([0-9]+).*/\2/p' <<<"$PARAMS")
NUM_QUEUES=${NUM_QUEUES:-${queues:-1}}
[ "$NUM_QUEUES" -ge 1 ] 2>/dev/null || NUM_QUEUES=1

ncpu=$(nproc)
VCPU_CPU=${VCPU_CPU:-0}
IO_CPU=${IO_CPU:-$(( ncpu > 1 ? 1 : 0 ))}
QMP="ringvm-blkbench-qmp-$$"
# +invtsc: QEMU then publishes the TSC frequency in CPUID 0x40000010 (plain
# "-cpu host" is migratable and drops invtsc, and with it that leaf).
CPU=${CPU:-host,+invtsc}
# tsc_khz= and -arch-capabilities on the nested PVM host
. "$ROOT/perf/pvm-host.sh"

MEM=256M
machine="q35,accel=kvm"
device=""
if [ -n "${VHOST_SOCK:-}" ]; then
    # vhost-user needs guest memory the back end can map: a shared memfd.
    huge=""
    [ "${VHOST_HUGETLB:-0}" = 1 ] && huge=",hugetlb=on,hugetlbsize=2M"
    machine="$machine,memory-backend=mem"
    drive="-object memory-backend-memfd,id=mem,size=$MEM,share=on$huge -chardev socket,id=vu,path=$VHOST_SOCK"
    device="vhost-user-blk-pci,chardev=vu,disable-legacy=on,num-queues=$NUM_QUEUES"
elif [ "${BACKEND:-}" = null ]; then
    drive="-blockdev driver=null-co,node-name=d0,size=$(numfmt --from=iec "$IMG_SIZE"),read-zeroes=off"
else
    drive="-drive if=none,id=d0,file=$IMG,format=raw,aio=io_uring,cache=none"
fi
if [ "${READONLY:-0}" = 1 ]; then
    drive="$drive,readonly=on"
fi
device=${device:-virtio-blk-pci,drive=d0,disable-legacy=on,iothread=io0,num-queues=$NUM_QUEUES}

set +e
timeout --foreground -s "${TIMEOUT_SIGNAL:-TERM}" "$TIMEOUT" qemu-system-x86_64 \
    -machine "$machine" -cpu "$CPU" -m "$MEM" -smp 1 \
    -nographic -no-reboot -nic none \
    -kernel "$KERNEL" -append "$PARAMS" \
    -object iothread,id=io0 \
    $drive \
    -device "$device" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -qmp "unix:$QMP,abstract=on,server=on,wait=off" \
    ${QEMU_EXTRA:-} </dev/null >"$LOG" 2>&1 &
qpid=$!
if [ "${PIN:-1}" != 0 ]; then
    python3 - "@$QMP" "$VCPU_CPU" "$IO_CPU" "$ROOT/perf" <<'PY' >>"$OUT/qemu-blkbench.pin.log" 2>&1 &
import subprocess, sys
sys.path.insert(0, sys.argv[4])
from qmp import Qmp
q = Qmp(sys.argv[1])
vcpu_cpu, io_cpu = sys.argv[2:4]
for c in q.cmd("query-cpus-fast"):
    subprocess.run(["taskset", "-pc", vcpu_cpu, str(c["thread-id"])], check=False)
for t in q.cmd("query-iothreads"):
    subprocess.run(["taskset", "-pc", io_cpu, str(t["thread-id"])], check=False)
PY
fi
wait "$qpid"
status=$?
set -e

# Firmware output may precede the guest's first line on the same line.
tr -d '\r' <"$LOG" | grep -aoE '(blkbench: |bad parameter|device error|verify mismatch|no device|panic|progress: |chaos: |verify_only: ).*' >&2 || true
tr -d '\r' <"$LOG" | grep -aoE '\{"blkbench(_chaos|_verify)?":1,.*' || true
if [ "$status" -eq 124 ]; then
    echo "qemu-blkbench: timed out after ${TIMEOUT}s (log: $LOG)" >&2
    exit 124
elif [ "$status" -eq 1 ] && ! grep -aqE '"blkbench(_chaos|_verify)?":1' "$LOG"; then
    # Status 1 with no result: QEMU itself failed (a bad option), not the guest's exit code 0.
    echo "qemu-blkbench: QEMU failed with status 1 (log: $LOG)" >&2
    tail -n 5 "$LOG" >&2
    exit 125
elif [ $((status & 1)) -eq 1 ]; then
    exit $((status >> 1))
elif [ "$status" -eq 0 ]; then
    echo "qemu-blkbench: guest ended without the exit port (triple fault or reset; log: $LOG)" >&2
    exit 126
else
    echo "qemu-blkbench: QEMU failed with status $status (log: $LOG)" >&2
    tail -n 5 "$LOG" >&2
    exit 125
fi
