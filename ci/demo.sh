#!/usr/bin/env bash
# The offline demo: create a key, encrypt a file, inspect it, decrypt it, then flip one
# byte and watch the tamper being caught. Uses a throw-away keystore in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TAKAKRYPT:-$PWD/.venv/bin/takakrypt}
work=$(mktemp -d /tmp/takakrypt-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export TAKAKRYPT_KEYSTORE=$work/keystore.json
head -c 24 /dev/urandom | base64 > "$work/passphrase"; chmod 600 "$work/passphrase"
export TAKAKRYPT_PASSPHRASE_FILE=$work/passphrase
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. create a key in a new local keystore (passphrase-protected, Argon2id)"
run "$T" keys create demo-key
run "$T" keys list
ls -l "$TAKAKRYPT_KEYSTORE"

step "2. encrypt a 20 MiB file"
head -c $((20 * 1024 * 1024)) /dev/urandom > "$work/data.bin"
run "$T" encrypt --key demo-key "$work/data.bin" "$work/data.taka"
ls -l "$work/data.bin" "$work/data.taka"

step "3. inspect the header (no key needed, no key material shown)"
run "$T" inspect "$work/data.taka"

step "4. decrypt and compare"
run "$T" decrypt "$work/data.taka" "$work/data.out"
run cmp "$work/data.bin" "$work/data.out" && echo "round trip: identical"

step "5. rotate the key: old files still decrypt, new files use version 2"
run "$T" keys rotate demo-key
run "$T" decrypt --force "$work/data.taka" "$work/data.out"
run "$T" encrypt --key demo-key "$work/data.bin" "$work/data2.taka"
"$T" inspect --json "$work/data2.taka" | grep key_version

step "6. flip one byte in block 1234 and decrypt again"
off=$((128 + 1234 * (4096 + 28) + 500))
printf '\x5a' | dd of="$work/data.taka" bs=1 seek=$off conv=notrunc status=none
set +e
"$T" decrypt "$work/data.taka" "$work/tampered.out"
rc=$?
set -e
echo "exit status: $rc (5 = authentication failed)"
[ "$rc" -eq 5 ] || { echo "demo FAILED: tamper not caught" >&2; exit 1; }
[ ! -e "$work/tampered.out" ] && echo "no output file was left behind"

step "7. a wrong passphrase is refused"
echo wrong > "$work/wrong"
set +e
"$T" keys list --passphrase-file "$work/wrong"
rc=$?
set -e
echo "exit status: $rc (7 = keystore locked)"
[ "$rc" -eq 7 ] || { echo "demo FAILED: wrong passphrase accepted" >&2; exit 1; }
printf '\ndemo finished OK\n'
