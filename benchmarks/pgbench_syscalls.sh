#!/usr/bin/env bash
# pwrite64 and fdatasync as PostgreSQL sees them during pgbench, native and through a
# takakrypt guard point (--allow-all), one after the other with the setup of
# ../shared/bench/peers.sh (initdb, scale 20, 4 clients): per process kind (postgres;
# the guard point's tk-uring workers, whose calls are on the backing files) and call,
# the count and the mean time from entry to exit, from the kernel's syscall tracepoints
# (tracefs; tracing adds a little to each).  For the guard point also: how much of a
# PostgreSQL pwrite64 is spent in FUSE requests (by the requests it waited for), and
# for each WRITE request the time from its send to the worker's pwrite64 of the
# backing file on that CPU (waking the worker, decoding, the policy check, encrypting)
# and from that pwrite's return to the reply.  Shows where a commit's time goes beyond
# the FUSE requests that benchmarks/pgbench_requests.sh counts.
#   usage: benchmarks/pgbench_syscalls.sh        (run as root)
#   PGTIME=10   seconds of pgbench traced per target
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T
[ -d $T/events/syscalls/sys_enter_fdatasync ] || { echo "pgbench_syscalls.sh: no syscall tracepoints" >&2; exit 2; }
ROOT=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
mkdir -p "$ROOT"
W=$(mktemp -d "$ROOT/tkpgs.XXXXXX")
chmod 755 "$W"
EVS="syscalls/sys_enter_fdatasync syscalls/sys_exit_fdatasync syscalls/sys_enter_pwrite64
     syscalls/sys_exit_pwrite64 fuse/fuse_request_send fuse/fuse_request_end"
ev() { for e in $EVS; do echo "$1" > "$T/events/$e/enable"; done; }
. "$here/benchmarks/pgsetup.sh"
cleanup() {
  ev 0; pg_stop "$W/mnt"
  fusermount3 -u "$W/mnt" 2>/dev/null || umount "$W/mnt" 2>/dev/null || true
}
trap 'cleanup; rm -rf "$W"' EXIT
summary() {  # the trace -> "KIND CALL count mean"
  awk '/sys_(fdatasync|pwrite64)/ {
    n = split($1, a, "-"); pid = a[n]; kind = substr($1, 1, length($1) - length(pid) - 1)
    sub(/[0-9]+$/, "", kind)   # tk-uring0 -> tk-uring
    call = ($0 ~ /fdatasync/) ? "fdatasync" : "pwrite64"; t = $4 + 0
    if ($0 ~ /->/) {
      if ((pid call) in s) { k = kind " " call; c[k]++; d[k] += t - s[pid call]; delete s[pid call] }
    } else s[pid call] = t
  }
  END { for (k in c) printf "  %-22s %8d calls  mean %7.1f us\n", k, c[k], d[k] / c[k] * 1e6 }' \
    "$T/trace" | sort
}
fuse_split() {  # the guard point's trace -> pwrite64 by the requests it waited for; WRITE phases
  awk '{ n = split($1, a, "-"); pid = a[n]; cpu = $2; t = $4 + 0 }
  /sys_pwrite64\(/ && $1 ~ /^postgres/ { inpw[pid] = t; fs[pid] = 0; ks[pid] = ""; next }
  /sys_pwrite64 ->/ && $1 ~ /^postgres/ && (pid in inpw) {
    k = ks[pid] == "" ? "(none)" : ks[pid]; pn[k]++; pd[k] += t - inpw[pid]; pf[k] += fs[pid]
    delete inpw[pid]; next }
  /sys_pwrite64\(/ && $1 ~ /^tk-uring/ { if (cpu in pend) { r = pend[cpu]; we[r] = t; wp[pid] = r; delete pend[cpu] } next }
  /sys_pwrite64 ->/ && $1 ~ /^tk-uring/ { if (pid in wp) { wx[wp[pid]] = t; delete wp[pid] } next }
  /fuse_request_send:/ { for (i = 1; i <= NF; i++) if ($i == "req") r = $(i + 1)
    op = substr($0, index($0, "(FUSE_") + 6); sub(/\).*/, "", op)
    st[r] = t; sp[r] = pid; so[r] = op; if (op == "WRITE") pend[cpu] = r; next }
  /fuse_request_end:/ { for (i = 1; i <= NF; i++) if ($i == "req") r = $(i + 1)
    if (!(r in st)) next
    p = sp[r]; if (p in inpw) { fs[p] += t - st[r]; ks[p] = ks[p] (ks[p] == "" ? "" : "+") so[r] }
    if ((r in we) && (r in wx)) { wn++; wa += we[r] - st[r]; wb += wx[r] - we[r]; wc += t - wx[r] }
    delete st[r]; delete we[r]; delete wx[r] }
  END {
    for (k in pn) printf "  postgres pwrite64 waiting for %-22s %6d calls  mean %6.1f us, %6.1f us of it in those requests\n", k, pn[k], pd[k] / pn[k] * 1e6, pf[k] / pn[k] * 1e6
    if (wn) printf "  WRITE requests (%d matched): send -> worker pwrite64 %.1f us, pwrite64 %.1f us, its return -> reply %.1f us\n", wn, wa / wn * 1e6, wb / wn * 1e6, wc / wn * 1e6
  }' "$T/trace" | sort
}
for target in native takakrypt; do
  mkdir -p "$W/back" "$W/mnt"
  if [ $target = takakrypt ]; then
    TAKAKRYPT_BENCH_KEY=$W/key "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$W/mnt"
  else
    mount --bind "$W/back" "$W/mnt"
  fi
  pg_setup "$W/mnt" "$W/sock"
  echo 262144 > $T/buffer_size_kb
  echo > $T/trace; ev 1
  tps=$(pg_bench "$W/sock")
  ev 0
  echo "$target: $tps TPS (traced)"
  summary
  [ $target = native ] || fuse_split
  cleanup
  rm -rf "$W/back" "$W/mnt" "$W/sock"
done
