#!/usr/bin/env bash
# Untar (tar -xf, then sync) of a tree: native ext4, a guard point (--allow-all), and
# the guard point with one engine feature turned off by its A/B knob -- interleaved
# rounds, each on a FRESH ext4 file system (a loop image, no journal like this VM's
# root), medians and ratios.  A fresh file system per run matters: after a large
# delete, ext4 without a journal skips recently freed inodes when it allocates
# (recently_deleted()), which made back-to-back untars on the same disk 2-10x slower
# than the first one and swamped any difference between builds.
#   usage: benchmarks/untar.sh [TAR]        (run as root)
#   ROUNDS=3                   rounds (each: native, guard, guard with the knob off)
#   KNOB=TAKAKRYPT_WRONLY_DIRECT=0   the environment of the third target ("" to skip it)
#   IMG_SIZE=6G                size of the loop image (sparse, in BENCH_ROOT)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
TAR=${1:-$root/tree.tar}
[ -f "$TAR" ] || { echo "untar.sh: no tar at $TAR" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
KNOB=${KNOB-TAKAKRYPT_WRONLY_DIRECT=0}
mkdir -p "$root"
W=$(mktemp -d "$root/tkuntar.XXXXXX")
L=$W/fs IMG=$W/fs.img
cleanup() {
  fusermount3 -u "$L/mnt" 2>/dev/null || true
  umount "$L" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
entries=$(tar -tf "$TAR" | wc -l)

one() {  # $1 name, $2 environment for the guard ("" = none, "-" = native); prints seconds
  mkdir -p "$L"
  rm -f "$IMG"; truncate -s "${IMG_SIZE:-6G}" "$IMG"
  mkfs.ext4 -q -F -O ^has_journal "$IMG"
  mount -o loop "$IMG" "$L"
  mkdir -p "$L/back" "$L/mnt"; sync
  local m=$L/back
  if [ "$2" != - ]; then
    env $2 TAKAKRYPT_BENCH_KEY="$W/key" "$here/benchmarks/takakrypt-mount.sh" "$L/back" "$L/mnt"
    m=$L/mnt
  fi
  local s e
  s=$(date +%s.%N); tar -C "$m" -xf "$TAR"; sync; e=$(date +%s.%N)
  [ "$2" = - ] || fusermount3 -u "$L/mnt"
  for _ in $(seq 100); do umount "$L" 2>/dev/null && break; sleep 0.1; done
  echo "$e - $s" | bc
}

declare -A times
targets=("native|-" "takakrypt|")
[ -n "$KNOB" ] && targets+=("${KNOB%%=*}=${KNOB#*=}|$KNOB")
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    name=${t%%|*} envs=${t#*|}
    v=$(one "$name" "$envs")
    times[$name]="${times[$name]:-} $v"
    printf 'round %d  %-32s %7.2f s\n' "$r" "$name" "$v"
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
nat=$(echo "${times[native]}" | median)
echo "untar of $entries entries, medians of $ROUNDS rounds (fresh ext4 each run):"
for t in "${targets[@]}"; do
  name=${t%%|*}
  m=$(echo "${times[$name]}" | median)
  printf '  %-32s %7.2f s  %5.2fx native\n' "$name" "$m" "$(echo "$m / $nat" | bc -l)"
done
