#!/usr/bin/env bash
# Runs every fuzz target (entry points in src/fuzz.rs, binaries in fuzz/) with cargo-fuzz
# on the nightly toolchain, SECONDS each (default 60), and prints per target the runs
# and the CPU seconds they took. Each run starts from the target's corpus (kept in
# fuzz/corpus/, not committed) and its kept crash inputs. A new crash, leak, timeout or
# large allocation is copied to fuzz/regressions/TARGET/, where `cargo test --test
# fuzz_regressions` replays it on stable, and the script fails.
#
#   ./scripts/fuzz.sh [SECONDS]      TANDEM_FUZZ_ONLY=wire_frame,config narrows it
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain here (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
echo "== building the fuzz targets"
(cd fuzz && cargo +nightly fuzz build 2>&1 | grep -E "^error" || true)
targets=$(cd fuzz && cargo +nightly fuzz list)
if [ -n "${TANDEM_FUZZ_ONLY:-}" ]; then
    targets=$(echo "$targets" | grep -xF "$(echo "$TANDEM_FUZZ_ONLY" | tr ',' '\n')" || true)
fi
failed=()
printf '%-16s %12s %10s %12s\n' target runs cpu_s runs_per_s
for t in $targets; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    if [ -d "fuzz/regressions/$t" ]; then
        cp -n fuzz/regressions/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    log=$(mktemp)
    TIMEFORMAT='%U %S'
    rc=0
    cpu=$( { time (cd fuzz && cargo +nightly fuzz run "$t" "../$corpus" -- \
        -max_total_time="$secs" -max_len=65536 -malloc_limit_mb=256 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1) ; } 2>&1 ) || rc=$?
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1 || true)
    [ -n "$runs" ] || runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || echo 0)
    cpu_s=$(echo "$cpu" | tail -1 | awk '{printf "%.1f", $1 + $2}')
    printf '%-16s %12s %10s %12s\n' "$t" "$runs" "$cpu_s" "$(awk -v r="$runs" -v s="$secs" 'BEGIN{printf "%d", r/s}')"
    if [ "$rc" -ne 0 ]; then
        mkdir -p "fuzz/regressions/$t"
        found=0
        for a in fuzz/artifacts/"$t"/*; do
            [ -f "$a" ] || continue
            cp "$a" "fuzz/regressions/$t/"
            echo "   $t: kept $(basename "$a") in fuzz/regressions/$t/" >&2
            found=1
        done
        echo "   $t failed (rc=$rc); last lines of its log:" >&2
        tail -25 "$log" >&2
        [ "$found" = 1 ] || echo "   (no crash input was written)" >&2
        failed+=("$t")
    fi
    rm -f "$log"
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: ${failed[*]} failed; replay with: cargo test --test fuzz_regressions" >&2
    exit 1
fi
echo "fuzz: every target ran ${secs} s without a failure"
