"""``engine: kernel`` guard points served by takakryptd against the real module:
takakryptd mounts takakryptfs in place itself (nothing here mounts with decide=none),
lists and reports it, reuses the mount a killed takakryptd left, switches engines on a
reload without re-encrypting, unmounts and wipes at stop, and refuses to start such a
guard point while the module is not loaded (no FUSE, no bare directory instead)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

import agent_helpers
import genl_raw as R
from agent_helpers import base_config, until
from conftest import delete_module, insmod, loaded
from taka_kernel import family, status

PY = os.path.realpath(sys.executable)


def _cfg(tmp: Path, engines: tuple[str, ...] = ("kernel",)) -> dict:
    cfg = base_config(tmp)
    cfg["policies"] = {"p": {"rules": [
        {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    gps = []
    for i, engine in enumerate(engines):
        d = tmp / f"gp{i}"
        d.mkdir(exist_ok=True)
        gps.append({"path": str(d), "policy": "p", "key": "k1", "engine": engine})
    cfg["guard_points"] = gps
    return cfg


def _start(tmp: Path, cfg: dict, ready: bool = True) -> agent_helpers.Daemon:
    """takakryptd with a start-up allowance for TCG (imports over 9p are slow)."""
    d = agent_helpers.Daemon(tmp, cfg)
    d.notify.settimeout(240)
    if ready:
        try:
            d.wait_for("READY=1", timeout=300)
        except BaseException:
            d.stop()
            raise
    return d


@contextlib.contextmanager
def running(tmp: Path, cfg: dict):
    d = _start(tmp, cfg)
    try:
        yield d
    finally:
        d.stop()


def _mounts(path: Path, flags: bool = False) -> list[tuple]:
    """(mount id, fstype, source, super options[, mount flags]) of the mounts at ``path``,
    bottom first."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(" "), right.split(" ")
        if f[4] == str(path):
            out.append((int(f[0]), r[0], r[1], r[2], *([f[5]] if flags else [])))
    return out


def _py(code: str, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """A client in a child process (never the serving one)."""
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, user=user)


def _write(path: Path, text: str) -> None:
    r = _py("import os, sys\nwith open(sys.argv[1], 'w') as f:\n    f.write(sys.argv[2])\n"
            "    f.flush(); os.fsync(f.fileno())", str(path), text)
    assert r.returncode == 0, r.stderr


