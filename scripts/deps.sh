#!/usr/bin/env bash
# Installs the system packages the end-to-end tests, the demo and the benchmarks use:
# fio, FUSE, e2fsprogs, util-linux (losetup, setpriv, nsenter, runuser), iproute2, and a
# PostgreSQL 15 server with its client tools and pgbench, and systemd-analyze (to verify the
# units). Idempotent.
set -euo pipefail
need=()
for pair in fio:fio fusermount3:fuse3 mkfs.ext4:e2fsprogs losetup:util-linux setpriv:util-linux nsenter:util-linux runuser:util-linux ip:iproute2 psql:postgresql-client-15 pgbench:postgresql-client-15 /usr/lib/postgresql/15/bin/postgres:postgresql-15 /usr/lib/postgresql/15/bin/pg_amcheck:postgresql-15 systemd-analyze:systemd; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # The package's own cluster is not needed: the tests run their own servers.
    mkdir -p /etc/postgresql-common
    [ -e /etc/postgresql-common/createcluster.conf ] || echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf
    apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
# FUSE needs its device node and the loop driver its control node.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
