#!/usr/bin/env bash
# Fuzz campaigns (README "Fuzzing"): installs cargo-fuzz if missing, then runs each target
# for RUNS executions, one at a time, on one job, starting from its committed corpus (new
# corpus entries go to a scratch directory, not into the repository).
#
#   scripts/fuzz.sh [RUNS] [TARGET...]     default: 10000000 runs of every target
#
# Needs a nightly toolchain (`rustup toolchain install nightly`). scripts/test.sh runs it
# only when RINGVM_FUZZ_RUNS is set (a 10^7 campaign takes minutes per target).
#
# Built without a sanitizer by default, as the recorded campaigns were (perf/RESULTS.md): the
# harnesses' memory is guest memory, an mmap that AddressSanitizer does not track, and an
# ASan build runs several times slower. RINGVM_FUZZ_SANITIZER=address builds with ASan.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-10000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(blk_request net_rx_tx pci_config)
sanitizer=${RINGVM_FUZZ_SANITIZER:-none}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -s "$sanitizer"

scratch=$(mktemp -d /tmp/ringvm-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "== $t: $runs runs"
    # -jobs is not used: one process, as the lab's shared cores ask.
    cargo +nightly fuzz run -s "$sanitizer" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -runs="$runs" -print_final_stats=1 2>&1 | grep -E "^#[0-9]+\s+DONE|stat::|SUMMARY|panicked" || {
        echo "$t: the campaign failed (see fuzz/artifacts/$t)" >&2
        exit 1
    }
done
