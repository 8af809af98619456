#!/usr/bin/env bash
# Cold sequential read of a 1 GiB file (dd bs=1M after dropping caches, as peers.sh
# does) on native ext4, on a takakrypt guard point (--allow-all) and on a second guard
# point with --no-read-helpers, interleaved round by round; then the median of each and
# the ratios.  Shows what the read helpers (fuse_split.c) are worth on this machine.
#   usage: benchmarks/seqread.sh          (run as root)
#   ROUNDS=5  SIZE_MB=1024
COLD_PREFIX=tkseq
. "$(dirname "$0")/coldread.sh"
mkdir -p "$W/native" "$W"/{on,off}.{back,mnt}
TAKAKRYPT_BENCH_KEY=$W/key PY=$PY "$here/benchmarks/takakrypt-mount.sh" "$W/on.back" "$W/on.mnt"
TAKAKRYPT_BENCH_KEY=$W/key PY=$PY TAKAKRYPT_GUARD_EXTRA=--no-read-helpers \
  "$here/benchmarks/takakrypt-mount.sh" "$W/off.back" "$W/off.mnt"
for d in native on.mnt off.mnt; do
  dd if=/dev/zero of="$W/$d/big" bs=1M count="$SIZE_MB" conv=fsync status=none
done
declare -A R=([native]="" [on]="" [off]="")
for r in $(seq "${ROUNDS:-5}"); do
  n=$(cold "$W/native/big"); a=$(cold "$W/on.mnt/big"); b=$(cold "$W/off.mnt/big")
  R[native]+="$n "; R[on]+="$a "; R[off]+="$b "
  echo "round $r: native $n MB/s  takakrypt $a  --no-read-helpers $b"
done
med() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
n=$(med "${R[native]}") a=$(med "${R[on]}") b=$(med "${R[off]}")
echo "median: native $n MB/s  takakrypt $a  --no-read-helpers $b"
printf 'ratios: takakrypt/native %.2f  --no-read-helpers/native %.2f  helpers on/off %.2f\n' \
  "$(bc -l <<<"$a/$n")" "$(bc -l <<<"$b/$n")" "$(bc -l <<<"$a/$b")"
