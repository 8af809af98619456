"""takakryptfs deciding by takakryptd (issue 19): every open, stat, listing, create,
rename ... of a decide=agent mount is a POLICY_CHECK (or a hit of the module's decision
cache), and the answer picks the open's view: plaintext for the application, the stored
TAKA bytes for the backup tool (by read, mmap, sendfile, copy_file_range; tar back up
and restore), EACCES for everyone else.

Set-up (inside the VM): a tmpfs holds the lower directory; takakryptd's
guard point 1 (a FUSE guard point elsewhere, whose policy and key the kernel mount uses:
the paths are relative to each mount) has the policy below; the kernel mount is
``key=k1,gp=1`` (decide=agent is the default)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

import genl_raw as R
import taka_kernel
from agent_helpers import Daemon, base_config
from tkfs_env import kmount, kumount, sh

PY = os.path.realpath(sys.executable)
TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")
NOBODY = 65534
TTL = 3.0   # the agent's decision cache TTL here: what the module may keep an answer for


def _copy_python(d: Path) -> str:
    """A copy of the python binary at another path (same bytes, same SHA-256)."""
    d.mkdir(parents=True, exist_ok=True)
    dst = d / "python3"
    shutil.copy2(PY, dst)
    os.chmod(dst, 0o755)
    return str(dst)


class PEnv:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ext = base / "ext"
        self.lower = self.ext / "lower"
        self.kmnt = base / "kmnt"
        self.rawpy = _copy_python(base / "backupbin")     # in the backup set: raw view
        self.other = _copy_python(base / "otherbin")      # in no set: denied
        self.link = base / "linkbin" / "python3"          # a symlink to the app's binary
        self.link.parent.mkdir()
        self.link.symlink_to(PY)
        self.agent: Daemon | None = None
        self.cfg: dict = {}

    def run(self, exe: str, code: str, *args: str, check: bool = False,
            stdin: bytes = b"") -> subprocess.CompletedProcess:
        r = subprocess.run([exe, "-S", "-c", code, *map(str, args)], capture_output=True,
                           timeout=120, cwd="/", input=stdin)
        if check and r.returncode:
            raise AssertionError(f"{exe} {code[:60]!r}: exit {r.returncode}: {r.stderr!r}")
        return r

    def app_write(self, name: str, data: bytes) -> None:
        self.run(PY, "import os, sys\nwith open(sys.argv[1], 'wb') as f:\n"
                 " f.write(sys.stdin.buffer.read()); f.flush(); os.fsync(f.fileno())",
                 self.kmnt / name, check=True, stdin=data)

    def read_as(self, exe: str, name: str) -> bytes | int:
        """The bytes exe (a python) reads through the mount, or the errno of its failure."""
        r = self.run(exe, "import sys\ntry:\n sys.stdout.write(open(sys.argv[1], 'rb')"
                     ".read().hex())\nexcept OSError as e:\n sys.stdout.write('E%d' % e.errno)",
                     self.kmnt / name, check=True)
        out = r.stdout.decode()
        return int(out[1:]) if out.startswith("E") else bytes.fromhex(out)

    def audit(self) -> list[dict]:
        p = self.base / "audit.jsonl"
        if not p.exists():
            return []
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _policy(env: PEnv) -> dict:
    return {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"process_set": "backup", "actions": ["all_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}


def _start_agent(env: PEnv) -> Daemon:
    d = Daemon(env.base, env.cfg)
    d.notify.settimeout(600)
    d.wait_for("READY=1", timeout=600)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = _status()
        if st["agent_connected"] and st["guard_point_count"] >= 1:
            break
        time.sleep(0.2)
    return d


@pytest.fixture(scope="module")
def penv():
    base = Path(tempfile.mkdtemp(prefix="tkp-", dir="/tmp"))
    base.chmod(0o755)
    env = PEnv(base)
    # tmpfs: the data tests' session keeps the RAM disk's ext4 mounted meanwhile
    env.ext.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=256m", "tkp", str(env.ext))
    env.lower.mkdir()
    os.chmod(env.lower, 0o777)
    (base / "fmnt").mkdir()
    (base / "fback").mkdir()
    cfg = base_config(base)
    cfg["agent"]["cache"] = {"ttl_seconds": TTL}
    cfg["agent"]["log_level"] = "info"
    cfg["process_sets"] = {"app": {"executables": [PY]},
                           "backup": {"executables": [env.rawpy, TAR]}}
    cfg["policies"] = {"gp": _policy(env)}
    cfg["guard_points"] = [{"path": str(base / "fmnt"), "backing": str(base / "fback"),
                            "policy": "gp", "key": "k1"}]
    env.cfg = cfg
    try:
        env.agent = _start_agent(env)
        kmount(env.lower, env.kmnt, "key=k1,gp=1")
        try:
            yield env
        finally:
            with contextlib.suppress(OSError):
                kumount(env.kmnt)
            if env.agent:
                env.agent.stop()
    finally:
        sh("umount", str(env.ext), check=False)
        shutil.rmtree(base, ignore_errors=True)


# ---- the module's counters (STATUS_REQUEST) -------------------------------------------

def _status() -> dict:
    with R.Genl() as g:
        st = taka_kernel.status(g, taka_kernel.family(g))
    return {f: getattr(st, f) for f in st.__struct_fields__}


# ---- views ------------------------------------------------------------------------------

def test_views_by_program(penv):
    secret = os.urandom(9000) + b"the quarterly numbers" * 100
    penv.app_write("s.bin", secret)
    stored = (penv.lower / "s.bin").read_bytes()
    assert stored[:4] == b"TAKA" and secret[:64] not in stored
    assert penv.read_as(PY, "s.bin") == secret                  # the application
    assert penv.read_as(str(penv.link), "s.bin") == secret      # through a symlink: same binary
    assert penv.read_as(penv.rawpy, "s.bin") == stored          # the backup tool: raw
    assert penv.read_as(penv.other, "s.bin") == errno.EACCES    # a copy elsewhere: denied
    # not root (python lives under /root here, out of nobody's reach: cat, in no set,
    # whose open the lower directory's modes would allow)
    r = subprocess.run(["/bin/cat", str(penv.kmnt / "s.bin")], capture_output=True, timeout=60,
                       user=NOBODY, group=NOBODY, extra_groups=[])
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    assert (penv.lower / "s.bin").stat().st_mode & 0o004    # readable by all below
    r = subprocess.run(["/bin/sh", "-c", f"exec head -c 10 {penv.kmnt / 's.bin'}"],
                       capture_output=True, timeout=60)
    assert r.returncode != 0 and b"Permission denied" in r.stderr   # root, unlisted
    # sizes are per view: the application sees the plaintext size, a raw getattr the stored
    size = penv.run(PY, "import os,sys; print(os.stat(sys.argv[1]).st_size)",
                    penv.kmnt / "s.bin", check=True)
    assert int(size.stdout) == len(secret)
    size = subprocess.run(["stat", "-c", "%s", str(penv.kmnt / "s.bin")], capture_output=True,
                          text=True, timeout=60)
    assert size.returncode == 0 and int(size.stdout) == len(stored)
    # names: listing and stat are permitted to all here, creating is not
    assert "s.bin" in subprocess.run(["ls", str(penv.kmnt)], capture_output=True, text=True,
                                     timeout=60).stdout
    r = subprocess.run(["touch", str(penv.kmnt / "new")], capture_output=True, timeout=60)
    assert r.returncode != 0 and not (penv.lower / "new").exists()


def test_raw_view_never_serves_plaintext_pages(penv):
    secret = os.urandom(20000)
    penv.app_write("m.bin", secret)
    assert penv.read_as(PY, "m.bin") == secret      # the plaintext pages are cached now
    stored = (penv.lower / "m.bin").read_bytes()
    out = penv.base / "copies"
    out.mkdir(exist_ok=True)
    code = r"""
