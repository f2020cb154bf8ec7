#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Prepares what the tests need on a fresh machine, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Hugepages for the --hugepages 2M test (needs root; the test says so if they are missing).
scripts/setup-hugepages.sh 512 || echo "warning: could not reserve hugepages; the hugepage test will fail" >&2

# Unit, integration and corpus-replay tests (integration tests boot the embedded guests).
cargo test --release --workspace 2>&1

# Opt-in fuzz campaigns (minutes per target): RINGVM_FUZZ_RUNS=10000000 scripts/test.sh.
if [ -n "${RINGVM_FUZZ_RUNS:-}" ]; then
    scripts/fuzz.sh "$RINGVM_FUZZ_RUNS"
fi

# The same blkbench ELF under QEMU 10, the baseline VMM (perf/qemu-blkbench.sh installs QEMU
# from bookworm-backports when missing): write+verify, then read+verify, and check the JSON.
if [ "${RINGVM_SKIP_QEMU:-0}" != 1 ]; then
    img=$(mktemp /var/tmp/ringvm-qemu-ci.XXXXXX.img)
    trap 'rm -f "$img"' EXIT
    truncate -s 64M "$img"
    for rw in randwrite randread; do
        out=$(IMG="$img" KERNEL=target/guests/blkbench perf/qemu-blkbench.sh rw=$rw bs=4k qd=8 ios=2000 size=16m verify=1)
        python3 - "$rw" "$out" <<'PY'
import json, sys
rw, out = sys.argv[1], sys.argv[2]
line = next(l for l in out.splitlines() if l.startswith('{"blkbench":'))
r = json.loads(line)
assert r["ios"] == 2000 and r["errors"] == 0 and r["verify"] == "ok", r
print(f"qemu blkbench {rw}: ios {r['ios']}, errors {r['errors']}, verify {r['verify']}")
PY
    done
fi
