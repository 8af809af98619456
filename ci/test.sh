#!/usr/bin/env bash
# The test suite: unit/property/tamper/CLI tests, the performance gate, then the crypto
# tests again on an ASan/UBSan build of the native code. Run through `make test` (which installs first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONHASHSEED=0
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
# the performance gate: instructions, FUSE requests and system calls counted on this
# tree against benchmarks/baseline.json (docs/performance.md, "Performance gate")
# (skipped when pytest arguments pick a subset)
if [ $# -eq 0 ]; then "$PY" benchmarks/perf/gate.py; fi
PY=$PY bash ci/asan.sh