import mmap, os, sys
src, dst = sys.argv[1], sys.argv[2]
fd = os.open(src, os.O_RDONLY)
n = os.fstat(fd).st_size
with mmap.mmap(fd, n, prot=mmap.PROT_READ) as m:
    open(dst + '.mmap', 'wb').write(m[:])
with mmap.mmap(fd, n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
    open(dst + '.private', 'wb').write(m[:])
o = os.open(dst + '.sendfile', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
off = 0
while off < n:      # sendfile may move less than asked: loop as cp does
    k = os.sendfile(o, fd, off, n - off)
    if not k:
        break
    off += k
os.close(o)
# copy_file_range within the mount (across file systems it is EXDEV anyway): refused
# for a raw open (the VFS would clamp it by the plaintext size), so cp falls back
o = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    os.copy_file_range(fd, o, n, 0, 0)
    raise SystemExit('copy_file_range of a raw open went through')
except OSError as e:
    assert e.errno == 18, e
os.close(o)
os.close(fd)
"""
    penv.run(penv.rawpy, code, penv.kmnt / "m.bin", out / "m", penv.kmnt / "m.cfr",
             check=True)
    for how in ("mmap", "private", "sendfile"):
        got = (out / f"m.{how}").read_bytes()
        assert got == stored, how
        assert secret[:32] not in got, how
    # cp as the backup program: copy_file_range refused, read and write instead
    r = subprocess.run(["cp", str(penv.kmnt / "m.bin"), str(penv.kmnt / "m.cp")],
                       capture_output=True, timeout=60)
    assert r.returncode != 0        # cp is in no set here: denied, nothing copied
    penv.run(penv.rawpy, "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
             penv.kmnt / "m.bin", penv.kmnt / "m.cp", check=True)
    assert (penv.lower / "m.cp").read_bytes() == stored


def test_raw_restore_is_seen_by_the_application(penv):
    """tar backs up ciphertext and restores it; a raw write replaces what the plaintext
    view had cached."""
    files = {f"t{i}.bin": os.urandom(n) for i, n in enumerate((0, 1, 4096, 70000))}
    (penv.kmnt / "tree").exists() or penv.run(PY, "import os,sys; os.mkdir(sys.argv[1])",
                                                penv.kmnt / "tree", check=True)
    for n, b in files.items():
        penv.app_write(f"tree/{n}", b)
    for n, b in files.items():
        assert penv.read_as(PY, f"tree/{n}") == b
    archive = penv.base / "backup.tar"
    r = subprocess.run([TAR, "-C", str(penv.kmnt), "-cf", str(archive), "tree"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(archive) as t:
        for n, b in files.items():
            m = t.extractfile(f"tree/{n}").read()
            assert m == (penv.lower / "tree" / n).read_bytes()
            # a 16-byte probe: a shorter one can occur in random ciphertext by chance
            assert (m[:4] == b"TAKA" or m == b"") and (len(b) < 16 or b[:16] not in m)
            assert len(m) >= len(b)
    # the application changes the files; the restore brings the old bytes back
    for n in files:
        penv.app_write(f"tree/{n}", b"changed " + n.encode())
    for n in files:     # cached, changed
        assert penv.read_as(PY, f"tree/{n}") == b"changed " + n.encode()
    r = subprocess.run([TAR, "-C", str(penv.kmnt), "-xf", str(archive)], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for n, b in files.items():
        assert penv.read_as(PY, f"tree/{n}") == b, n
    # a raw write into a file whose plaintext is cached (same inode, not a new file): the
    # stored bytes of another file replace it, and the application reads those
    a, b = "tree/t3.bin", "tree/t2.bin"
    assert penv.read_as(PY, a) == files["t3.bin"]
    penv.run(penv.rawpy, "import sys; open(sys.argv[1], 'wb').write(open(sys.argv[2], 'rb')"
             ".read())", penv.kmnt / a, penv.lower / b, check=True)
    assert penv.read_as(PY, a) == files["t2.bin"]


def test_decision_cache_hits_and_reload(penv):
    penv.app_write("c.bin", b"cached")
    before = _status()
    # one process (pid and start time are in the key) opening ten times: one question,
    # nine hits without a netlink round trip
    penv.run(PY, "import sys\nfor _ in range(10): assert open(sys.argv[1], 'rb').read() == "
             "b'cached'", penv.kmnt / "c.bin", check=True)
    after = _status()
    assert after["cache_hits"] >= before["cache_hits"] + 9
    assert after["requests_sent"] - before["requests_sent"] <= 4
    assert after["cache_entries"] > 0 and after["cache_capacity"] >= after["cache_entries"]
    # a reload (CONFIG_UPDATE) drops every cached decision: the policy now denies the app
    penv.cfg["policies"]["gp"]["rules"][0]["effects"] = ["deny", "audit"]
    from agent_helpers import write_config
    write_config(penv.agent.config_path, penv.cfg)
    gen = _status()["config_generation"]
    penv.agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _status()["config_generation"] == gen:
        time.sleep(0.2)
    try:
        assert penv.read_as(PY, "c.bin") == errno.EACCES
    finally:
        penv.cfg["policies"]["gp"] = _policy(penv)
        write_config(penv.agent.config_path, penv.cfg)
        gen = _status()["config_generation"]
        penv.agent.proc.send_signal(signal.SIGHUP)
        while time.monotonic() < deadline + 120 and _status()["config_generation"] == gen:
            time.sleep(0.2)
    assert penv.read_as(PY, "c.bin") == b"cached"


def test_cached_denials_are_audited_by_the_module(penv):
    penv.app_write("d.bin", b"x")
    st0 = _status()
    code = ("import sys\nfor _ in range(20):\n try: open(sys.argv[1], 'rb')\n"
            " except OSError as e: assert e.errno == 13\n else: raise SystemExit('opened')")
    penv.run(penv.other, code, penv.kmnt / "d.bin", check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _status()["audit_events"] == st0["audit_events"]:
        time.sleep(0.2)
    st1 = _status()
    assert st1["policy_denials"] >= st0["policy_denials"] + 20
    assert st1["cache_hits"] >= st0["cache_hits"] + 19
    assert st1["audit_events"] > st0["audit_events"]    # coalesced: far fewer than 19


def test_agent_killed_fails_closed_then_recovers(penv):
    penv.app_write("k.bin", b"survives")
    # written, not yet stored (no fsync): its dirty pages outlive the agent and its keys
    dirty = os.urandom(3 * 4096 + 5)
    penv.run(PY, "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())",
             penv.kmnt / "dirty.bin", check=True, stdin=dirty)
    penv.agent.proc.send_signal(signal.SIGKILL)
    penv.agent.proc.wait(60)
    dead = time.monotonic()
    # nothing new is decided: a caller never seen is denied at once
    assert penv.read_as(penv.rawpy, "k.bin") == errno.EACCES
    # what was cached ends at its TTL: no plaintext for anyone after that
    time.sleep(max(0.0, TTL + 0.5 - (time.monotonic() - dead)))
    assert penv.read_as(PY, "k.bin") == errno.EACCES
    st = _status()
    assert not st["agent_connected"] and st["fail_closed_denials"] >= 2
    penv.agent.stop()
    penv.agent = _start_agent(penv)     # systemd's restart: no remount
    assert penv.read_as(PY, "k.bin") == b"survives"
    os.sync()                           # the dirty pages, with the key asked again
    stored = (penv.lower / "dirty.bin").read_bytes()
    assert stored[:4] == b"TAKA" and len(stored) > len(dirty)
    assert penv.read_as(PY, "dirty.bin") == dirty
