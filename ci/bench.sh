#!/usr/bin/env bash
# Run the benchmark suite; results JSON in benchmarks/results/, ratios printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$PY" -m pytest benchmarks --benchmark-only -p no:cacheprovider \
  --benchmark-json="benchmarks/results/crypto-$stamp.json" "$@"
echo "results: benchmarks/results/crypto-$stamp.json"
