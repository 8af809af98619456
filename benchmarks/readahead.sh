#!/usr/bin/env bash
# Cold sequential read of a 1 GiB file through a takakrypt guard point (--allow-all) at
# several kernel readahead sizes, and of the same amount on native ext4 in the same run
# (the reference).  The guard point's default (guard.READ_AHEAD_KB) comes from this.
#   usage: benchmarks/readahead.sh          (run as root)
#   RAS="1024 2048 4096"   readahead sizes to try, KiB, each ROUNDS times, interleaved
#   ROUNDS=3  SIZE_MB=1024
COLD_PREFIX=tkra
. "$(dirname "$0")/coldread.sh"
mkdir -p "$W/native" "$W/back" "$W/mnt"
TAKAKRYPT_BENCH_KEY=$W/key PY=$PY "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$W/mnt"
dd if=/dev/zero of="$W/mnt/big" bs=1M count="$SIZE_MB" conv=fsync status=none
dd if=/dev/zero of="$W/native/big" bs=1M count="$SIZE_MB" conv=fsync status=none
dev=$(mountpoint -d "$W/mnt")
bdi=/sys/class/bdi/$dev/read_ahead_kb
echo "guard point readahead after mount: $(cat "$bdi") KiB"
for r in $(seq "${ROUNDS:-3}"); do
  line="round $r: native $(cold "$W/native/big") MB/s"
  for ra in ${RAS:-1024 2048 4096}; do
    echo "$ra" > "$bdi"
    line="$line  ra=$ra $(cold "$W/mnt/big")"
  done
  echo "$line"
done
