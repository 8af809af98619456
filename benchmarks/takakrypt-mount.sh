#!/usr/bin/env bash
# TAKAKRYPT_MOUNT for ../shared/bench/peers.sh: mount a takakrypt guard point over
# BACKING at MOUNTPOINT with an allow-all policy (every process gets plaintext, the
# backing store holds TAKA files) and return once the mount is live.
#   usage: takakrypt-mount.sh BACKING MOUNTPOINT      (unmount: fusermount3 -u MOUNTPOINT)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
back=$1 mnt=$2
key=${TAKAKRYPT_BENCH_KEY:-${TMPDIR:-/tmp}/takakrypt-bench.key}
[ -s "$key" ] || { (umask 077; head -c 32 /dev/urandom > "$key"); }
log=${TMPDIR:-/tmp}/takakrypt-mount.$(basename "$mnt").log
setsid "$PY" -m takakrypt.guard --backing "$back" --mountpoint "$mnt" --key-file "$key" \
  --allow-all --threads "${TAKAKRYPT_THREADS:-4}" ${TAKAKRYPT_GUARD_EXTRA:-} >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 200); do
  if awk -v m="$(realpath "$mnt")" '$2 == m && $3 ~ /^fuse/ {found=1} END {exit !found}' /proc/mounts; then
    exit 0
  fi
  sleep 0.05
done
echo "takakrypt-mount: $mnt did not come up; log:" >&2
cat "$log" >&2
exit 1
