#!/usr/bin/env bash
# The simulator's long mode: seeds for hours, from a base of your choice, each seed in
# every protocol with its own fault mix. A failing seed prints its replay line
# (TANDEM_SEED=... TANDEM_PROTOCOL=...).
#   scripts/sim-long.sh [SEEDS] [BASE]     (default 1,000,000 seeds from a time-based base)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-1000000}"
base="${2:-$(( $(date +%s) % 1000000000 + 2000000000 ))}"
echo "simulator: $seeds seeds per protocol from $base (with the witness, then without)"
TANDEM_SIM_BASE="$base" TANDEM_SIM_EXPLORE=0 TANDEM_SIM_WITNESS_SEEDS="$seeds" TANDEM_SIM_SEEDS="$seeds" \
  cargo test --test sim -- --test-threads=2 simulator_with_witness_never_two_writers simulator_many_seeds_converge
