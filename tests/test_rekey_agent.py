"""Live rekey through a real takakryptd and a real FUSE guard point (docs/operations.md,
"Rotating keys and live rekey"): rotation, `takakrypt rekey start|status|pause|resume`,
`keys versions --usage`, `keys retire`, status, metrics and audit, and the crash loop:
takakryptd SIGKILLed during a rekey, restarted, the run resumed -- every read after
every kill returns the reference bytes, and every file ends on the new version."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent_helpers import Daemon, base_config, until
from takakrypt import format as fmt

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs root, /dev/fuse, fusermount3")


def _cfg(tmp: Path, gp: Path, backing: Path, **gp_extra) -> dict:
    cfg = base_config(tmp)
    cfg["policies"] = {"p": {"rules": [
        {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1",
                            "backing": str(backing), **gp_extra}]
    return cfg


def _keys(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "takakrypt", "keys", *args, "--keystore",
                        str(tmp / "keystore.json"), "--master-key-file",
                        str(tmp / "master.key"), "--json"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=str(tmp / "run" /
                                                                         "control.sock")))
    return r


def _versions_at_rest(backing: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in backing.rglob("*"):
        if p.is_file() and not p.name.startswith(".takakrypt-"):
            h = fmt.parse_header(p.read_bytes()[:fmt.HEADER_SIZE])
            out[h.key_version] = out.get(h.key_version, 0) + 1
    return out


def _populate(gp: Path, rng: random.Random, n: int = 24) -> dict[str, bytes]:
    ref = {}
    for i in range(n):
        size = rng.choice([0, 1, 4095, 4096, 4097, 70_000, 300_001, 1 << 20])
        rel = f"d{i % 3}/f{i:02d}"
        (gp / rel).parent.mkdir(exist_ok=True)
        data = rng.randbytes(size)
        (gp / rel).write_bytes(data)
        ref[rel] = data
    return ref


def _check(gp: Path, ref: dict[str, bytes]) -> None:
    for rel, data in ref.items():
        got = (gp / rel).read_bytes()
        assert got == data, f"{rel}: {len(got)} bytes read, {len(data)} expected"


def _audit(tmp: Path) -> list[dict]:
    p = tmp / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


@pytest.fixture
def env(tmp_path):
    gp, backing = tmp_path / "gp", tmp_path / "store"
    gp.mkdir()
    backing.mkdir()
    return tmp_path, gp, backing


def test_rotate_rekey_usage_retire(env):
    tmp, gp, backing = env
    cfg = _cfg(tmp, gp, backing, rekey_rate=2)  # MB/s: slow enough to pause mid-way
    d = Daemon(tmp, cfg)
    try:
        d.wait_for("READY=1")
        ref = _populate(gp, random.Random(7))
        assert _versions_at_rest(backing) == {1: len(ref)}
        r = _keys(tmp, "rotate", "k1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["current_version"] == 2
        # new files use version 2 at once; the old ones stay on 1 and readable
        (gp / "new").write_bytes(b"after rotation")
        ref["new"] = b"after rotation"
        use = d.jcli("keys", "versions", "k1", "--usage", str(gp), "--keystore",
                     str(tmp / "keystore.json"), "--master-key-file", str(tmp / "master.key"))
        assert [(v["version"], v["files"]) for v in use["versions"]] == [
            (1, len(ref) - 1), (2, 1)]
        # retire refuses while files use version 1
        r = _keys(tmp, "retire", "k1", "--version", "1", "--usage", str(gp))
        assert r.returncode == 18, r.stderr
        assert "still in use" in r.stderr
        _check(gp, ref)

        st = d.jcli("rekey", "start", str(gp))
        assert st["state"] == "running" and st["target_version"] == 2
        assert st["rate"] == 2_000_000
        r = d.cli("rekey", "start", str(gp), check=False)  # a second run: refused
        assert r.returncode == 2 and "already running" in r.stderr
        until(lambda: d.jcli("rekey", "status", str(gp))["files_rekeyed"] >= 2, 60)
        st = d.jcli("rekey", "pause", str(gp))
        assert st["state"] == "paused" and not st["active"]
        paused_at = st["files_done"]
        time.sleep(1.0)
        assert d.jcli("rekey", "status", str(gp))["files_done"] == paused_at
        _check(gp, ref)  # a paused run leaves every file readable
        st = d.jcli("rekey", "resume", str(gp), "--rate", "0", "--wait")
        assert st["state"] == "done", st
        assert st["files_failed"] == 0 and st["busy"] == 0
        assert st["files_rekeyed"] + st["files_current"] == len(ref)
        assert st["files_current"] >= 1  # "new" was on version 2 already
        _check(gp, ref)
        assert _versions_at_rest(backing) == {2: len(ref)}

        # status and metrics show the run
        status = d.jcli("status")
        assert [(x["guard"], x["state"]) for x in status["rekeys"]] == [(str(gp), "done")]
        m = urllib.request.urlopen(
            f"http://127.0.0.1:{cfg['agent']['metrics']['port']}/metrics", timeout=10).read()
        text = m.decode()
        assert f'takakrypt_rekey_files_total{{guard="{gp}",outcome="rekeyed"}} ' \
               f'{float(st["files_rekeyed"])}' in text
        assert f'takakrypt_rekey_state{{guard="{gp}",state="done"}} 1.0' in text

        # nothing uses version 1 now: it can be retired, and is gone
        r = _keys(tmp, "retire", "k1", "--version", "1", "--usage", str(gp))
        assert r.returncode == 0, r.stderr
        info = json.loads(_keys(tmp, "show", "k1").stdout)
        assert [v["state"] for v in info["versions"]] == ["retired", "active"]
        r = _keys(tmp, "retire", "k1", "--version", "2", "--usage", str(gp))
        assert r.returncode == 18 and "current version" in r.stderr
        _check(gp, ref)
    finally:
        d.stop()
    ev = _audit(tmp)
    runs = [e["reason"].split(":")[0] for e in ev if e["kind"] == "rekey"]
    assert runs == ["rekey started", "rekey paused", "rekey resumed", "rekey finished"], runs
    files = [e for e in ev if e["kind"] == "rekey-file"]
    assert len(files) == st["files_rekeyed"]
    assert {e["reason"] for e in files} == {"file rekeyed"}
    assert all(e["path"].startswith(str(gp) + "/") for e in files)


def _header(backing: Path, rel: str) -> fmt.Header:
    return fmt.parse_header((backing / rel).read_bytes()[:fmt.HEADER_SIZE])


@pytest.mark.parametrize("taka", [1, 2])
def test_truncate_to_zero_takes_the_current_version(env, taka):
    """After a rotation an empty file has no block bound to its header, so a truncate to
    0 (O_TRUNC, or a size of 0) puts it on the current version at once -- also under
    descriptors held open meanwhile (docs/operations.md, "Rotate").  A v1 file gets a
    new header (new file id); a v2 file is moved (same file id, oldest version too).
    Other truncates keep a v1 file's version; a v2 file's rewritten partial block moves
    it, its untouched blocks keep theirs (oldest stays)."""
    tmp, gp, backing = env
    d = Daemon(tmp, _cfg(tmp, gp, backing, format=taka))
    try:
        d.wait_for("READY=1")
        for rel in ("otrunc", "setsize", "shrink", "held", "empty"):
            (gp / rel).write_bytes(b"v1 data " * 1000 if rel != "empty" else b"")
        ids = {rel: _header(backing, rel).file_id for rel in ("otrunc", "setsize", "held")}
        assert {_header(backing, rel).version for rel in ids} == {taka}
        assert _keys(tmp, "rotate", "k1").returncode == 0
        held = open(gp / "held", "rb")  # a reader holding the file across the truncate
        try:
            (gp / "otrunc").write_bytes(b"rewritten")            # open(O_TRUNC) + write
            os.truncate(gp / "setsize", 0)                        # setattr size 0
            with open(gp / "setsize", "r+b") as f:
                f.write(b"regrown")
            os.truncate(gp / "shrink", 5)                         # not to 0
            with open(gp / "empty", "wb"):                        # O_TRUNC of an empty file
                pass
            with open(gp / "held", "r+b") as f:
                f.truncate(0)
                f.write(b"new content")
            assert held.read() == b"new content"
        finally:
            held.close()
        for rel in ("otrunc", "setsize", "held", "empty"):
            h = _header(backing, rel)
            assert (h.key_version, h.oldest_version) == (2, 2), (rel, h)
            if rel in ids and taka == 1:
                assert h.file_id != ids[rel], rel  # a new file id: new per-file keys
            elif rel in ids:
                assert h.file_id == ids[rel], rel  # the same file, moved
        h = _header(backing, "shrink")
        if taka == 1:
            assert h.key_version == 1
        else:  # its last block was rewritten: on 2; the header keeps 1 as the oldest
            assert (h.key_version, h.oldest_version) == (2, 1)
        assert (gp / "otrunc").read_bytes() == b"rewritten"
        assert (gp / "setsize").read_bytes() == b"regrown"
        assert (gp / "shrink").read_bytes() == b"v1 da"
        assert (gp / "empty").read_bytes() == b""
        # the stored files are exactly what their new headers say (no stale tail)
        assert (backing / "otrunc").stat().st_size == fmt.HEADER_SIZE + 9 + 28
    finally:
        d.stop()


def test_full_backing_file_system_pauses_the_rekey(env):
    """A full backing file system (what an operator meets when the disk fills): `start`
    refuses with a clear error and leaves nothing behind; room for the state but not for
    a file's copy pauses the run (nothing counted as failed, no temporary left, audited);
    `resume` once there is room finishes it."""
    tmp, gp, backing = env
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(backing)],
                   check=True)
    d = None
    try:
        d = Daemon(tmp, _cfg(tmp, gp, backing))
        d.wait_for("READY=1")
        rng = random.Random(11)
        ref = {f"f{i}": rng.randbytes(6 << 20) for i in range(3)}
        for rel, data in ref.items():
            (gp / rel).write_bytes(data)
        fill = backing / "zfill"  # beside the guard point's files, as another writer would
        with open(fill, "wb", buffering=0) as f:
            with pytest.raises(OSError) as full:
                while True:
                    f.write(b"z" * 65536)
        assert full.value.errno == errno.ENOSPC
        assert _keys(tmp, "rotate", "k1").returncode == 0

        r = d.cli("rekey", "start", str(gp), check=False)
        assert r.returncode == 17, (r.returncode, r.stderr)
        assert "rekey state cannot be written" in r.stderr
        assert "No space left on device" in r.stderr and "Errno" not in r.stderr
        assert d.jcli("rekey", "status", str(gp))["state"] == "none"
        assert not [p.name for p in backing.iterdir() if p.name.startswith(".takakrypt-")]

        os.truncate(fill, os.path.getsize(fill) - (2 << 20))  # the state fits, no copy
        r = d.cli("rekey", "start", str(gp), "--wait", check=False, timeout=120)
        assert r.returncode == 17, (r.returncode, r.stderr)
        st = d.jcli("rekey", "status", str(gp))
        assert st["state"] == "paused" and not st["active"], st
        assert "no space left" in st["reason"] and "rekey resume" in st["reason"], st
        assert st["files_failed"] == 0 and st["errors"] == [] and st["files_rekeyed"] == 0
        assert sorted(p.name for p in backing.iterdir()) == [
            ".takakrypt-rekey.state", "f0", "f1", "f2", "zfill"]  # no temporary left
        assert any(e["kind"] == "rekey" and e["reason"].startswith("rekey paused: no space")
                   for e in _audit(tmp))
        _check(gp, ref)

        fill.unlink()
        st = d.jcli("rekey", "resume", str(gp), "--wait")
        assert st["state"] == "done", st
        assert st["files_rekeyed"] == 3 and st["files_failed"] == 0, st
        assert _versions_at_rest(backing) == {2: 3}
        _check(gp, ref)

        # a backing file system gone read-only (ext4 after disk errors): refused the same
        subprocess.run(["mount", "-o", "remount,ro", str(backing)], check=True)
        r = d.cli("rekey", "start", str(gp), check=False)
        assert r.returncode == 17 and "Read-only file system" in r.stderr, r.stderr
        assert d.jcli("rekey", "status", str(gp))["state"] == "done"  # the last run's
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(gp)], capture_output=True)
        subprocess.run(["umount", str(backing)], check=False)


def test_rekey_refused_on_unknown_guard_and_without_agent(env):
    tmp, gp, backing = env
    d = Daemon(tmp, _cfg(tmp, gp, backing))
    try:
        d.wait_for("READY=1")
        r = d.cli("rekey", "start", str(tmp / "nowhere"), check=False)
        assert r.returncode == 2 and "not a guard point" in r.stderr
        r = d.cli("rekey", "pause", str(gp), check=False)
        assert r.returncode == 2 and "no rekey" in r.stderr
        r = d.cli("rekey", "start", str(gp), "--rate", "-1", check=False)
        assert r.returncode == 2 and "rate" in r.stderr
        st = d.jcli("rekey", "status")
        assert st == []
    finally:
        d.stop()
    r = subprocess.run([sys.executable, "-m", "takakrypt", "rekey", "status", str(gp)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=str(tmp / "none.sock")))
    assert r.returncode == 12, r.stderr


def test_sigkill_during_rekey_loop(env):
    """A rekey at a low rate, takakryptd SIGKILLed at a random moment while it runs, a
    new takakryptd resumes the run from its state file -- at least 10 times.  After
    every restart every file reads back exactly; at the end every file is on the target
    version and no temporary is left."""
    tmp, gp, backing = env
    rng = random.Random(20)
    cfg = _cfg(tmp, gp, backing, rekey_rate=0.5)
    d = Daemon(tmp, cfg)
    try:
        d.wait_for("READY=1")
        ref = _populate(gp, rng, 30)
    finally:
        d.stop()
    total = sum(len(v) for v in ref.values())
    assert total > 5_000_000  # about 10 s at 0.5 MB/s
    assert _keys(tmp, "rotate", "k1").returncode == 0
    killed_running = mid_file = 0
    for rounds in range(1, 80):
        d = Daemon(tmp, cfg)
        try:
            d.wait_for("READY=1")
            _check(gp, ref)  # after the previous kill: whole old or new files
            st = d.jcli("rekey", "status", str(gp))
            if rounds == 1:
                assert st["state"] == "none"
                st = d.jcli("rekey", "start", str(gp))
            else:
                assert st["state"] in ("running", "done"), st  # resumed by itself
            if st["state"] == "done":
                break
            time.sleep(rng.uniform(0.3, 1.2))
            if any(not p.name.startswith(".takakrypt-rekey.state")
                   for p in backing.rglob(".takakrypt-rekey.*")):
                mid_file += 1
            if d.jcli("rekey", "status", str(gp))["state"] == "running":
                killed_running += 1
        finally:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait()
            d.stop()
    assert killed_running >= 10, killed_running
    assert mid_file >= 1, "no kill landed while a file was being copied"
    d = Daemon(tmp, cfg)
    try:
        d.wait_for("READY=1")
        st = until(lambda: (s := d.jcli("rekey", "status", str(gp)))["state"] == "done" and s,
                   120)
        assert st and st["files_failed"] == 0, st
        assert killed_running <= st["runs"] <= killed_running + 1
        _check(gp, ref)
    finally:
        d.stop()
    assert _versions_at_rest(backing) == {2: len(ref)}
    left = [p.name for p in backing.rglob(".takakrypt-rekey.*")
            if p.name != ".takakrypt-rekey.state"]
    assert left == []


# holds a file open for writing across the kill: says "open", waits for a line, writes
# at an offset, fsyncs, says "written"
_HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"WRITTEN AFTER THE KILL", 5000)
os.fsync(fd)
print("written", flush=True)
sys.stdin.readline()
os.close(fd)
"""


