"""Guest side of tests/test_systemd_unit.py: runs inside a VM whose PID 1 is systemd.

It is started by the kernel command line (``systemd.run=``, i.e. as systemd's
``kernel-command-line.service``, which has no sandboxing of its own and so lives in
PID 1's mount namespace: "the host" as far as the agent's unit is concerned).  For each
variant of packaging/takakryptd.service it installs the unit under /run/systemd/system
with ExecStart pointed at this tree, starts it with systemctl, and looks at the guard
point from outside the service.  Everything observed goes to OUT/result.json; the
assertions are made by the test on the host side.

usage: python systemd_unit_guest.py TREE OUT
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

TREE, OUT = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(TREE / "src"))
sys.path.insert(0, str(TREE / "tests"))

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")
UNIT_DIR = Path("/run/systemd/system")
SECRET = "plaintext that must never reach the disk\n" * 200


def sh(*cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def unit_text(tree_unit: str, config: Path) -> str:
    """The shipped unit with only ExecStart's program and configuration changed to run
    this tree's agent (its options, e.g. --fd-store, stay)."""
    # sys.executable, not its realpath: the venv's site-packages come with the former
    exec_start = (f"ExecStart={sys.executable} -m takakrypt.agent.daemon --config {config}"
                  r"\1" f"\nEnvironment=PYTHONPATH={TREE / 'src'}\n")
    text, n = re.subn(r"^ExecStart=\S+ --config \S+(.*)\n", exec_start, tree_unit, flags=re.M)
    assert n == 1, "the shipped unit must have exactly one ExecStart="
    return text


def make_config(work: Path, engine: str = "fuse") -> tuple[Path, Path]:
    from agent_helpers import base_config, write_config

    cfg = base_config(work)
    gp = work / "guarded"
    gp.mkdir()
    os.chmod(gp, 0o777)
    cfg["agent"]["log_level"] = "info"
    cfg["process_sets"] = {"app": {"executables": [PY]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "gp", "key": "k1", "engine": engine}]
    config = work / "takakrypt.yaml"
    write_config(config, cfg)
    return config, gp


def fuse_mounts(mountinfo: str, path: Path) -> list[str]:
    """Filesystem types of the mounts at PATH in a /proc/PID/mountinfo text."""
    types = []
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] == str(path):
            types.append(fields[sep + 1])
    return types


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return f"<{e}>"


def mount_ids(mountinfo: str, path: Path) -> list[int]:
    return [int(line.split()[0]) for line in mountinfo.splitlines()
            if line.split()[4] == str(path)]


def roundtrip(target: Path, text: str) -> tuple[bool, str]:
    """A permitted process (this interpreter, outside the service) writes and reads back."""
    w = sh(sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2]); "
                     "print(open(sys.argv[1]).read() == sys.argv[2])", str(target), text)
    return w.stdout.strip() == "True", w.stderr[-2000:]


