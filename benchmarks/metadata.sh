#!/usr/bin/env bash
# Metadata workloads (untar, cold and warm ls -lR, rm -rf) on native and on a takakrypt
# guard point, in one run, with the ratio takakrypt/native for each.  Quicker than
# ../shared/bench/peers.sh and reports what the data path did (FUSE requests by kind
# from the engine's counters).
#   usage: benchmarks/metadata.sh [TAR]      (run as root)
#   TAR       a tar of a directory tree (default: the tree peers.sh uses)
#   PIN=1     pin ls to CPU 0 (shows the cost of cross-CPU wake-ups on a VM)
#   GUARD_ARGS="--no-io-uring"   extra arguments for python -m takakrypt.guard
#   PAUSE=40  seconds between the native run and the guard point's: ext4 skips inodes
#             freed in the last 5-35 s when it allocates new ones (recently_deleted),
#             which would slow the second untar after the first rm -rf
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
ROOT=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
TAR=${1:-$ROOT/tree.tar}
[ -f "$TAR" ] || { echo "metadata.sh: no tar at $TAR (run peers.sh once, or pass one)" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/var/tmp}/tkmeta.XXXXXX")
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
dropc() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
pin() { if [ "${PIN:-0}" = 1 ]; then taskset -c 0 "$@"; else "$@"; fi; }
declare -A T
run() {  # target dir
  local t=$1 d=$2 s
  s=$(now); tar -C "$d" -xf "$TAR"; sync; T[$t.untar]=$(echo "$(now)-$s" | bc)
  dropc; s=$(now); pin ls -lR "$d" >/dev/null; T[$t.lsR]=$(echo "$(now)-$s" | bc)
  s=$(now); pin ls -lR "$d" >/dev/null; T[$t.lsR-warm]=$(echo "$(now)-$s" | bc)
  s=$(now); rm -rf "${d:?}"/*; T[$t.rmrf]=$(echo "$(now)-$s" | bc)
}
mkdir -p "$W/native" "$W/back" "$W/mnt"
run native "$W/native"
sleep "${PAUSE:-40}"
head -c 32 /dev/urandom > "$W/key"
# shellcheck disable=SC2086
setsid "$PY" -m takakrypt.guard --backing "$W/back" --mountpoint "$W/mnt" --key-file "$W/key" \
  --allow-all --stats-file "$W/stats.json" ${GUARD_ARGS:-} > "$W/guard.log" 2>&1 < /dev/null &
gp=$!
for _ in $(seq 200); do mountpoint -q "$W/mnt" && break; sleep 0.05; done
mountpoint -q "$W/mnt" || { cat "$W/guard.log" >&2; exit 1; }
run takakrypt "$W/mnt"
kill "$gp"; wait "$gp" || true
printf '%-10s %10s %10s %8s\n' workload native takakrypt ratio
for w in untar lsR lsR-warm rmrf; do
  printf '%-10s %9.2fs %9.2fs %7.1fx\n' "$w" "${T[native.$w]}" "${T[takakrypt.$w]}" \
    "$(echo "${T[takakrypt.$w]}/${T[native.$w]}" | bc -l)"
done
"$PY" - "$W/stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keep = ("cache_hits", "cache_misses", "ident_hits", "ident_reads", "uring_requests",
        "header_loads", "size_cache_hits")
print("engine:", ", ".join(f"{k}={s[k]}" for k in keep))
print("checks:", ", ".join(f"{k}={v}" for k, v in s["ops"].items() if v))
PY
