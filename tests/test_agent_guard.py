"""takakryptd serving a real in-place guard point: plaintext for the authorised
process, ciphertext for the backup tool, EACCES for everyone else (root included),
audit events, learn mode, time sets, reload, SIGKILL recovery without a reboot.

The behavioural tests take the ``engine`` fixture: ``fuse`` here, ``kernel``
(takakryptfs.ko, mounted in place by takakryptd) in the kernel suite's VM, where
tests/kernel/guest/test_guard_engines.py imports these same functions and
TAKAKRYPT_IN_VM=1 makes ``kernel`` the only parameter.  The engines are held to one
access matrix:

| caller                                        | the file           |
|-----------------------------------------------|--------------------|
| the application (root, this Python)          | plaintext          |
| the same binary through a symlink             | plaintext          |
| a copy of that binary at another path         | EACCES             |
| root's shell (`sh -c 'cat …'`)                | EACCES             |
| `nobody` (`cat`, the file world-readable)     | EACCES             |
| `tar` (permit without apply_key)              | the TAKA bytes; restores |

Tests marked as FUSE internals (SIGKILL, policy hints) take no ``engine``; the kernel
engine's own versions are in tests/kernel/guest/."""

import contextlib
import copy
import datetime as dt
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from agent_helpers import Daemon, base_config, running, until, write_config
from takakrypt.cryptofile import TakaFile
from takakrypt.keys import open_keystore

IN_VM = os.environ.get("TAKAKRYPT_IN_VM") == "1"
# the engines this machine runs: the host has /dev/fuse and cannot load modules, the
# kernel suite's VM loads takakryptfs.ko (tests/kernel/guest/conftest.py)
ENGINES = ["kernel"] if IN_VM else ["fuse"]
# under TCG a Python start (takakryptd, the CLI, every client) takes seconds
START, SLOW = (600, 240) if IN_VM else (60, 60)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat"))
TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")
NOBODY = 65534
FSTYPE = {"fuse": "fuse.takakrypt", "kernel": "takakryptfs"}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


# --- helpers ------------------------------------------------------------------------------

def _base() -> Path:
    """A directory everyone may traverse (pytest's are 0700: `nobody` would be stopped
    there, not by the guard point)."""
    d = Path(tempfile.mkdtemp(prefix="tkguard-", dir="/tmp"))
    d.chmod(0o755)
    return d


def _cleanup(base: Path) -> None:
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        where = line.split()[1]
        if where.startswith(str(base) + "/"):
            subprocess.run(["umount", "-l", where], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def _gp(base: Path, name: str, policy: str, engine: str) -> dict:
    d = base / name
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o777)
    return {"path": str(d), "policy": policy, "key": "k1", "engine": engine}


def _rules(app_effects=("permit", "apply_key"), time_set=None) -> list[dict]:
    app = {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
           "effects": list(app_effects)}
    if time_set:
        app["time_set"] = time_set
    return [app,
            {"process_set": "backup", "actions": ["all_ops"], "effects": ["permit", "audit"]},
            {"actions": ["getattr", "list"], "effects": ["permit"]},
            {"actions": ["all_ops"], "effects": ["deny", "audit"]}]


def _hhmm(t: dt.datetime) -> str:
    return t.strftime("%H:%M")


