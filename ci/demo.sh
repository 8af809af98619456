#!/usr/bin/env bash
# The Takakrypt demo, on the embedded defaults (local keystore, local audit file, FUSE):
# an existing directory is encrypted in place, guarded by takakryptd, and then
#   - the authorised "database" process reads and writes plaintext,
#   - the backup tool (tar) sees only ciphertext,
#   - nobody, and a root shell that is not in the policy, are denied,
#   - every decision that matters is in the audit trail,
# and the agent stops cleanly, leaving TAKA files at rest.  Needs root and /dev/fuse.
#
# TAKAKRYPT_DEMO_ENGINE=kernel tells the same story on the kernel engine (`engine: kernel`:
# takakryptd mounts takakryptfs in place; the module must be loaded, e.g. in the VM of
# tests/kernel/guest/test_kernel_demo.py).  TAKAKRYPT_DEMO_START_TIMEOUT: how many seconds
# takakryptd may take to become healthy (default 10; minutes under QEMU's TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
T=${TAKAKRYPT:-$here/.venv/bin/takakrypt}
D=${TAKAKRYPTD:-$here/.venv/bin/takakryptd}
engine=${TAKAKRYPT_DEMO_ENGINE:-fuse}
start_timeout=${TAKAKRYPT_DEMO_START_TIMEOUT:-10}
case $engine in
  fuse) fstype=fuse.takakrypt ;;
  kernel) fstype=takakryptfs ;;
  *) echo "DEMO FAILED: TAKAKRYPT_DEMO_ENGINE=$engine: fuse or kernel" >&2; exit 1 ;;
