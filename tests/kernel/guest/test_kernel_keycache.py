"""The key cache on ``engine: kernel`` guard points (docs/keys.md, "Key cache and offline
operation"; docs/kernel.md, "Keys"): takakryptd against the real module, the real local
keystore made unavailable (moved away, damaged) as the failing backend.

* mid-run, past ``cache_ttl``: the module's copies of the keys are wiped too (a
  CONFIG_UPDATE with the guard point closed), so a file held open cannot be read past
  the page cache and no file can be made; the keystore back, the guard point opens by
  itself and the same files read again;
* down at start: the kernel guard point mounts closed (no key served), and opens when
  the keystore answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent_helpers import HOLD_READER as HOLD
from agent_helpers import base_config, until
from test_agent_engine import _read, _write, running

PY = os.path.realpath(sys.executable)



def _cfg(tmp: Path, **keys) -> tuple[dict, Path]:
    cfg = base_config(tmp)
    gp = tmp / "gp"
    gp.mkdir(exist_ok=True)
    cfg["policies"] = {"p": {"rules": [{"user_set": "root", "actions": ["all_ops"],
                                        "effects": ["permit", "apply_key"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1", "engine": "kernel"}]
    cfg["keys"].update(keys)
    return cfg, gp


def _try(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=120)


def _failed_read(path: Path) -> bool:
    r = _try("import sys; sys.stdout.write(open(sys.argv[1]).read())", str(path))
    return r.returncode != 0 and ("Input/output error" in r.stderr
                                  or "Permission denied" in r.stderr)


def _failed_create(path: Path) -> bool:
    r = _try("import sys; open(sys.argv[1], 'w').write('x')", str(path))
    return r.returncode != 0 and ("Input/output error" in r.stderr
                                  or "Permission denied" in r.stderr
                                  or "Required key not available" in r.stderr)


def _status(d) -> dict:
    return json.loads(d.cli("status", "--json", check=False).stdout)


def _reasons(tmp: Path, kind: str) -> list[str]:
    return [e["reason"] for e in (json.loads(x) for x in
                                  (tmp / "audit.jsonl").read_text().splitlines())
            if e["kind"] == kind]


def test_kernel_keys_wiped_past_the_ttl_then_back(scratch):
    cfg, gp = _cfg(scratch, cache_ttl=3, cache_revalidate=0.5)
    ks = scratch / "keystore.json"
    with running(scratch, cfg) as d:
        _write(gp / "a.txt", "held")
        assert _read(gp / "a.txt") == "held"
        holder = subprocess.Popen([PY, "-c", HOLD, str(gp / "a.txt")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "open"
        os.rename(ks, scratch / "keystore.away")
        try:
            # past the TTL the agent drops the key and closes the guard point: the
            # module's keys go with it, so a cold read fails (never hangs)
            assert until(lambda: "closed" in str(_status(d)["keys"]["closed"]), timeout=120)
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            assert until(lambda: _failed_read(gp / "a.txt"), timeout=60)
            assert _failed_create(gp / "b.txt")
            out, _ = holder.communicate("\n", timeout=60)
            assert out.strip() == "errno 5", out  # EIO: the module's copy is gone
            st = _status(d)
            assert st["guard_points"][0]["closed"], st["guard_points"]
            assert st["kernel"]["status"] is not None, st["kernel"]
        finally:
            os.rename(scratch / "keystore.away", ks)
        # the next probe reopens the keystore: open by itself (a status right after a
        # slow failed probe answers from it, PROBE_RETRY; the health loop probes every 10 s)
        assert until(lambda: (k := _status(d)["keys"])["available"] and not k["closed"],
                     timeout=60), _status(d)["keys"]
        assert until(lambda: not _failed_read(gp / "a.txt"), timeout=60)
        assert _read(gp / "a.txt") == "held"
        _write(gp / "b.txt", "new")
        assert _read(gp / "b.txt") == "new"
    guard = _reasons(scratch, "guard-point")
    assert any("closed" in r for r in guard) and any("open again" in r for r in guard), guard
    assert "dropped and wiped" in " ".join(_reasons(scratch, "key-cache"))


def test_kernel_guard_point_down_at_start_is_closed_until_the_keystore_answers(scratch):
    cfg, gp = _cfg(scratch)
    with running(scratch, cfg):
        _write(gp / "a.txt", "before")
    ks = scratch / "keystore.json"
    good = ks.read_bytes()
    ks.write_bytes(b"{ damaged")
    with running(scratch, cfg) as d:  # READY=1: mounted, closed
        assert _failed_read(gp / "a.txt")
        assert _failed_create(gp / "b.txt")
        st = _status(d)
        assert st["guard_points"][0]["mounted"] and st["guard_points"][0]["closed"], st
        ks.write_bytes(good)
        # open by itself at the next probe (under TCG a failed probe can take over
        # SLOW_PROBE, and a status within PROBE_RETRY of it answers from it)
        assert until(lambda: not _status(d)["keys"]["closed"], timeout=60), \
            _status(d)["keys"]
        assert until(lambda: not _failed_read(gp / "a.txt"), timeout=60)
        assert _read(gp / "a.txt") == "before"


def test_kernel_rotation_usage_and_retire(scratch):
    """Rotation on a kernel guard point (docs/operations.md, "Rotating keys and live
    rekey"): a new file, a file truncated to 0 and a rewritten block of a TAKA v2 file
    (the default format) take the new version at once; `keys versions --usage` counts
    the files per version through the in-place mount (takakryptd, the module's agent,
    is given the stored bytes there, so it reads the headers); `keys retire` refuses a
    version still in use; a live rekey (in place, docs/kernel.md "Live rekey") leaves
    no file on the old version, which can then be retired."""
    cfg, gp = _cfg(scratch)
    ks = ("--keystore", str(scratch / "keystore.json"), "--master-key-file",
          str(scratch / "master.key"))
    with running(scratch, cfg) as d:
        for i in range(3):
            (gp / f"old{i}").write_text(f"old {i}")
        os.sync()  # stored under version 1 (a block first stored after it would be on 2)
        r = d.cli("keys", "rotate", "k1", *ks, "--json")
        assert json.loads(r.stdout)["current_version"] == 2
        (gp / "new").write_text("new")
        os.sync()
        use = json.loads(d.cli("keys", "versions", "k1", "--usage", str(gp), *ks,
                               "--json").stdout)
        assert [(v["version"], v["files"]) for v in use["versions"]] == [(1, 3), (2, 1)], use
        r = d.cli("keys", "retire", "k1", "--version", "1", "--usage", str(gp), *ks,
                  check=False)
        assert r.returncode == 18 and "still in use" in r.stderr, (r.returncode, r.stderr)
        # reading the headers changed nothing: the files read as written
        assert [(gp / f"old{i}").read_text() for i in range(3)] == ["old 0", "old 1", "old 2"]
        assert (gp / "new").read_text() == "new"
        # a truncate to 0 (O_TRUNC, or a size of 0) puts a file on the current version;
        # a truncate to another size rewrites the new last block, which moves a v2 file
        # (its untouched blocks -- none here -- would keep 1: it counts under both)
        (gp / "old0").write_text("rewritten")
        os.truncate(gp / "old1", 0)
        os.truncate(gp / "old2", 2)
        os.sync()
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert [(gp / f"old{i}").read_text() for i in range(3)] == ["rewritten", "", "ol"]
        use = json.loads(d.cli("keys", "versions", "k1", "--usage", str(gp), *ks,
                               "--json").stdout)
        assert [(v["version"], v["files"]) for v in use["versions"]] == [(1, 1), (2, 4)], use
        # the rekey: nothing is left on version 1, which can go
        d.cli("rekey", "start", str(gp), "--wait", timeout=600)
        use = json.loads(d.cli("keys", "versions", "k1", "--usage", str(gp), *ks,
                               "--json").stdout)
        assert [(v["version"], v["files"]) for v in use["versions"] if v["files"]] == [
            (2, 4)], use
        r = d.cli("keys", "retire", "k1", "--version", "1", "--usage", str(gp), *ks,
                  check=False)
        assert r.returncode == 0, (r.returncode, r.stderr)
        assert [(gp / f"old{i}").read_text() for i in range(3)] == ["rewritten", "", "ol"]
        assert (gp / "new").read_text() == "new"
