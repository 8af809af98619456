#!/usr/bin/env bash
# The test suite: unit/property/tamper/CLI tests, the performance gate, then the crypto
# tests again on an ASan/UBSan build of the native code. Run through `make test` (which
# installs first).
#
# Everything runs in one pytest, then the gate, then ASan. `TAKAKRYPT_TESTS_PARALLEL=1`
# runs the tests that boot a VM (marker `vm`: the kernel module's guest suite, the
# shipped systemd units, PostgreSQL under systemd; about 20 minutes under TCG) in a
# second pytest beside the rest, output shown when both are done: 2-5 minutes shorter on
# 2 cores, but the gate's FUSE request counts (pgbench) can move while a VM competes for
# the CPU, so it is not the default. With arguments (`bash ci/test.sh tests/test_x.py
# -k y`) only that pytest runs.
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

if [ "${TAKAKRYPT_TESTS_PARALLEL:-0}" != 1 ]; then
    "${PYTEST[@]}" "${SLOWEST[@]}" tests || exit $?
    "$PY" benchmarks/perf/gate.py || exit $?
    PY=$PY bash ci/asan.sh
    exit $?
fi

vmlog=$(mktemp /tmp/takakrypt-vm-tests.XXXXXX.log)
start=$(date +%s)
"${PYTEST[@]}" "${SLOWEST[@]}" -m vm tests >"$vmlog" 2>&1 &
vmpid=$!
# a Ctrl-C or a CI timeout ends the VM part too
trap 'kill -INT $vmpid 2>/dev/null; wait $vmpid 2>/dev/null; rm -f "$vmlog"; exit 130' INT TERM

echo "== tests (the VM tests run beside these; their output follows at the end)"
"${PYTEST[@]}" "${SLOWEST[@]}" -m "not vm" tests
rc_main=$?
# the performance gate: instructions, FUSE requests and system calls counted on this
# tree against benchmarks/baseline.json (docs/performance.md, "Performance gate")
echo "== performance gate"
"$PY" benchmarks/perf/gate.py
rc_gate=$?
echo "== ASan/UBSan build"
PY=$PY bash ci/asan.sh
rc_asan=$?

echo "== VM tests (-m vm; started $(( $(date +%s) - start )) s ago)"
wait $vmpid
rc_vm=$?
trap - INT TERM
cat "$vmlog"
rm -f "$vmlog"
echo "== exit codes: tests $rc_main, performance gate $rc_gate, ASan $rc_asan, VM tests $rc_vm"
for rc in $rc_main $rc_gate $rc_asan $rc_vm; do
    [ "$rc" -eq 0 ] || exit "$rc"
done
