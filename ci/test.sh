#!/usr/bin/env bash
# The test suite: unit/property/tamper/CLI tests, then the crypto tests again on an
# ASan/UBSan build of the native code. Run through `make test` (which installs first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONHASHSEED=0
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
PY=$PY bash ci/asan.sh
