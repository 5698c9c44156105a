#!/usr/bin/env bash
# Runs every test: core tables and codecs, config, the CLI against real files, the
# deterministic simulator (TANDEM_SIM_SEEDS seeds per protocol, default 300; with a
# witness TANDEM_SIM_WITNESS_SEEDS, default 3000; each run adds a third as many seeds of
# its own; scripts/sim-long.sh runs seeds for hours), and the
# end-to-end tests with real daemons in network namespaces (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export TANDEM_SIM_SEEDS="${TANDEM_SIM_SEEDS:-300}"
export TANDEM_SIM_WITNESS_SEEDS="${TANDEM_SIM_WITNESS_SEEDS:-3000}"
cargo test --all-targets -- --test-threads=2
