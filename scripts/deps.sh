#!/usr/bin/env bash
# Installs the system packages the end-to-end tests, the demo and the benchmarks use:
# fio, FUSE, e2fsprogs, util-linux (losetup, setpriv, nsenter), iproute2. Idempotent.
set -euo pipefail
need=()
for pair in fio:fio fusermount3:fuse3 mkfs.ext4:e2fsprogs losetup:util-linux setpriv:util-linux nsenter:util-linux ip:iproute2; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
# FUSE needs its device node and the loop driver its control node.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
