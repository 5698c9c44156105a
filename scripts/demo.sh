#!/usr/bin/env bash
# The demo: two Tandem data nodes and a witness, each in its own network namespace.
# PostgreSQL 15 runs on ext4 on the replicated device (protocol C), started by the
# promoter; a client commits numbered rows; the primary node is killed (every process,
# SIGKILL); the survivor is promoted through the witness, recovers PostgreSQL and serves;
# the old node comes back and resyncs. It prints the time until the survivor committed
# again, the acknowledged rows lost (0) and the bytes resynced, and removes everything
# it made (processes, namespaces, mounts, loop devices), also on failure.
#
# It runs the `demo` scenario of tests/e2e_postgres.rs, which shares the end-to-end
# harness (tests/common/) with the tests. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (namespaces, FUSE, loop devices)" >&2; exit 1; }
./scripts/deps.sh
echo "== building (release profile for tests; first build takes a few minutes)"
cargo test --release --test e2e_postgres --no-run --quiet 2>/dev/null || cargo test --release --test e2e_postgres --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --release --quiet --test e2e_postgres demo -- --ignored --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
grep -E '^== ' "$log" || true
if [ "$rc" -ne 0 ]; then
    echo "demo: FAILED; the last lines of its output:" >&2
    tail -40 "$log" >&2
    exit 1
fi