def _cfg(base: Path, engine: str, gps=(("guarded", "gp"),)) -> dict:
    cfg = base_config(base)
    cfg["process_sets"] = {"app": {"executables": [PY]}, "backup": {"executables": [TAR]}}
    now = dt.datetime.now(dt.timezone.utc)
    hour = dt.timedelta(hours=1)
    every = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    cfg["time_sets"] = {   # a window around now; one that starts two hours from now
        "now": {"days": every, "start": _hhmm(now - hour), "end": _hhmm(now + hour)},
        "later": {"days": every, "start": _hhmm(now + 2 * hour), "end": _hhmm(now + 3 * hour)}}
    cfg["policies"] = {
        "gp": {"rules": _rules()},
        "learn": {"learn_mode": True, "rules": _rules()},
        "now": {"rules": _rules(time_set="now")},
        "later": {"rules": _rules(time_set="later")},
        "by_uid": {"rules": [  # no process rule: decided by uid for every process
            {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
            {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = [_gp(base, name, pol, engine) for name, pol in gps]
    return cfg


@contextlib.contextmanager
def _running(base: Path, cfg: dict):
    d = Daemon(base, cfg)
    try:
        d.wait_for("READY=1", timeout=START)
        yield d
    finally:
        d.stop()


def _jcli(d: Daemon, *args):
    return json.loads(d.cli(*args, "--json", timeout=SLOW).stdout)


def _mounted(path, engine: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2] == FSTYPE[engine]
                   for line in f)


def _counters(d: Daemon, engine: str, gp) -> dict:
    """The engine's decision counters: hits of its own cache, questions to the agent."""
    if engine == "fuse":
        st = {g["path"]: g for g in _jcli(d, "guard", "list")}[str(gp)]["stats"]
        return {"hits": st["cache_hits"], "asked": st["ring_requests"]}
    st = _jcli(d, "status")["kernel"]["status"]
    return {"hits": st["cache_hits"], "asked": st["requests_sent"]}


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=SLOW, cwd="/", **kw)


def _py(code, *args, exe=PY, user=None):
    return subprocess.run([exe, "-S", "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=SLOW, cwd="/", user=user)


WRITE = ("import os, sys\nwith open(sys.argv[1], 'wb') as f:\n"
         "    f.write(sys.stdin.buffer.read()); f.flush(); os.fsync(f.fileno())\n"
         "os.chmod(sys.argv[1], 0o644)")
READ = ("import sys\ntry:\n    sys.stdout.write(open(sys.argv[1], 'rb').read().hex())\n"
        "except OSError as e:\n    sys.stdout.write('E%d' % e.errno)")


def _write(path, data: bytes | str, exe=PY) -> subprocess.CompletedProcess:
    """``data`` written to ``path`` by a Python run as ``exe`` (the application)."""
    return subprocess.run([exe, "-S", "-c", WRITE, str(path)], capture_output=True,
                          timeout=SLOW, cwd="/",
                          input=data.encode() if isinstance(data, str) else data)


def _written(path, data: bytes | str) -> None:
    r = _write(path, data)
    if r.returncode:   # say why: the audit records of the path (the guard points' parent)
        audit = Path(path).parent.parent / "audit.jsonl"
        why = [e for e in (json.loads(x) for x in audit.read_text().splitlines())
               if e.get("path") == str(path)] if audit.exists() else "no audit file"
        raise AssertionError(f"writing {path}: {r.stderr!r}\naudit: {why}")


def _read_as(exe, path) -> bytes | int:
    """What a Python run as ``exe`` reads from ``path``: the bytes, or the errno."""
    r = _py(READ, path, exe=exe)
    assert r.returncode == 0, r.stderr
    return int(r.stdout[1:]) if r.stdout.startswith("E") else bytes.fromhex(r.stdout)


def _sh_cat(path) -> subprocess.CompletedProcess:
    return _run(["/bin/sh", "-c", 'cat "$1"', "sh", str(path)])


def _events(base: Path) -> list[dict]:
    p = base / "audit.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _access(base: Path, pred, timeout: float = 30) -> list[dict]:
    """The access events matching ``pred``, waiting for the first one (the audit logger
    writes from its own thread)."""
    return until(lambda: [e for e in _events(base) if e["kind"] == "access" and pred(e)],
                 timeout) or []


def _decrypt(base: Path, stored: bytes) -> bytes:
    p = base / "stored.taka"
    p.write_bytes(stored)
    with open_keystore(str(base / "keystore.json"),
                       master_key_file=str(base / "master.key")) as ks:
        with TakaFile.open(p, ks.get) as f:
            return f.read(0, 10 ** 7)


# --- one takakryptd for all of them -------------------------------------------------------
# (the kernel module serves one takakryptd at a time: a second one registering takes the
# module over, and its exit leaves the first one's guard points failing closed)

class Served:
    def __init__(self, base: Path, engine: str) -> None:
        self.base, self.engine = base, engine
        bins = base / "bins"
        bins.mkdir()
        self.copy = bins / "python3"                 # the application's bytes elsewhere
        shutil.copy2(PY, self.copy)
        (base / "links").mkdir()
        self.link = base / "links" / "python3"       # a symlink to the application
        self.link.symlink_to(PY)
        self.cfg = _cfg(base, engine, (("guarded", "gp"), ("learnt", "learn"),
                                       ("open", "now"), ("closed", "later"),
                                       ("reloaded", "by_uid")))
        self.d: Daemon | None = None

    def gp(self, name: str) -> Path:
        return self.base / name


@pytest.fixture(scope="module")
def served(engine):
    base = _base()
    s = Served(base, engine)
    try:
        with _running(base, s.cfg) as s.d:
            yield s
    finally:
        _cleanup(base)


def test_access_matrix(served, engine):
    s, gp = served, served.gp("guarded")
    f = gp / "s.txt"
    secret = "the quarterly numbers\n" * 1000
    assert _mounted(gp, engine)
    _written(f, secret)
    assert os.stat(f).st_mode & 0o004            # readable by all as far as modes go
    assert _read_as(PY, f) == secret.encode()                    # the application
    assert _read_as(s.link, f) == secret.encode()                # its symlink: same binary
    assert _read_as(s.copy, f) == errno.EACCES                   # its copy elsewhere
    sh = _sh_cat(f)                                              # root, unlisted
    assert sh.returncode != 0 and b"Permission denied" in sh.stderr, sh
    assert secret.encode()[:20] not in sh.stdout
    # nobody: may stat (getattr is permitted to all), may not open
    st = _run(["stat", "-c", "%s", str(f)], user=NOBODY, group=NOBODY, extra_groups=[])
    assert st.returncode == 0, st
    r = _run([CAT, str(f)], user=NOBODY, group=NOBODY, extra_groups=[])
    assert r.returncode != 0 and b"Permission denied" in r.stderr, r
    status = _jcli(s.d, "status")
    gl = {g["path"]: g for g in _jcli(s.d, "guard", "list")}[str(gp)]
    assert gl["engine"] == engine and gl["mounted"] and status["healthy"], (gl, status)
    # each denial audited by the agent, under the guard point's policy
    mine = (lambda e: e["path"] == str(f) and e["decision"] == "deny")
    denied = _access(s.base, lambda e: mine(e) and e["uid"] == NOBODY)
    assert denied and all(e["policy"] == "gp" and e["exe"] == CAT for e in denied), denied
    for exe in (str(s.copy), CAT):
        got = _access(s.base, lambda e, exe=exe: mine(e) and e["uid"] == 0 and e["exe"] == exe)
        assert got and all(e["policy"] == "gp" and e["rule"] == 3 for e in got), (exe, got)
    assert not _access(s.base, lambda e: e["path"] == str(f) and e["exe"] == PY
                       and e["decision"] == "deny", timeout=0)


def test_tar_backs_up_ciphertext_and_restores(served):
    s, gp = served, served.gp("guarded")
    files = {"a.txt": b"the payroll, line one\n" * 300, "b.bin": os.urandom(70000)}
    r = _py("import os, sys; os.makedirs(sys.argv[1], exist_ok=True)", gp / "tree")
    assert r.returncode == 0, r.stderr
    for n, b in files.items():
        _written(gp / "tree" / n, b)
        assert _read_as(PY, gp / "tree" / n) == b
    archive = s.base / "backup.tar"
    t = _run([TAR, "-C", str(gp), "-cf", str(archive), "tree"])
    assert t.returncode == 0, t.stderr
    with tarfile.open(archive) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    assert set(members) == {f"tree/{n}" for n in files}, sorted(members)
    for n, b in files.items():
        m = members[f"tree/{n}"]
        assert m[:4] == b"TAKA" and (len(b) < 16 or b[:16] not in m), n
        assert _decrypt(s.base, m) == b, n       # the stored file, under our key
    # the application changes every file; the restore brings the archived ones back
    for n in files:
        _written(gp / "tree" / n, f"changed {n}")
        assert _read_as(PY, gp / "tree" / n) == f"changed {n}".encode()
    t = _run([TAR, "-C", str(gp), "-xf", str(archive)])
    assert t.returncode == 0, t.stderr
    for n, b in files.items():
        assert _read_as(PY, gp / "tree" / n) == b, n
    tars = _access(s.base, lambda e: e["exe"] == TAR and e["path"].startswith(str(gp / "tree")))
    assert tars and all(e["decision"] == "permit" and e["key"] is None for e in tars), tars
    assert any(e["operation"] in ("write", "create") for e in tars), tars


def test_rename_and_link_are_decided_by_the_agent(served, engine):
    # rename/link are asked with the destination as `target`: the authorised process
    # may, an unlisted process (mv) may not
    s, d = served, served.gp("guarded") / "rl"
    r = _py("import os, sys\n"
            "d = sys.argv[1]\n"
            "os.mkdir(d)\n"
            "open(d + '/a', 'w').write('payload')\n"
            "os.rename(d + '/a', d + '/b')\n"
            "os.link(d + '/b', d + '/c')\n"
            "print(open(d + '/c').read())", d)
    assert r.stdout.strip() == "payload", r.stderr + s.d.logtext()[-3000:]
    before = _counters(s.d, engine, s.gp("guarded"))
    mv = _run(["/bin/mv", str(d / "b"), str(d / "moved")])
    assert mv.returncode != 0 and b"Permission denied" in mv.stderr, mv
    ln = _run(["/bin/ln", str(d / "b"), str(d / "linked")])
    assert ln.returncode != 0 and b"Permission denied" in ln.stderr, ln
    assert sorted(os.listdir(d)) == ["b", "c"]
    assert _counters(s.d, engine, s.gp("guarded"))["asked"] >= before["asked"] + 2
    for op in ("rename", "link"):
        ev = _access(s.base, lambda e, op=op: e["operation"] == op and e["decision"] == "deny"
                     and e["path"].startswith(str(d) + "/"))
        assert ev and all(e["exe"] != PY for e in ev), (op, ev)


def test_learn_mode_permits_and_audits_would_be_denials(served):
    s, gp = served, served.gp("learnt")
    f = gp / "l.txt"
    _written(f, "learning\n")
    assert _read_as(PY, f) == b"learning\n"
    sh = _sh_cat(f)
    assert sh.returncode == 0 and sh.stdout == b"learning\n", sh    # plaintext, as a permit
    assert _read_as(s.copy, f) == b"learning\n"
    for exe in (CAT, str(s.copy)):
        ev = _access(s.base, lambda e, exe=exe: e["path"] == str(f) and e["exe"] == exe)
        assert ev and all(e["decision"] == "would-deny" and e["learn_mode"]
                          and e["policy"] == "learn" for e in ev), (exe, ev)
    app = _access(s.base, lambda e: e["path"] == str(f) and e["exe"] == PY, timeout=0)
    assert not any(e["decision"] == "would-deny" for e in app), app


def test_time_sets_decide_by_the_clock(served):
    s = served
    # a rule whose time set holds now permits ...
    f = s.gp("open") / "t.txt"
    _written(f, "in office hours\n")
    assert _read_as(PY, f) == b"in office hours\n"
    # ... one whose time set starts later does not: the application is denied
    g = s.gp("closed") / "t.txt"
    r = _write(g, "after hours")
    assert r.returncode != 0 and b"Permission denied" in r.stderr, r
    assert not g.exists()       # listed (getattr, list permitted to all), not created
    ev = _access(s.base, lambda e: e["path"] == str(g) and e["exe"] == PY)
    assert ev and all(e["decision"] == "deny" and e["policy"] == "later" for e in ev), ev


# --- reload ---------------------------------------------------------------------------------

READER = ("import sys\n"
          "for _ in sys.stdin:\n"
          "    try:\n        out = open(sys.argv[1], 'rb').read().hex()\n"
          "    except OSError as e:\n        out = 'E%d' % e.errno\n"
          "    print(out, flush=True)")


def test_reload_voids_cached_permits_and_moves_guard_points(served, engine):
    """A process-free policy lets every root process read; the reload to process rules
    denies the same reader at its next open (nothing its engine cached survives), the
    next reloads take the guard point away (the stored files stay TAKA) and back."""
    s, gp = served, served.gp("reloaded")
    f = gp / "f"
    cfg = copy.deepcopy(s.cfg)
    mine = next(g for g in cfg["guard_points"] if g["path"] == str(gp))
    assert mine["policy"] == "by_uid"

    def reload(c: dict) -> None:
        write_config(s.d.config_path, c)
        assert _jcli(s.d, "reload")["reloaded"]

    _written(f, "x" * 5000)
    reader = subprocess.Popen([str(s.copy), "-S", "-c", READER, str(f)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")

    def ask() -> bytes | int:
        reader.stdin.write("\n")
        reader.stdin.flush()
        out = reader.stdout.readline().strip()
        return int(out[1:]) if out.startswith("E") else bytes.fromhex(out)

    try:
        before = _counters(s.d, engine, gp)
        for _ in range(3):   # not the application: root is enough here
            assert ask() == b"x" * 5000
        for _ in range(2):
            assert _run([CAT, str(f)]).stdout == b"x" * 5000
        # the engine answered some of these itself: a cached permit is there
        assert _counters(s.d, engine, gp)["hits"] >= before["hits"] + 2
        mine["policy"] = "gp"
        reload(cfg)
        assert ask() == errno.EACCES         # the same process, its next open
    finally:
        reader.stdin.close()
        reader.wait(SLOW)
    try:
        sh = _sh_cat(f)
        assert sh.returncode != 0 and b"Permission denied" in sh.stderr, sh
        assert _read_as(PY, f) == b"x" * 5000
        # the guard point removed: unmounted, the file as stored; the others served on
        reload(dict(cfg, guard_points=[g for g in cfg["guard_points"] if g is not mine]))
        assert not _mounted(gp, engine) and _mounted(s.gp("guarded"), engine)
        stored = f.read_bytes()
        assert stored[:4] == b"TAKA" and _decrypt(s.base, stored) == b"x" * 5000
        # and back
        reload(cfg)
        assert _mounted(gp, engine)
        assert _read_as(PY, f) == b"x" * 5000
        assert _read_as(s.copy, f) == errno.EACCES
    finally:
        reload(s.cfg)    # the fixture's configuration for whatever runs next


# --- FUSE internals -----------------------------------------------------------------------

def test_sigkill_fails_closed_and_restart_recovers(tmp_path):
    cfg = _cfg(tmp_path, "fuse")
    gp = tmp_path / "guarded"
    d = Daemon(tmp_path, cfg)
    try:
        d.wait_for("READY=1")
        _written(gp / "f", "survives")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        r = _py("import sys\ntry:\n print(open(sys.argv[1]).read())\nexcept OSError as e:\n"
                " print('err', e.errno)", gp / "f")
        # a dead agent: the mount is gone (ENOTCONN) or the file is ciphertext-only: never
        # plaintext
        assert "survives" not in r.stdout
    finally:
        d.stop()
    d2 = Daemon(tmp_path, cfg)
    try:
        d2.wait_for("READY=1")
        assert _read_as(PY, gp / "f") == b"survives", d2.logtext()
    finally:
        d2.stop()
    assert not _mounted(gp, "fuse")


def test_fuse_policy_hints_follow_reloads(tmp_path):
    # the FUSE engine's policy hints (docs/guard-points.md): bit 1 (plaintext only) when
    # no rule gives a raw view, bit 4 (decided by uid alone) for a process-free policy;
    # a reload keeps only what both policies prove
    cfg = _cfg(tmp_path, "fuse")
    gp = tmp_path / "guarded"

    def hints(d):
        return {g["path"]: g for g in d.jcli("guard", "list")}[str(gp)]["stats"]["policy_hints"]

    with running(tmp_path, cfg) as d:
        assert hints(d) == 0           # the backup tool's raw view: no hints
        plain = dict(cfg, policies=dict(cfg["policies"], gp={"rules": [
            _rules()[0], _rules()[-1]]}))
        write_config(d.config_path, plain)
        assert d.jcli("reload")["reloaded"]
        assert hints(d) == 1
        cfg["guard_points"][0]["policy"] = "by_uid"
        write_config(d.config_path, cfg)
        assert d.jcli("reload")["reloaded"]
        _written(gp / "f", "x")
        for _ in range(3):
            assert _run([CAT, str(gp / "f")]).stdout == b"x"
        st = {g["path"]: g for g in d.jcli("guard", "list")}[str(gp)]["stats"]
        assert st["policy_hints"] & 4 and st["ident_skips"] > 0, st
        cfg["guard_points"][0]["policy"] = "gp"
        write_config(d.config_path, cfg)
        assert d.jcli("reload")["reloaded"]
        assert not hints(d) & 4
        # cat was answered by the uid's cache; now it is in no set
        raw = _run([CAT, str(gp / "f")])
        assert raw.returncode != 0 and b"Permission denied" in raw.stderr, raw
