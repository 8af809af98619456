#!/usr/bin/env bash
# rm -rf of a tree: native, and through a takakrypt guard point with the classic FUSE
# channel gated (the default: FORGETs arrive in batches, fuse_uring.c io_read) and not
# gated (TAKAKRYPT_CLASSIC_GATE_US=0: read as they come), in interleaved rounds; prints
# each round, the median per target, the ratios to native, and the engine's forget
# counters.  The tree is written through the guard point once; every round starts from
# a copy of that backing store (cp -a), so only rm -rf is timed.
#   usage: benchmarks/rmrf.sh [TAR]      (run as root)
#   TAR       a tar of a directory tree (default: the tree peers.sh uses)
#   ROUNDS=3  rounds
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
ROOT=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
TAR=${1:-$ROOT/tree.tar}
ROUNDS=${ROUNDS:-3}
[ -f "$TAR" ] || { echo "rmrf.sh: no tar at $TAR (run peers.sh once, or pass one)" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/var/tmp}/tkrmrf.XXXXXX")
gp=
stop_guard() {
  [ -n "$gp" ] || return 0
  kill "$gp" 2>/dev/null || true; wait "$gp" 2>/dev/null || true; gp=
}
trap 'stop_guard; fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
now() { date +%s.%N; }
start_guard() {  # $1: TAKAKRYPT_CLASSIC_GATE_US or "" for the default
  # shellcheck disable=SC2086
  env ${1:+TAKAKRYPT_CLASSIC_GATE_US=$1} setsid "$PY" -m takakrypt.guard --backing "$W/back" \
    --mountpoint "$W/mnt" --key-file "$W/key" --allow-all --stats-file "$W/stats.json" \
    > "$W/guard.log" 2>&1 < /dev/null &
  gp=$!
  for _ in $(seq 200); do mountpoint -q "$W/mnt" && return 0; sleep 0.05; done
  cat "$W/guard.log" >&2; exit 1
}
mkdir -p "$W/back" "$W/mnt" "$W/native"
head -c 32 /dev/urandom > "$W/key"
start_guard ""
tar -C "$W/mnt" -xf "$TAR"
stop_guard
mv "$W/back" "$W/template"
tar -C "$W/native" -xf "$TAR"
mv "$W/native" "$W/ntemplate"
declare -A S
for r in $(seq "$ROUNDS"); do
  cp -a "$W/ntemplate" "$W/native"; sync; sleep 2
  s=$(now); rm -rf "$W/native"; S[native]+="$(echo "$(now)-$s" | bc) "
  for g in gated ungated; do
    cp -a "$W/template" "$W/back"; sync; sleep 2
    if [ $g = gated ]; then start_guard ""; else start_guard 0; fi
    s=$(now); rm -rf "${W:?}/mnt/"*; S[$g]+="$(echo "$(now)-$s" | bc) "
    kill -USR1 "$gp"; sleep 0.5
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); \
print('  $g round $r: forgets', s['forgets'], 'in', s['forget_messages'], 'messages')" "$W/stats.json"
    stop_guard; rm -rf "$W/back"
  done
done
med() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
printf '%-9s %-30s %8s %7s\n' target "rm -rf seconds by round" median ratio
n=$(echo "${S[native]}" | med)
for t in native gated ungated; do
  m=$(echo "${S[$t]}" | med)
  printf '%-9s %-30s %7.2fs %6.2fx\n' "$t" "${S[$t]}" "$m" "$(echo "$m/$n" | bc -l)"
done
