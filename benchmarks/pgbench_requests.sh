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
pgstop() { su postgres -c "$PGBIN/pg_ctl -D $W/mnt/pg -w stop" >/dev/null 2>&1 || true; }
trap 'ev 0; pgstop; fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/back" "$W/mnt"
TAKAKRYPT_BENCH_KEY=$W/key "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$W/mnt"
chmod 777 "$W/mnt"
d=$W/mnt/pg sock=$W/sock
mkdir -p "$d" "$sock"; chown postgres "$d" "$sock"
su postgres -c "$PGBIN/initdb -D $d -A trust" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $d -o '-k $sock -c listen_addresses= -c shared_buffers=128MB' -w -l $sock/pg.log start" >/dev/null
su postgres -c "pgbench -h $sock -i -s 20 postgres" >/dev/null 2>&1
echo 262144 > $T/buffer_size_kb
echo > $T/trace; ev 1
su postgres -c "pgbench -h $sock -c 4 -j 2 -T ${PGTIME:-10} postgres" 2>/dev/null | awk '/^tps/{print "pgbench:", $3, "TPS (traced)"}'
ev 0
awk -f "$here/benchmarks/fuse_trace_summary.awk" $T/trace |
  sort -rn | awk '{printf "%-12s %8d requests  mean %6d us\n", $2, $1, $3}'