def variant(name: str, tree_unit: str, dropin: str | None, engine: str = "fuse") -> dict:
    work = Path(f"/tmp/takakrypt-unit-{name}")
    work.mkdir(parents=True)
    config, gp = make_config(work, engine)
    (UNIT_DIR / "takakryptd.service").write_text(unit_text(tree_unit, config))
    dropin_dir = UNIT_DIR / "takakryptd.service.d"
    shutil.rmtree(dropin_dir, ignore_errors=True)
    if dropin:
        dropin_dir.mkdir()
        (dropin_dir / "variant.conf").write_text(dropin)
    sh("systemctl", "daemon-reload")
    r: dict = {"name": name}
    start = sh("systemctl", "start", "takakryptd.service")
    r["start_rc"], r["start_err"] = start.returncode, start.stderr
    r["active"] = sh("systemctl", "is-active", "takakryptd.service").stdout.strip()
    pid = int(sh("systemctl", "show", "-P", "MainPID", "takakryptd.service").stdout.strip() or 0)
    r["main_pid"] = pid
    r["pid1_is_systemd"] = read_text("/proc/1/comm").strip() == "systemd"
    if pid:
        r["same_mnt_ns"] = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/1/ns/mnt")
        r["service_sees"] = fuse_mounts(read_text(f"/proc/{pid}/mountinfo"), gp)
    r["pid1_sees"] = fuse_mounts(read_text("/proc/1/mountinfo"), gp)
    r["self_sees"] = fuse_mounts(read_text("/proc/self/mountinfo"), gp)
    target = gp / "secret.txt"
    r["permitted_roundtrip"], r["permitted_err"] = roundtrip(target, SECRET)
    # a denied process: cat is in no process set
    c = sh(CAT, str(target))
    r["denied_rc"], r["denied_err"] = c.returncode, c.stderr.strip()
    r["denied_saw_plaintext"] = "plaintext that must never" in c.stdout
    r["status"] = sh("systemctl", "status", "--no-pager", "-n", "0",
                     "takakryptd.service").stdout[-2000:]
    r["status"] += sh("journalctl", "--no-pager", "-n", "40", "-u",
                      "takakryptd.service").stdout[-4000:]
    if engine == "kernel":
        # systemctl restart: the new takakryptd takes the same mount (not a second one
        # on top) and serves it again
        before = mount_ids(read_text("/proc/self/mountinfo"), gp)
        rs = sh("systemctl", "restart", "takakryptd.service")
        r["restart_rc"], r["restart_err"] = rs.returncode, rs.stderr
        r["mount_ids_before_restart"] = before
        r["mount_ids_after_restart"] = mount_ids(read_text("/proc/self/mountinfo"), gp)
        ok, err = roundtrip(target, SECRET)
        r["read_after_restart"], r["read_after_restart_err"] = ok, err
        r["status"] += sh("journalctl", "--no-pager", "-n", "30", "-u",
                          "takakryptd.service").stdout[-3000:]
    stop = sh("systemctl", "stop", "takakryptd.service")
    r["stop_rc"] = stop.returncode
    # a stop never uncovers the directory: the mount stays, failing (ENOTCONN), until
    # the next start takes it over or an operator releases it (issue 16)
    r["mounted_after_stop"] = bool(fuse_mounts(read_text("/proc/self/mountinfo"), gp))
    try:
        target.read_bytes()
        r["after_stop_errno"] = 0
    except OSError as e:
        r["after_stop_errno"] = e.errno
    if r["mounted_after_stop"]:
        sh("umount", "-l", str(gp))
    # at rest: with the agent gone, the backing file is what the disk holds
    try:
        raw = target.read_bytes()
        r["at_rest_magic"] = raw[:4].decode("latin-1")
        r["at_rest_plaintext"] = b"plaintext that must never" in raw
    except OSError as e:
        r["at_rest_magic"], r["at_rest_plaintext"] = f"<{e}>", None
    return r


def guest_main(run) -> int:
    """The guest side's main: ``run(result)`` fills a dict written to OUT/result.json
    (an exception goes there too, for the host side to report)."""
    OUT.mkdir(parents=True, exist_ok=True)
    r: dict = {}
    try:
        run(r)
    except Exception:  # reported to the host side, which fails the test with it
        r["error"] = traceback.format_exc()
    (OUT / "result.json").write_text(json.dumps(r, indent=1))
    return 0


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"variants": []}
    try:
        sh("modprobe", "fuse")
        tree_unit = (TREE / "packaging" / "takakryptd.service").read_text()
        # the unit as shipped, then a negative control: the same unit with one mount
        # namespace option added must be caught by the very same checks
        for name, dropin in (("shipped", None),
                             ("control-protectsystem", "[Service]\nProtectSystem=full\n")):
            results["variants"].append(variant(name, tree_unit, dropin))
        # the kernel engine under the same unit, when the host side built the module
        ko = OUT / "takakryptfs.ko"
        if ko.exists():
            ins = sh("insmod", str(ko))
            results["insmod"] = [ins.returncode, ins.stderr]
            if ins.returncode == 0:
                results["variants"].append(variant("kernel", tree_unit, None, "kernel"))
    except Exception:  # reported to the host side, which fails the test with it
        results["error"] = traceback.format_exc()
    (OUT / "result.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
