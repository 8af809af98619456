#!/usr/bin/env bash
# Run the benchmark suite; results JSON in benchmarks/results/, ratios printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# peers for ../shared/bench/peers.sh (run it with: ci/bench.sh --peers)
if [ "${1:-}" = "--peers" ]; then
  shift
  bash ci/deps.sh gocryptfs securefs bindfs fio bc postgresql-15 postgresql-client-15
  mkdir -p benchmarks/results
  out=benchmarks/results/peers-$(date -u +%Y%m%dT%H%M%SZ).tsv
  TAKAKRYPT_MOUNT=$PWD/benchmarks/takakrypt-mount.sh \
    bash ../shared/bench/peers.sh ${TARGETS:-native bindfs gocryptfs securefs takakrypt} | tee "$out"
  # what the figures were measured on, kept beside them (docs/performance.md)
  "$PY" -m takakrypt.bench.machine "${BENCH_ROOT:-${TMPDIR:-/var/tmp}/tkbench}" > "${out%.tsv}.machine.json"
  "$PY" benchmarks/peers_report.py "$out"
  exit 0
fi
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$PY" -m pytest benchmarks --benchmark-only -p no:cacheprovider \
  --benchmark-json="benchmarks/results/crypto-$stamp.json" "$@"
echo "results: benchmarks/results/crypto-$stamp.json"
