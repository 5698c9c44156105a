#!/usr/bin/env bash
# Interim demo (until tandemd lands): builds tandemctl, writes metadata on two backing
# files as both data nodes would, shows it, then replays one simulator seed in which two
# cores replicate, a node crashes, and the pair resyncs: the log shows every
# generation-UUID decision and resync.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tandemctl
dir=$(mktemp -d /tmp/tandem-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s 256M "$dir/alpha.img" "$dir/beta.img"
cat > "$dir/tandem.toml" <<TOML
[resource.pg]
protocol = "C"
[[resource.pg.node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "$dir/alpha.img"
[[resource.pg.node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "$dir/beta.img"
TOML
for n in alpha beta; do
    ./target/release/tandemctl --config "$dir/tandem.toml" --node "$n" create-md pg
done
./target/release/tandemctl --config "$dir/tandem.toml" --node alpha show-md pg
echo "--- simulator replay: TANDEM_SEED=${TANDEM_SEED:-12648430}, protocol C ---"
TANDEM_SEED="${TANDEM_SEED:-12648430}" TANDEM_PROTOCOL=C \
    cargo test --release --test sim simulator_many_seeds_converge -- --nocapture 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' | grep -E '^\[|uuid_compare|resync|crashed|test result'
