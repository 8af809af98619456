# Sourced by the cold sequential-read benchmarks (readahead.sh, seqread.sh): common
# settings, a work directory whose guard points are unmounted on exit, and cold().
#   BENCH_ROOT (default /var/tmp/tkbench)  SIZE_MB=1024  PY (default .venv's python)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
ROOT=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
SIZE_MB=${SIZE_MB:-1024}
mkdir -p "$ROOT"
W=$(mktemp -d "$ROOT/${COLD_PREFIX:-tkcold}.XXXXXX")
cold_cleanup() {
  local m
  for m in "$W"/mnt "$W"/*.mnt; do [ -d "$m" ] && { fusermount3 -u "$m" 2>/dev/null || true; }; done
  rm -rf "$W"
}
trap cold_cleanup EXIT
# cold FILE -> MB/s of one dd bs=1M read after dropping the page cache (as peers.sh)
cold() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  local s e; s=$(date +%s.%N); dd if="$1" of=/dev/null bs=1M status=none; e=$(date +%s.%N)
  echo "$SIZE_MB/($e-$s)" | bc -l | xargs printf %.0f
}