def _gp_status(cfg: dict, gp: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "takakrypt", "status", "--json"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"]))
    assert r.returncode == 0, r.stderr
    return next(g for g in json.loads(r.stdout)["guard_points"] if g["path"] == str(gp))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="needs root and /dev/fuse")
@pytest.mark.parametrize("handles", [True, False], ids=["handles", "pinned"])
def test_fd_store_kill_between_exchange_and_repoint(env, handles):
    """The narrowest crash window of a rekey: takakryptd is SIGKILLed right after the
    atomic exchange put the rekeyed copy at the file's name and before the inode was
    pointed at it (TAKAKRYPT_TEST_REKEY_KILL_AT=exchanged), while an application holds
    the file open.  The mount waits in the fd store; the successor must take the object
    the name holds (the shadow record names both, fuse_shadow.c): the application's
    writes after the kill land in the file everyone sees -- not in the old object, which
    is only a leftover temporary by then and is removed.  Also where the backing file
    system gives no file handles (every inode pinned, found again by name)."""
    from handover_helpers import FakeSystemd
    tmp, gp, backing = env
    extra = {} if handles else {"TAKAKRYPT_TEST_NO_HANDLES": "1"}
    cfg = _cfg(tmp, gp, backing)
    data = random.Random(3).randbytes(300_000)
    sd = FakeSystemd(tmp)
    holder = None
    try:
        p = sd.start(tmp, cfg, env={"TAKAKRYPT_TEST_REKEY_KILL_AT": "exchanged", **extra})
        sd.wait_for("READY=1", p)
        (gp / "f").write_bytes(data)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(gp / "f")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"open\n"
        assert _keys(tmp, "rotate", "k1").returncode == 0
        old_ino = os.stat(backing / "f").st_ino
        env_ = dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"])
        subprocess.run([sys.executable, "-m", "takakrypt", "rekey", "start", str(gp)],
                       env=env_, capture_output=True, timeout=60)
        assert p.wait(60) == -signal.SIGKILL  # at the kill point
        # the name holds the rekeyed copy; the old object sits at a temporary name
        assert os.stat(backing / "f").st_ino != old_ino
        assert fmt.parse_header((backing / "f").read_bytes()[:fmt.HEADER_SIZE]).key_version == 2
        p = sd.start(tmp, cfg, log="takakryptd-2.log", env=extra)
        sd.wait_for("READY=1", p)
        stats = _gp_status(cfg, gp)["stats"]
        assert stats["handover_swaps_finished"] == 1
        # pinned: the root and f at least (with handles: the root only)
        assert stats["fds_pinned"] == 1 if handles else stats["fds_pinned"] >= 2, stats
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == b"written\n"
        want = bytearray(data)
        want[5000:5022] = b"WRITTEN AFTER THE KILL"
        assert (gp / "f").read_bytes() == want
        holder.stdin.write(b"close\n")
        holder.stdin.flush()
        assert holder.wait(60) == 0
        assert (gp / "f").read_bytes() == want
        assert until(lambda: json.loads(subprocess.run(
            [sys.executable, "-m", "takakrypt", "rekey", "status", str(gp), "--json"], env=env_,
            capture_output=True, text=True, timeout=60).stdout)["state"] == "done", 60)
        assert [n.name for n in backing.iterdir() if n.name.startswith(".takakrypt-")
                and n.name != ".takakrypt-rekey.state"] == []
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        sd.close()
        subprocess.run(["fusermount3", "-uz", str(gp)], check=False, capture_output=True)
    assert _versions_at_rest(backing) == {2: 1}
    r = subprocess.run([sys.executable, "-m", "takakrypt", "decrypt", "-q", str(backing / "f"),
                        "-"], capture_output=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_KEYSTORE=str(tmp / "keystore.json"),
                                TAKAKRYPT_MASTER_KEY_FILE=str(tmp / "master.key")))
    assert r.returncode == 0 and r.stdout == want, r.stderr
