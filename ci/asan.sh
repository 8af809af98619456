#!/usr/bin/env bash
# Run the native tests against an ASan+UBSan build of the extensions
# (takakrypt._aesgcm: tests/test_native_aesgcm.py, takakrypt._cache: tests/test_native_cache.py,
# takakrypt._ring: tests/test_native_ring.py, takakrypt._fuse: tests/test_fuse*.py (the
# mount server child inherits LD_PRELOAD; fuse_helpers fails a test whose server log holds a
# sanitizer report), TAKA v2 blocks: tests/test_format_v2.py; stress sizes scaled down
# under the sanitizers).  The guard point
# tests run on FUSE over io_uring, then test_fuse.py, test_fuse_direct.py and
# test_fuse_split.py again on the classic /dev/fuse channel (TAKAKRYPT_TEST_IO_URING=0);
# the model, bounds and raw-race tests run both channels themselves.
#
# The sanitized extensions are built in a throw-away copy of the tree, so the normal
# in-place / installed build is never touched.  Exits non-zero on a build failure,
# a test failure or any sanitizer report.
#
#   PY=.venv/bin/python bash ci/asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
case "$PY" in /*) ;; */*) PY=$ROOT/$PY ;; esac # make relative paths absolute
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "asan.sh: python '$PY' not found (set PY=/path/to/python)" >&2
    exit 2
fi

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "asan.sh: libasan.so not found (Debian: apt-get install gcc)" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/takakrypt-asan.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Copy only what the build and the test need; drop any prebuilt extension.
cp -r src tests kernel setup.py pyproject.toml "$WORK"/
[ -e README.md ] && cp README.md "$WORK"/
find "$WORK" \( -name '*.so' -o -name '__pycache__' -o -name '.pytest_cache' \) -prune -exec rm -rf {} +
rm -f "$WORK/src/_native/aesgcm.c" "$WORK/src/_native/cache.c" "$WORK/src/_native/ring.c"

echo "asan.sh: building sanitized extensions in $WORK"
if ! (cd "$WORK" && TAKAKRYPT_SANITIZE=1 "$PY" setup.py build_ext --inplace) >"$WORK/build.log" 2>&1; then
    cat "$WORK/build.log" >&2
    echo "asan.sh: build failed" >&2
    exit 1
fi
for MOD in _aesgcm _cache _ring; do
    SO=$(find "$WORK/src/takakrypt" -maxdepth 1 -name "$MOD*.so")
    LDD=$(ldd "$SO" 2>&1 || true) # captured first: grep -q on a pipe + pipefail = SIGPIPE races
    if [ -z "$SO" ] || [[ "$LDD" != *libasan* ]] || [[ "$LDD" != *libubsan* ]]; then
        echo "asan.sh: $MOD ($SO) is not linked against libasan/libubsan" >&2
        exit 1
    fi
done

export PYTHONPATH="$WORK/src"
export PYTHONMALLOC=malloc # let ASan see every Python allocation (bytes we fill)
export ASAN_OPTIONS=detect_leaks=0 # leaks from CPython itself are noise
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONDONTWRITEBYTECODE=1

# The sanitized modules, not the normal build, must be the ones imported.
LD_PRELOAD="$LIBASAN" "$PY" -c "
import sys, takakrypt._aesgcm as m, takakrypt._cache as c, takakrypt._ring as r
for mod in (m, c, r):
    assert mod.__file__.startswith(sys.argv[1]), mod.__file__
print('asan.sh: testing', m.__file__, 'engines', m.engines())
print('asan.sh: testing', c.__file__)
print('asan.sh: testing', r.__file__)
" "$WORK/src/"

set +e
(cd "$WORK" && LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider \
    --capture=sys tests/test_native_aesgcm.py tests/test_native_cache.py \
    tests/test_native_ring.py tests/test_fuse.py tests/test_fuse_model.py tests/test_fuse_ring.py \
    tests/test_fuse_cache.py tests/test_fuse_split.py tests/test_fuse_forget.py tests/test_fuse_mgtime.py tests/test_fuse_direct.py tests/test_fuse_bounds.py tests/test_fuse_raw_race.py tests/test_fuse_capability.py tests/test_fuse_rekey.py \
    tests/test_fuse_format_v2.py tests/test_format_v2.py \
    tests/test_crash_replay.py tests/test_format_rules.py tests/test_secmem.py "$@") 2>&1 \
    | tee "$WORK/test.log"
# --capture=sys: pytest's default fd-level capture would swallow the report written
# to fd 2 by a sanitizer that then aborts the process.
rc=${PIPESTATUS[0]}
# the data-path suite once more on the classic /dev/fuse channel, whose reply buffers
# are exactly as large as a request asks (io_uring's 1 MiB payloads hid an overflow)
if [ "$rc" -eq 0 ] && [ $# -eq 0 ]; then
    (cd "$WORK" && TAKAKRYPT_TEST_IO_URING=0 LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q \
        -p no:cacheprovider --capture=sys tests/test_fuse.py tests/test_fuse_direct.py \
        tests/test_fuse_split.py) 2>&1 | tee -a "$WORK/test.log"
    rc=${PIPESTATUS[0]}
fi
set -e

if grep -Eq "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|UndefinedBehaviorSanitizer" "$WORK/test.log"; then
    echo "asan.sh: sanitizer report found" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "asan.sh: tests failed (exit $rc)" >&2
    exit "$rc"
fi
echo "asan.sh: OK (no sanitizer reports)"