def _read(path: Path) -> str:
    r = _py("import sys; sys.stdout.write(open(sys.argv[1]).read())", str(path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def _decrypt(tmp: Path, stored: Path) -> bytes:
    from takakrypt.keys import open_keystore
    from takakrypt.stream import decrypt_file

    out = tmp / "plain.out"
    out.unlink(missing_ok=True)
    with open_keystore(str(tmp / "keystore.json"), master_key_file=str(tmp / "master.key")) as ks:
        decrypt_file(str(stored), str(out), ks.get)
    return out.read_bytes()


def _gl(d) -> dict:
    return {g["path"]: g for g in d.jcli("guard", "list")}


_until = until


def test_kernel_guard_point_mounted_listed_reported_released(scratch):
    cfg = _cfg(scratch, ("kernel", "fuse"))
    k, f = scratch / "gp0", scratch / "gp1"
    with R.Genl() as g, running(scratch, cfg) as d:
        fid = family(g)
        at = _mounts(k)
        assert [(t, s) for _i, t, s, _o in at] == [("takakryptfs", str(k))], at
        opts = dict(x.partition("=")[::2] for x in at[0][3].split(","))
        assert (opts["key"], opts["gp"], opts.get("decide", "agent")) == ("k1", "1", "agent")
        assert {"nosuid", "nodev"} <= set(_mounts(k, flags=True)[0][4].split(","))
        assert [t for _i, t, _s, _o in _mounts(f)] == ["fuse.takakrypt"]
        gl = _gl(d)
        assert gl[str(k)]["engine"] == "kernel" and gl[str(k)]["mounted"], gl
        assert gl[str(k)]["mount"] == {"source": str(k), "options": "key=k1,gp=1,format=2",
                                       "reused": False}
        assert gl[str(f)]["engine"] == "fuse" and gl[str(f)]["mounted"]
        text = d.cli("guard", "list").stdout
        assert f"{k}" in text and "engine kernel" in text and "engine fuse" in text
        # data through the mount, as takakryptd mounted it
        _write(k / "a.txt", "through takakryptfs\n")
        assert _read(k / "a.txt") == "through takakryptfs\n"
        # status and metrics: the module's counters, v2 ones included
        st = d.jcli("status")
        kern = st["kernel"]
        assert kern["loaded"] and kern["registered"] and kern["error"] is None, kern
        ks = kern["status"]
        assert ks["enforcer"] == "kernel" and ks["agent_connected"] and \
            ks["guard_point_count"] == 2, ks
        for field in ("requests_sent", "requests_timed_out", "cache_hits", "cache_misses",
                      "cache_entries", "cache_capacity", "fail_closed_denials",
                      "policy_denials", "integrity_errors", "audit_events", "audit_drops"):
            assert isinstance(ks[field], int), field
        assert ks["requests_sent"] >= 1   # at least the key of a.txt
        assert st["healthy"], st["problems"]
        assert "kernel:      takakryptfs " in d.cli("status").stdout
        port = cfg["agent"]["metrics"]["port"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) \
            .read().decode()
        assert "takakrypt_kernel_requests_sent_total" in metrics
        assert "takakrypt_kernel_policy_denials_total" in metrics
        # config check on this machine: loaded, and the mount it makes
        chk = json.loads(d.cli("config", "check", "--json", str(d.config_path)).stdout)
        mod = {e["path"]: e for e in chk["engines"]}[str(k)]["module"]
        assert mod["state"] == "loaded", mod
        assert f"-o key=k1,gp=1,format=2 {k} {k}" in mod["takakryptd"]
    # stopped: unmounted (both engines), keys wiped in the module
    assert _mounts(k) == [] and _mounts(f) == []
    with R.Genl() as g:
        st = status(g, fid)
        assert st.agent_connected == 0 and st.guard_point_count == 0
    raw = (k / "a.txt").read_bytes()
    assert raw[:4] == b"TAKA" and b"through takakryptfs" not in raw
    assert _decrypt(scratch, k / "a.txt") == b"through takakryptfs\n"
    audit = [json.loads(x) for x in (scratch / "audit.jsonl").read_text().splitlines()]
    assert [e["detail"] for e in audit if e["kind"] == "guard-point" and e["path"] == str(k)
            and e["reason"] == "guard point mounted"] == \
        [{"policy": "p", "engine": "kernel", "options": "key=k1,gp=1,format=2"}]


def test_killed_takakryptd_mount_is_reused(scratch):
    """... with the keys kept for the guard point's key_grace (mount option grace=)."""
    cfg = _cfg(scratch)
    cfg["guard_points"][0]["key_grace"] = 600
    k = scratch / "gp0"
    d = _start(scratch, cfg)
    try:
        _write(k / "b.txt", "before the kill\n")
        first = _mounts(k)
        assert [t for _i, t, _s, _o in first] == ["takakryptfs"]
        assert "grace=600" in first[0][3].split(","), first
        mark = len(_kmsg_since(0))
    finally:
        d.stop(sig=signal.SIGKILL)
    assert _mounts(k) == first   # no one unmounted it
    d = _start(scratch, cfg)
    try:
        assert _mounts(k) == first   # the same mount (id), not a second one on top
        gl = _gl(d)[str(k)]
        assert gl["mounted"] and gl["mount"]["reused"] is True, gl
        assert "the takakryptfs mount was there already" in d.logtext()
        assert _read(k / "b.txt") == "before the kill\n"   # keys served again
        assert d.jcli("status")["healthy"]
        log = _kmsg_since(mark)
        assert "agent left" in log and "keys wiped" not in log, log   # within the grace
    finally:
        d.stop()
    assert _mounts(k) == []


def test_reload_switches_the_engine_without_reencrypting(scratch):
    cfg = _cfg(scratch, ("fuse",))
    k = scratch / "gp0"
    with running(scratch, cfg) as d:
        assert [t for _i, t, _s, _o in _mounts(k)] == ["fuse.takakrypt"]
        _write(k / "c.txt", "written by FUSE\n")

        def reload(engine: str) -> None:
            cfg["guard_points"][0]["engine"] = engine
            d.config_path.write_text(yaml.safe_dump(cfg))
            d.cli("reload", timeout=240)

        reload("kernel")
        assert [t for _i, t, _s, _o in _mounts(k)] == ["takakryptfs"], _mounts(k)
        assert _gl(d)[str(k)]["engine"] == "kernel"
        assert _read(k / "c.txt") == "written by FUSE\n"
        _write(k / "d.txt", "written by takakryptfs\n")
        reload("fuse")
        assert [t for _i, t, _s, _o in _mounts(k)] == ["fuse.takakrypt"], _mounts(k)
        assert _read(k / "d.txt") == "written by takakryptfs\n"
        assert _read(k / "c.txt") == "written by FUSE\n"
    assert _mounts(k) == []
    assert _decrypt(scratch, k / "d.txt") == b"written by takakryptfs\n"


def test_module_not_loaded_refuses_then_reload_mounts(scratch):
    cfg = _cfg(scratch)
    k = scratch / "gp0"
    assert loaded() and delete_module() == 0
    try:
        d = _start(scratch, cfg, ready=False)
        try:
            def error():
                try:
                    return _gl(d).get(str(k), {}).get("error")
                except AssertionError:  # no control socket yet
                    return None

            gl = _until(error, 300)
            assert "modprobe takakryptfs" in gl and "never falls back to FUSE" in gl, gl
            assert _mounts(k) == []   # neither FUSE nor anything else instead
            st = json.loads(d.cli("status", "--json", check=False).stdout)
            assert not st["healthy"] and st["kernel"]["loaded"] is False
            insmod()
            d.cli("reload", timeout=240)
            assert [t for _i, t, _s, _o in _mounts(k)] == ["takakryptfs"], _mounts(k)
            assert _gl(d)[str(k)]["error"] is None
            assert d.wait_for("READY=1", timeout=60)   # every guard point served now
        finally:
            d.stop()
        assert _mounts(k) == []
    finally:
        if not loaded():
            insmod()


def _param(name: str, value: str | None = None) -> str:
    p = Path(f"/sys/module/takakryptfs/parameters/{name}")
    if value is not None:
        p.write_text(value)
    return p.read_text().strip()


def _kmsg_since(mark: int) -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout[mark:]


def test_hung_takakryptd_is_disconnected_by_health_checks_then_answers_again(scratch):
    """A takakryptd that stops answering (SIGSTOP: its socket stays open, so the kernel
    sees no departure) misses health_misses HEALTH_CHECKs and is marked disconnected:
    access is denied at once (no 5 s wait per request), the keys are wiped (grace 0);
    SIGCONT: the next check is answered, access resumes, keys are fetched again."""
    assert _param("health_interval") == "60" and _param("health_misses") == "3"  # defaults
    cfg = _cfg(scratch)
    k = scratch / "gp0"
    _param("health_interval", "1")
    d = _start(scratch, cfg)
    stopped = False
    try:
        with R.Genl() as g:
            fid = family(g)
            _write(k / "h.txt", "held by a hung agent\n")
            assert _read(k / "h.txt") == "held by a hung agent\n"
            mark = len(subprocess.run(["dmesg"], capture_output=True, text=True).stdout)
            assert status(g, fid).agent_connected == 1
            os.kill(d.proc.pid, signal.SIGSTOP)
            stopped = True
            # 3 checks of up to 5 s each, 1 s apart: documented as interval + misses x 5 s
            st = _until(lambda: (s := status(g, fid)).agent_connected == 0 and s, 90, 0.5)
            assert st and st.agent_connected == 0, "never marked disconnected"
            log = _kmsg_since(mark)
            assert "missed 3 health checks in a row" in log and "disconnected" in log, log
            # the checks go on while it is disconnected (each waits its 5 s, a timeout
            # too): stop them, and let one in flight end, so that what follows counts the
            # accesses alone
            _param("health_interval", "0")
            st = _until(lambda: (s := status(g, fid)).pending_requests == 0 and s, 30, 0.2)
            assert st, "a request stayed pending"
            timed_out = st.requests_timed_out
            denied = st.fail_closed_denials
            # a decision cached before the hang stands until its TTL, but the key is gone
            # (grace 0): EIO; a decision not cached: EACCES
            r = _py("import sys; open(sys.argv[1]).read()", str(k / "h.txt"))
            assert r.returncode != 0 and ("PermissionError" in r.stderr or
                                          "Input/output error" in r.stderr), r
            assert "held by a hung agent" not in r.stdout
            r = _py("import sys; open(sys.argv[1], 'w').write('x')", str(k / "new.txt"))
            assert r.returncode != 0 and ("PermissionError" in r.stderr or
                                          "Input/output error" in r.stderr), r
            # another uid: not cached, a question the disconnected agent is not asked
            r = subprocess.run(["cat", str(k / "h.txt")], capture_output=True, text=True,
                               timeout=120, user="nobody")
            assert r.returncode != 0 and "Permission denied" in r.stderr, r
            st = status(g, fid)
            # denied without asking the hung agent: no request timed out meanwhile
            assert st.requests_timed_out == timed_out, (timed_out, st)
            assert st.fail_closed_denials >= denied + 1, (denied, st)
            assert [t for _i, t, _s, _o in _mounts(k)] == ["takakryptfs"]   # still mounted
            os.kill(d.proc.pid, signal.SIGCONT)
            stopped = False
            _param("health_interval", "1")  # the next check is answered: reconnected
            st = _until(lambda: (s := status(g, fid)).agent_connected == 1 and s, 90, 0.5)
            assert st and st.agent_connected == 1, "never reconnected"
            assert "answers again: reconnected" in _kmsg_since(mark)
            sent = st.requests_sent
            assert _read(k / "h.txt") == "held by a hung agent\n"   # key fetched again
            r = _py("import os, sys; os.stat(sys.argv[1])", str(k / "new.txt"))
            assert "FileNotFoundError" in r.stderr, r   # no file was made without the key
            assert status(g, fid).requests_sent > sent
        assert d.jcli("status")["healthy"]
    finally:
        if stopped:
            os.kill(d.proc.pid, signal.SIGCONT)
        _param("health_interval", "60")
        d.stop()
    assert _param("health_interval") == "60"


def test_process_free_policy_is_cached_once_for_every_process_of_a_user(scratch):
    """A policy naming no process set answers ANY_PROCESS: the module caches it under uid
    and gid, so another program of the same user is served without asking; another uid
    is still asked (and denied)."""
    cfg = _cfg(scratch)
    k = scratch / "gp0"
    with R.Genl() as g, running(scratch, cfg) as d:
        fid = family(g)
        _write(k / "pf.txt", "one question per user\n")
        assert _read(k / "pf.txt") == "one question per user\n"     # python: asked
        before = status(g, fid)
        for argv in (["cat", str(k / "pf.txt")], ["head", "-c", "3", str(k / "pf.txt")],
                     ["dd", f"if={k / 'pf.txt'}", "bs=4096", "status=none"]):
            r = subprocess.run(argv, capture_output=True, timeout=120)
            assert r.returncode == 0 and r.stdout, (argv, r)
            assert b"one question per user\n".startswith(r.stdout), (argv, r)
        after = status(g, fid)
        assert after.cache_misses == before.cache_misses, (before, after)
        assert after.cache_hits > before.cache_hits
        r = subprocess.run(["cat", str(k / "pf.txt")], capture_output=True, timeout=120,
                           user="nobody")
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        assert status(g, fid).cache_misses > after.cache_misses   # another uid: asked
        assert d.jcli("status")["healthy"]


def test_unsynced_writes_survive_a_kill_and_the_file_opens_again(scratch):
    """A file written without fsync when takakryptd is SIGKILLed (grace 0: keys wiped,
    its pages stay dirty, write-back fails for want of a key) is stored once the next
    takakryptd serves the key, and opening it again with O_TRUNC works: the failed
    write-back is fsync's error, not a later truncate's (found under systemd: `systemctl
    restart` then a rewrite failed with EIO)."""
    cfg = _cfg(scratch)
    k = scratch / "gp0"
    rewrite = ("import sys; open(sys.argv[1], 'w').write(sys.argv[2]); "
               "print(open(sys.argv[1]).read() == sys.argv[2])")
    d = _start(scratch, cfg)
    try:
        r = _py(rewrite, str(k / "u.txt"), "not synced\n" * 300)
        assert r.stdout.strip() == "True", r
    finally:
        d.stop(sig=signal.SIGKILL)
    with running(scratch, cfg):
        assert _read(k / "u.txt") == "not synced\n" * 300   # stored now, intact
        r = _py(rewrite, str(k / "u.txt"), "written again\n")
        assert r.stdout.strip() == "True", r
        # the failed write-back is reported once, to the first fsync after it (Linux's
        # errseq rule: an error nobody saw goes to the next fsync, even on a new open);
        # then fsync is clean
        r = _py("import os, sys\nf = os.open(sys.argv[1], os.O_RDWR)\ntry:\n"
                "    os.fsync(f)\nexcept OSError as e:\n    print(e.errno)\nos.fsync(f)",
                str(k / "u.txt"))
        assert r.returncode == 0 and r.stdout.strip() in ("", "5"), r
    assert _decrypt(scratch, k / "u.txt") == b"written again\n"
