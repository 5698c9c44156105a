#!/usr/bin/env bash
# The demo: two Tandem data nodes, each in its own network namespace, mirror a device in
# protocol C. ext4 on the primary; the secondary is killed (SIGKILL) mid-write; writes go
# on; the secondary comes back and resyncs only what changed; the two disks compare
# equal. Run as root. Cleans up everything it made, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

[ "$(id -u)" = 0 ] || { echo "demo: run as root (namespaces, FUSE, loop devices)" >&2; exit 1; }
./scripts/deps.sh
echo "== building (release)"
cargo build --release --quiet --bins
BIN=$ROOT/target/release

DIR=$(mktemp -d /var/tmp/tandem-demo.XXXXXX)
NET=10.213.251
BR=tdemo-br
PIDS=()
cleanup() {
    set +e
    mountpoint -q "$DIR/mnt" && umount "$DIR/mnt"
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for n in alpha beta; do
        for l in $(losetup -j "$DIR/$n/run/fuse-r0/data" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
        umount -l "$DIR/$n/run/fuse-r0" 2>/dev/null
        ip netns del "tdemo-$n" 2>/dev/null
    done
    ip netns del $BR 2>/dev/null
    ip route del blackhole $NET.0/24 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

echo "== two hosts in network namespaces, joined by a bridge"
ip route add blackhole $NET.0/24
ip netns add $BR
ip -n $BR link add br0 type bridge && ip -n $BR link set br0 up
i=0
for n in alpha beta; do
    i=$((i + 1))
    ip netns add "tdemo-$n"
    ip -n $BR link add "v$i" type veth peer name eth0 netns "tdemo-$n"
    ip -n $BR link set "v$i" master br0 up
    ip -n "tdemo-$n" addr add "$NET.$i/24" dev eth0
    ip -n "tdemo-$n" link set eth0 up
    ip -n "tdemo-$n" link set lo up
    mkdir -p "$DIR/$n"
    truncate -s 256M "$DIR/$n/disk.img"
done
head -c 32 /dev/urandom | base64 > "$DIR/secret"
cat > "$DIR/tandem.toml" <<EOF
[global]
secret-file = "$DIR/secret"

[resource.r0]
protocol = "C"

[[resource.r0.node]]
name = "alpha"
address = "$NET.1:7789"
disk = "$DIR/alpha/disk.img"
device = "$DIR/alpha/dev/r0"

[[resource.r0.node]]
name = "beta"
address = "$NET.2:7789"
disk = "$DIR/beta/disk.img"
device = "$DIR/beta/dev/r0"
EOF

ctl() { local n=$1; shift; "$BIN/tandemctl" --config "$DIR/tandem.toml" --node "$n" --socket "$DIR/$n/run/tandemd.sock" "$@"; }
start() {
    local n=$1
    nsenter --net="/run/netns/tdemo-$n" -- "$BIN/tandemd" --config "$DIR/tandem.toml" --node "$n" \
        --run-dir "$DIR/$n/run" >>"$DIR/$n/tandemd.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$n=$!"
    for _ in $(seq 100); do ctl "$n" status >/dev/null 2>&1 && return; sleep 0.1; done
    echo "tandemd on $n did not start:"; cat "$DIR/$n/tandemd.log"; exit 1
}
field() { ctl "$1" status --json | python3 -c "import json,sys; s=json.load(sys.stdin)['resources'][0]; print(eval('s' + sys.argv[1]))" "$2"; }
wait_for() { # node python-expression-on-s description
    for _ in $(seq 600); do
        if ctl "$1" status --json | python3 -c "import json,sys; s=json.load(sys.stdin)['resources'][0]; sys.exit(0 if ($2) else 1)" 2>/dev/null; then return; fi
        sleep 0.1
    done
    echo "timed out waiting for $3"; ctl "$1" status; exit 1
}

echo "== metadata and daemons"
ctl alpha create-md r0
ctl beta create-md r0
start alpha
start beta
wait_for alpha "s['connection'] == 'connected'" "connection"
echo "== promote alpha (a new pair: forced, then a full initial sync)"
ctl alpha promote r0 --force
wait_for beta "s['disk'] == 'uptodate'" "initial sync"
ctl alpha status

echo "== ext4 on /dev/tandem/r0 (here $DIR/alpha/dev/r0), 32 MiB written"
mkfs.ext4 -q -F "$DIR/alpha/dev/r0"
mkdir -p "$DIR/mnt"
mount "$DIR/alpha/dev/r0" "$DIR/mnt"
dd if=/dev/urandom of="$DIR/mnt/before" bs=1M count=32 conv=fsync status=none

echo "== kill -9 the secondary (beta) while writing"
dd if=/dev/urandom of="$DIR/mnt/during" bs=1M count=64 conv=fsync status=none &
DD=$!
sleep 0.2
kill -9 "$PID_beta"
wait "$DD"
wait_for alpha "s['connection'] == 'connecting'" "peer loss"
dd if=/dev/urandom of="$DIR/mnt/after" bs=1M count=16 conv=fsync status=none
sync
ctl alpha status
OOS=$(field alpha "['out_of_sync_bytes']")
echo "   alpha tracks $OOS bytes out of sync while beta is down"

echo "== restart beta: quick resync"
start beta
wait_for beta "s['replication'] == 'established' and s['disk'] == 'uptodate'" "resync"
RESYNCED=$(field beta "['resync']['done_bytes']")
TOTAL=$(field alpha "['out_of_sync_bytes']")
ctl beta status
echo "   resynced $RESYNCED bytes of a $(( $(stat -c %s "$DIR/alpha/disk.img") >> 20 )) MiB disk (a full sync would move all of it)"

echo "== unmount, demote, compare the two backing disks"
umount "$DIR/mnt"
e2fsck -fn "$DIR/alpha/dev/r0" >/dev/null && echo "   e2fsck -fn: clean"
ctl alpha demote r0
DATA=$(ctl alpha show-md r0 | python3 -c "import json,sys; print(json.load(sys.stdin)['data_bytes'])")
if cmp -n "$DATA" "$DIR/alpha/disk.img" "$DIR/beta/disk.img"; then
    echo "   the two disks are identical ($DATA data bytes)"
else
    echo "   DISKS DIFFER"; exit 1
fi
echo "== done; cleaning up"
