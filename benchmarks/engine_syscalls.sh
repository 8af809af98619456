#!/usr/bin/env bash
# The system calls a guard point's engine makes while a tree is untarred through it:
# `strace -c -f` on the engine process (all threads), the tar on a fresh no-journal
# ext4 loop image (as benchmarks/untar.sh).  Counts are what to read: strace slows
# every call down, so its times are not the engine's.  Run it once per build or knob
# to compare, e.g. an older build from a worktree with PYTHONPATH=WORKTREE/src.
#   usage: benchmarks/engine_syscalls.sh [TAR]      (run as root; needs strace)
#   TOP=12        how many system calls to print, most frequent first
#   IMG_SIZE=4G   size of the loop image (sparse, in BENCH_ROOT)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
TAR=${1:-$root/tree.tar}
[ -f "$TAR" ] || { echo "engine_syscalls.sh: no tar at $TAR" >&2; exit 2; }
command -v strace >/dev/null || { echo "engine_syscalls.sh: needs strace" >&2; exit 2; }
mkdir -p "$root"
W=$(mktemp -d "$root/tksys.XXXXXX")
L=$W/fs IMG=$W/fs.img
cleanup() {
  [ -n "${sp:-}" ] && kill -INT "$sp" 2>/dev/null || true
  fusermount3 -u "$L/mnt" 2>/dev/null || true
  for _ in $(seq 100); do umount "$L" 2>/dev/null && break; sleep 0.1; done  # engine exiting
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$L"
truncate -s "${IMG_SIZE:-4G}" "$IMG"
mkfs.ext4 -q -F -O ^has_journal "$IMG"
mount -o loop "$IMG" "$L"
mkdir -p "$L/back" "$L/mnt"
TAKAKRYPT_BENCH_KEY="$W/key" "$here/benchmarks/takakrypt-mount.sh" "$L/back" "$L/mnt"
pid=$(pgrep -f "takakrypt.guard --backing $L/back" | head -1)
strace -c -f -p "$pid" -o "$W/counts" 2>/dev/null & sp=$!
sleep 1  # attached to every thread
tar -C "$L/mnt" -xf "$TAR"
kill -INT "$sp"; wait "$sp" || true; sp=
entries=$(tar -tf "$TAR" | wc -l)
echo "engine system calls during the untar of $entries entries (strace -c -f; counts):"
awk '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {n = $4; e = (NF == 6) ? $5 : 0; print n, e, $NF}' "$W/counts" |
  sort -rn | head -"${TOP:-12}" |
  awk '{printf "  %-18s %9d calls %7d errors\n", $3, $1, $2}'
awk '$NF == "total" {printf "  %-18s %9d calls\n", "total", $4}' "$W/counts"