esac
work=$(mktemp -d /tmp/takakrypt-demo.XXXXXX)
chmod 755 "$work"
agent_pid=
cleanup() {
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  fi
  if [ "$engine" = kernel ]; then umount "$work/data" 2>/dev/null || true
  else fusermount3 -u "$work/data" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
fail() { echo "DEMO FAILED: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run as root (FUSE guard points, acting as other users)"
[ "$engine" = fuse ] || [ -d /sys/module/takakryptfs ] ||
  fail "the kernel engine needs the takakryptfs module loaded (insmod kernel/takakryptfs.ko)"
# the file system type mounted at a path ("" when nothing is)
fstype_at() { awk -v p="$1" '$2 == p { t = $3 } END { print t }' /proc/mounts; }

export TAKAKRYPT_KEYSTORE=$work/keystore.json
export TAKAKRYPT_MASTER_KEY_FILE=$work/master.key
export TAKAKRYPT_CONTROL_SOCKET=$work/run/control.sock

bold "1. a directory with data in it, and a key in a new local keystore"
mkdir -p "$work/data" "$work/bin"
printf 'id,name,salary\n1,alice,91000\n2,bob,87000\n' > "$work/data/payroll.csv"
head -c 3000000 /dev/urandom > "$work/data/blob.bin"
chmod 666 "$work/data/"*
# the "database": its own binary, authorised by path AND by SHA-256 signature
cp /usr/bin/dd "$work/bin/demo-db"
sig=$(sha256sum "$work/bin/demo-db" | cut -d' ' -f1)
"$here/.venv/bin/python" -c "from takakrypt.keys import generate_master_key_file as g; g('$work/master.key')"
run "$T" keys create payroll
ls -l "$work/data"

bold "2. initial encryption in place (takakrypt xform): resumable, verified, no plaintext left"
run "$T" xform "$work/data" --key payroll
run "$T" inspect "$work/data/payroll.csv" | sed -n '1,12p'

bold "3. the policy: demo-db gets plaintext, tar gets ciphertext, everyone else EACCES"
cat > "$work/takakrypt.yaml" <<EOF
agent:
  control_socket: $work/run/control.sock
  protocol_socket: $work/run/agent.sock
  pid_file: $work/run/takakryptd.pid
keys:
  backend: local
  local: {path: $work/keystore.json, master_key_file: $work/master.key}
process_sets:
  database: {executables: ["$work/bin/demo-db"], sha256: ["$sig"]}
  backup: {executables: ["/usr/bin/tar", "/bin/tar"]}
policies:
  payroll:
    rules:
      - {process_set: database, actions: [all_ops], effects: [permit, apply_key, audit]}
      - {process_set: backup, actions: [read_ops], effects: [permit, audit]}
      - {actions: [getattr, list], effects: [permit]}
      - {actions: [all_ops], effects: [deny, audit]}
guard_points:
  - {path: $work/data, policy: payroll, key: payroll, engine: $engine}
audit:
  sinks:
    - {type: file, path: $work/audit.jsonl}
    - {type: file, path: $work/audit.cef, format: cef}
EOF
sed -n '/^process_sets/,/^guard_points/p' "$work/takakrypt.yaml"
run "$T" config check "$work/takakrypt.yaml"

bold "4. start takakryptd: it mounts the guard point over the same path ($engine engine)"
"$D" --config "$work/takakrypt.yaml" --foreground 2> "$work/takakryptd.log" &
agent_pid=$!
for _ in $(seq 1 $((start_timeout * 10))); do
  kill -0 "$agent_pid" 2>/dev/null || break
  [ -S "$work/run/control.sock" ] && "$T" status >/dev/null 2>&1 && break; sleep 0.1
done
run "$T" status || fail "agent not healthy: $(cat "$work/takakryptd.log")"
mounted=$(fstype_at "$work/data")
echo "mounted: $work/data type ${mounted:-none}"
[ "$mounted" = "$fstype" ] || fail "the guard point is not a $fstype mount: ${mounted:-none}"

bold "5. the authorised process reads and writes plaintext"
run "$work/bin/demo-db" if="$work/data/payroll.csv" status=none
printf '3,carol,99000\n' | "$work/bin/demo-db" of="$work/data/payroll.csv" oflag=append conv=notrunc status=none
run "$work/bin/demo-db" if="$work/data/payroll.csv" status=none | tail -1

bold "6. the backup tool sees only ciphertext (what it archives is the TAKA file)"
run tar -C "$work/data" -cf "$work/backup.tar" payroll.csv
tar -xOf "$work/backup.tar" payroll.csv | head -c 64 | od -A d -c | head -3
tar -xOf "$work/backup.tar" payroll.csv | grep -q alice && fail "backup saw plaintext"
echo "(no 'alice' in the archive)"
# ... and it is the file as it is now: the key restores carol's row written in step 5
tar -xOf "$work/backup.tar" payroll.csv > "$work/payroll.from-backup"
"$T" decrypt "$work/payroll.from-backup" - | grep -x '3,carol,99000' >/dev/null ||
  fail "the archive is not the current file"
echo "(the key decrypts the archived file, carol's row included)"

bold "7. nobody, and a root shell outside the policy, are denied"
if su -s /bin/sh nobody -c "cat $work/data/payroll.csv" 2>&1; then fail "nobody could read"; fi
if cat "$work/data/payroll.csv" 2>&1; then fail "root cat could read"; fi
echo "(root is not special: the policy decides)"

bold "8. the audit trail (JSON lines; the same events in CEF beside it)"
"$T" audit stats
"$here/.venv/bin/python" - "$work/audit.jsonl" <<'PY'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
shown = [e for e in events if e["kind"] == "access" and e["operation"] not in ("getattr", "list")]
print(f"{len(events)} events; reads, writes and denies:")
for e in shown:
    if True:
        print(f'{e["time"]}  {e["decision"]:<6} {e["operation"]:<8} uid={e["uid"]:<6} '
              f'{e["exe"].rsplit("/", 1)[-1]:<8} {e["path"].rsplit("/", 1)[-1]}')
PY
tail -1 "$work/audit.cef" | cut -c1-160

bold "9. stop the agent cleanly: the guard point is released, files stay encrypted at rest"
kill -TERM "$agent_pid"; wait "$agent_pid"; agent_pid=
[ -z "$(fstype_at "$work/data")" ] || fail "still mounted"
head -c 4 "$work/data/payroll.csv"; echo " <- payroll.csv at rest"
grep -q alice "$work/data/payroll.csv" && fail "plaintext at rest"
run "$T" decrypt "$work/data/payroll.csv" - | tail -2
printf '\ndemo finished OK\n'
