#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Prepares what the tests need on a fresh machine, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Hugepages for the --hugepages 2M test (needs root; the test says so if they are missing).
scripts/setup-hugepages.sh 512 || echo "warning: could not reserve hugepages; the hugepage test will fail" >&2

# Unit, integration and corpus-replay tests (integration tests boot the embedded guests).
cargo test --release --workspace 2>&1

# blkbench under QEMU 10, the baseline VMM (installs QEMU from bookworm-backports when missing).
if [ -x perf/qemu-blkbench.sh ] && [ "${RINGVM_SKIP_QEMU:-0}" != 1 ]; then
    perf/qemu-blkbench.sh --ci
fi
