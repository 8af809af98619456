#!/usr/bin/env bash
# FUSE requests by kind that untar, cold and warm ls -lR and rm -rf of a tree cause on a
# takakrypt guard point (--allow-all), counted from the kernel's fuse:fuse_request_send
# and fuse_request_end tracepoints (tracefs; no eBPF needed): per kind the count and the
# mean time from send to reply in microseconds (tracing adds a little to each).  The
# request counts and latencies quoted in docs/guard-points.md and docs/performance.md
# come from this script.
#   usage: benchmarks/fuse_requests.sh [TAR]      (run as root)
#   GUARD_ARGS="--no-io-uring"   extra arguments for python -m takakrypt.guard
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
TAR=${1:-${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}/tree.tar}
[ -f "$TAR" ] || { echo "fuse_requests.sh: no tar at $TAR" >&2; exit 2; }
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T
[ -d $T/events/fuse ] || { echo "fuse_requests.sh: no fuse tracepoints in this kernel" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/var/tmp}/tkreq.XXXXXX")
trap 'ev 0; fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
echo 262144 > $T/buffer_size_kb  # per CPU: 2 events per request
ev() { echo "$1" > $T/events/fuse/fuse_request_send/enable; echo "$1" > $T/events/fuse/fuse_request_end/enable; }
on() { echo > $T/trace; ev 1; }
off() {  # $1 phase: "KIND count mean-us" for each kind, most frequent first
  ev 0
  printf '%-9s %7d requests: ' "$1" "$(grep -c fuse_request_send: $T/trace || true)"
  awk -f "$here/benchmarks/fuse_trace_summary.awk" $T/trace |
    sort -rn | awk '{printf "%s %s %sus  ", $2, $1, $3}'
  echo
}
mkdir -p "$W/back" "$W/mnt"
head -c 32 /dev/urandom > "$W/key"
# shellcheck disable=SC2086
setsid "$PY" -m takakrypt.guard --backing "$W/back" --mountpoint "$W/mnt" --key-file "$W/key" \
  --allow-all ${GUARD_ARGS:-} > "$W/guard.log" 2>&1 < /dev/null &
gp=$!
for _ in $(seq 200); do mountpoint -q "$W/mnt" && break; sleep 0.05; done
mountpoint -q "$W/mnt" || { cat "$W/guard.log" >&2; exit 1; }
on; tar -C "$W/mnt" -xf "$TAR"; sync; off untar
sync; echo 3 > /proc/sys/vm/drop_caches
on; ls -lR "$W/mnt" > /dev/null; off lsR-cold
on; ls -lR "$W/mnt" > /dev/null; off lsR-warm
on; rm -rf "${W:?}/mnt/"*; off rm-rf
kill "$gp"; wait "$gp" || true
