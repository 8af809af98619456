#!/usr/bin/env bash
# The test suite: unit/property/tamper/CLI tests, the performance gate, then the crypto
# tests again on an ASan/UBSan build of the native code. Run through `make test` (which
# installs first).
#
# Everything runs in one pytest, then the gate, then ASan. The tests that boot a VM
# (marker `vm`: the kernel module's guest suite, and one systemd boot for the shipped
# units and PostgreSQL under systemd; 10-15 minutes each under TCG) run last, one VM at
# a time (tests/conftest.py, "the VM boots"; TAKAKRYPT_VM_EARLY=1 starts both at once
# beside the other tests: not faster on 2 cores). The gate runs after the pytest, with
# no VM left to compete for the CPU.
# With arguments (`bash ci/test.sh tests/test_x.py -k y`) only that pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONHASHSEED=0
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
# the slowest tests are listed at the end of a full run (where the suite's time goes)
SLOWEST=(--durations=30 --durations-min=20)

# bytecode for the tree: with PYTHONDONTWRITEBYTECODE set (as on the CI machines)
# nothing else writes it, and every takakryptd, CLI and guest process would compile the
# modules it imports again (seconds each in the VM tests, under TCG)
"$PY" -m compileall -q -j 0 src tests benchmarks >/dev/null || exit $?

if [ $# -gt 0 ]; then
    exec "${PYTEST[@]}" "$@"
fi

start=$(date +%s)
"${PYTEST[@]}" "${SLOWEST[@]}" tests || exit $?
echo "== tests took $(( $(date +%s) - start )) s"
# the performance gate: instructions, FUSE requests and system calls counted on this
# tree against benchmarks/baseline.json (docs/performance.md, "Performance gate")
"$PY" benchmarks/perf/gate.py || exit $?
PY=$PY bash ci/asan.sh
