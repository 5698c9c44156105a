#!/usr/bin/env bash
# Runs every test: core tables and codecs, config, the CLI against real files, and the
# deterministic simulator (TANDEM_SIM_SEEDS seeds per protocol, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
export TANDEM_SIM_SEEDS="${TANDEM_SIM_SEEDS:-300}"
cargo test --all-targets -- --test-threads=2
