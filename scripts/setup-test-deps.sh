#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, idempotently (scripts/test.sh calls it; CI
# runs as root on a fresh Debian bookworm machine). Each piece is checked first, so a second
# run installs nothing.
set -euo pipefail

apt_install() {
    [ "$(id -u)" = 0 ] || { echo "setup-test-deps: not root, cannot install $*" >&2; return 1; }
    if [ -z "${apt_updated:-}" ]; then
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# tests/backend_errors.rs: a FUSE file system whose bad ranges fail with EIO
# (tests/fixtures/faultyfs.py), written with fusepy over libfuse2.
[ -e /usr/lib/x86_64-linux-gnu/libfuse.so.2 ] || apt_install libfuse2
python3 -c 'import fuse' 2>/dev/null || pip_install fusepy

# tests/report.rs: the HTML latency report opened in headless Chromium (screenshot + DOM).
command -v chromium >/dev/null || apt_install chromium

# tests/api.rs: the /metrics exposition is checked with Prometheus' reference parser.
python3 -c 'import prometheus_client' 2>/dev/null || pip_install prometheus_client
