#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Prepares what the tests need on a fresh machine, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Hugepages for the --hugepages 2M test (needs root; the test says so if they are missing).
scripts/setup-hugepages.sh 512 || echo "warning: could not reserve hugepages; the hugepage test will fail" >&2

# Packages the tests use (FUSE for the back-end error test, Chromium for the report test,
# ...); a missing one then fails its test instead of skipping it.
scripts/setup-test-deps.sh
export RINGVM_REQUIRE_FUSE=1
export RINGVM_REQUIRE_CHROMIUM=1

# QEMU 10 before the tests: tests/vhost_user.rs drives ringvm's vhost-user-blk back end from
# it, and must not skip in CI.
if [ "${RINGVM_SKIP_QEMU:-0}" != 1 ]; then
    INSTALL_ONLY=1 perf/qemu-blkbench.sh
    export RINGVM_REQUIRE_QEMU=1
fi

# Lints first: clippy with every warning an error (Cargo.toml denies unsafe blocks without
# a SAFETY comment). Twice: every target (tests and benches see the library with its
# `test-util` helpers), then the library and binary exactly as released (without them).
cargo clippy --release --all-targets -- -D warnings 2>&1
cargo clippy --release -- -D warnings 2>&1

# No module cycle (issue 17): every crate::/super:: path resolved to its module file.
python3 scripts/modcycles.py

# Unit, integration and corpus-replay tests (integration tests boot the embedded guests).
cargo test --release --workspace 2>&1

# Opt-in fuzz campaigns (minutes per target): RINGVM_FUZZ_RUNS=10000000 scripts/test.sh.
if [ -n "${RINGVM_FUZZ_RUNS:-}" ]; then
    scripts/fuzz.sh "$RINGVM_FUZZ_RUNS"
fi

# The same blkbench ELF under QEMU 10, the baseline VMM (perf/qemu-blkbench.sh installs QEMU
# from bookworm-backports when missing): write+verify, then read+verify, and check the JSON;
# polled and with interrupts (blkbench irq=1).
if [ "${RINGVM_SKIP_QEMU:-0}" != 1 ]; then
    img=$(mktemp /var/tmp/ringvm-qemu-ci.XXXXXX.img)
    trap 'rm -f "$img"' EXIT
    truncate -s 64M "$img"
    # Polled, then (irq=1) by MSI-X interrupt on one and two queues.
    for mode in "irq=0 queues=1" "irq=1 queues=1" "irq=1 queues=2"; do
    for rw in randwrite randread; do
        out=$(IMG="$img" KERNEL=target/guests/blkbench perf/qemu-blkbench.sh rw=$rw bs=4k qd=8 ios=2000 size=16m verify=1 $mode)
        python3 - "$rw $mode" "$out" <<'PY'
import json, sys
what, out = sys.argv[1], sys.argv[2]
line = next(l for l in out.splitlines() if l.startswith('{"blkbench":'))
r = json.loads(line)
assert r["ios"] == 2000 and r["errors"] == 0 and r["verify"] == "ok", r
irq = ""
if "irq=1" in what:
    i = r["irq"]
    assert r["params"]["irq"] == 1 and i["interrupts"] > 0, i
    assert i["handler_ns"]["count"] + i["without_interrupt"] == r["ios"], i
    irq = f", interrupts {i['interrupts']}, handler p50 {i['handler_ns']['p50']} ns, wake p50 {i['wake_ns']['p50']} ns"
print(f"qemu blkbench {what}: ios {r['ios']}, errors {r['errors']}, verify {r['verify']}{irq}")
PY
    done
    done
    # Hostile driver (blkbench chaos=1, issue 13 item 4): the same cases under ringvm and
    # QEMU, on a writable and a read-only disk, side by side. ringvm must pass every case
    # (tests/chaos.rs asserts that too); QEMU's answers are reported, not judged.
    for ro in 0 1; do
        truncate -s 0 "$img" && truncate -s 16M "$img"
        rv_out=$(mktemp) qm_out=$(mktemp)
        ro_opt=$([ $ro = 1 ] && echo ,readonly || true)
        target/release/ringvm run --kernel target/guests/blkbench --memory 256M \
            --disk "path=$img$ro_opt" --cmdline chaos=1 >"$rv_out" 2>/dev/null || true
        READONLY=$ro IMG="$img" KERNEL=target/guests/blkbench TIMEOUT=300 \
            perf/qemu-blkbench.sh chaos=1 >"$qm_out" 2>/dev/null || true
        rc=0
        scripts/chaos-compare.py "$rv_out" "$qm_out" "$([ $ro = 1 ] && echo '(read-only disk)' || echo '(writable disk)')" || rc=$?
        rm -f "$rv_out" "$qm_out"
        [ $rc = 0 ] || exit $rc
    done
fi
