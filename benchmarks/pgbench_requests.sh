#!/usr/bin/env bash
# FUSE requests by kind during pgbench on a takakrypt guard point (--allow-all), with
# the same PostgreSQL setup as ../shared/bench/peers.sh (initdb, scale 20, 4 clients),
# counted from the kernel's fuse:fuse_request_send/end tracepoints: per kind the count
# and the mean time from send to reply (tracing adds a little to each).  The pgbench
# request figures in docs/guard-points.md and docs/performance.md come from this.
#   usage: benchmarks/pgbench_requests.sh          (run as root)
#   PGTIME=10   seconds of pgbench traced
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T
[ -d $T/events/fuse ] || { echo "pgbench_requests.sh: no fuse tracepoints in this kernel" >&2; exit 2; }
ROOT=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
mkdir -p "$ROOT"
W=$(mktemp -d "$ROOT/tkpg.XXXXXX")
chmod 755 "$W"
ev() { echo "$1" > $T/events/fuse/fuse_request_send/enable; echo "$1" > $T/events/fuse/fuse_request_end/enable; }
. "$here/benchmarks/pgsetup.sh"
trap 'ev 0; pg_stop "$W/mnt"; fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/back" "$W/mnt"
TAKAKRYPT_BENCH_KEY=$W/key "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$W/mnt"
pg_setup "$W/mnt" "$W/sock"
echo 262144 > $T/buffer_size_kb
echo > $T/trace; ev 1
echo "pgbench: $(pg_bench "$W/sock") TPS (traced)"
ev 0
awk -f "$here/benchmarks/fuse_trace_summary.awk" $T/trace |
  sort -rn | awk '{printf "%-12s %8d requests  mean %6d us\n", $2, $1, $3}'
