# Sourced by the pgbench scripts: PostgreSQL set up as ../shared/bench/peers.sh does it
# (initdb, shared_buffers 128MB, socket only, pgbench scale 20), in a data directory
# under a mount point.  Needs PGBIN.
#   pg_setup MNT SOCK   initdb in MNT/pg, start the server on SOCK, pgbench -i
#   pg_stop MNT         stop it (quietly, also when it never started)
#   pg_bench SOCK       pgbench -c 4 -j 2 for ${PGTIME:-10} s; prints the TPS
pg_setup() {
  local d=$1/pg sock=$2
  chmod 777 "$1"
  mkdir -p "$d" "$sock"; chown postgres "$d" "$sock"
  su postgres -c "$PGBIN/initdb -D $d -A trust" >/dev/null
  su postgres -c "$PGBIN/pg_ctl -D $d -o '-k $sock -c listen_addresses= -c shared_buffers=128MB' -w -l $sock/pg.log start" >/dev/null
  su postgres -c "pgbench -h $sock -i -s 20 postgres" >/dev/null 2>&1
}
pg_stop() { su postgres -c "$PGBIN/pg_ctl -D $1/pg -w stop" >/dev/null 2>&1 || true; }
pg_bench() {
  su postgres -c "pgbench -h $1 -c 4 -j 2 -T ${PGTIME:-10} postgres" 2>/dev/null |
    awk '/^tps/{print $3; exit}'
}
