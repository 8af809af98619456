#!/usr/bin/env bash
# Where pgbench's CPU goes: PostgreSQL set up as ../shared/bench/peers.sh does it, on
# native ext4 and on a guard point (--allow-all), the same pgbench run on each, and the
# CPU time of the whole machine (/proc/stat) and of the guard point's engine process
# (/proc/PID/stat, all threads) over the run, per transaction.  On this 2-vCPU VM the
# load is nearly CPU-bound: TPS follows the CPU time each transaction costs.
#   usage: benchmarks/pgbench_cpu.sh          (run as root; needs PostgreSQL 15)
#   PGTIME=15  seconds of pgbench per target   ROUNDS=2  rounds (native, guard point)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$PGBIN/initdb" ] || { echo "pgbench_cpu.sh: no PostgreSQL 15 in $PGBIN" >&2; exit 2; }
. "$here/benchmarks/pgsetup.sh"
root=${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}
mkdir -p "$root"
W=$(mktemp -d "$root/tkpgcpu.XXXXXX"); chmod 755 "$W"
trap 'pg_stop "$W/mnt"; pg_stop "$W/native"; fusermount3 -u "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
hz=$(getconf CLK_TCK)

cpu_busy_idle() {  # jiffies: busy idle (idle includes iowait)
  awk '/^cpu /{b=$2+$3+$4+$7+$8+$9; i=$5+$6; print b, i}' /proc/stat
}
proc_cpu() {  # clock ticks of a process, all threads
  awk '{print $14 + $15}' "/proc/$1/stat"
}

one() {  # $1 native|takakrypt
  local t=$1 mnt pid=""
  if [ "$t" = native ]; then
    mnt=$W/native; rm -rf "$mnt"; mkdir -p "$mnt"
  else
    mnt=$W/mnt; rm -rf "$W/back"; mkdir -p "$W/back" "$mnt"
    TAKAKRYPT_BENCH_KEY="$W/key" "$here/benchmarks/takakrypt-mount.sh" "$W/back" "$mnt"
    pid=$(pgrep -f -- "--mountpoint $mnt" | head -1)
  fi
  pg_setup "$mnt" "$W/sock.$t"
  read -r b0 i0 < <(cpu_busy_idle)
  local e0=0 e1=0
  [ -n "$pid" ] && e0=$(proc_cpu "$pid")
  local tps; tps=$(PGTIME=${PGTIME:-15} pg_bench "$W/sock.$t")
  read -r b1 i1 < <(cpu_busy_idle)
  [ -n "$pid" ] && e1=$(proc_cpu "$pid")
  local n; n=$(echo "$tps * ${PGTIME:-15}" | bc -l)
  # jiffies and clock ticks are both USER_HZ
  printf '%-10s %7.0f TPS  busy %5.1f%%  CPU per transaction %6.1f us  engine %6.1f us\n' \
    "$t" "$tps" "$(echo "100 * ($b1 - $b0) / ($b1 - $b0 + $i1 - $i0)" | bc -l)" \
    "$(echo "($b1 - $b0) / $hz / $n * 1000000" | bc -l)" \
    "$(echo "($e1 - $e0) / $hz / $n * 1000000" | bc -l)"
  pg_stop "$mnt"
  [ "$t" = native ] || fusermount3 -u "$mnt"
}

for r in $(seq "${ROUNDS:-2}"); do
  one native
  one takakrypt
done
