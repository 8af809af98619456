#!/usr/bin/env bash
# The price of write-only direct I/O (docs/guard-points.md, "Write-only opens bypass the
# page cache"): a file written with dd (O_WRONLY, 1 MiB writes) and read back at once,
# without dropping caches, on a guard point with it on and with it off
# (TAKAKRYPT_WRONLY_DIRECT=0), interleaved rounds.  With it off the write left the
# plaintext in the page cache; with it on the first read comes from the engine.
#   usage: benchmarks/read_after_write.sh        (run as root)
#   MB=512  file size     ROUNDS=3
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
mkdir -p "$root"
W=$(mktemp -d "$root/tkraw.XXXXXX")
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
MB=${MB:-512}
one() {  # $1 label, $2 environment for the guard
  rm -rf "$W/back" "$W/mnt"; mkdir -p "$W/back" "$W/mnt"
  env $2 TAKAKRYPT_BENCH_KEY="$W/key" "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$W/mnt"
  local s e w r
  s=$(date +%s.%N); dd if=/dev/zero of="$W/mnt/f" bs=1M count="$MB" status=none; e=$(date +%s.%N)
  w=$(echo "$MB / ($e - $s)" | bc)
  s=$(date +%s.%N); dd if="$W/mnt/f" of=/dev/null bs=1M status=none; e=$(date +%s.%N)
  r=$(echo "$MB / ($e - $s)" | bc)
  printf '%-28s write %6d MB/s   read right after %6d MB/s\n' "$1" "$w" "$r"
  fusermount3 -u "$W/mnt"
}
for _ in $(seq "${ROUNDS:-3}"); do
  one "write-only direct (default)" ""
  one "TAKAKRYPT_WRONLY_DIRECT=0" "TAKAKRYPT_WRONLY_DIRECT=0"
done
