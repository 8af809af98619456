"""takakryptd serving a real in-place guard point: plaintext for the authorised
process, ciphertext for the backup tool, EACCES for everyone else (root included),
audit events, reload, SIGKILL recovery without a reboot."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from agent_helpers import Daemon, base_config, running, write_config
from takakrypt.cryptofile import TakaFile
from takakrypt.keys import open_keystore

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat"))


def _cfg(tmp_path):
    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir(exist_ok=True)
    os.chmod(gp, 0o777)
    cfg["process_sets"] = {"app": {"executables": [PY]}, "backup": {"executables": [CAT]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"process_set": "backup", "actions": ["read_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "gp", "key": "k1"}]
    return cfg, gp


def _py(code, *args, user=None):
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          user=user)


def _mounted(path):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2].startswith("fuse")
                   for line in f)


def test_views_and_audit(tmp_path):
    cfg, gp = _cfg(tmp_path)
    secret = "the quarterly numbers\n" * 1000
    with running(tmp_path, cfg) as d:
        assert _mounted(gp)
        r = _py("import sys; open(sys.argv[1], 'w').write(sys.argv[2]); "
                "print(open(sys.argv[1]).read() == sys.argv[2])", str(gp / "s.txt"), secret)
        assert r.stdout.strip() == "True", r.stderr
        raw = subprocess.run([CAT, str(gp / "s.txt")], capture_output=True, timeout=30)
        assert raw.returncode == 0 and raw.stdout[:4] == b"TAKA"
        assert secret.encode()[:50] not in raw.stdout
        sh = subprocess.run(["/bin/sh", "-c", f"exec head -c 10 {gp / 's.txt'}"],
                            capture_output=True, timeout=30)
        assert sh.returncode != 0 and b"Permission denied" in sh.stderr  # root, unlisted
        st = json.loads(d.cli("status", "--json", check=False).stdout)
        assert st["guard_points"][0]["mounted"] and st["healthy"], st
        gl = d.jcli("guard", "list")
        assert gl[0]["stats"]["cache_misses"] >= 1
    assert not _mounted(gp)
    # at rest: a TAKA file that the keystore decrypts
    with open_keystore(str(tmp_path / "keystore.json"),
                       master_key_file=str(tmp_path / "master.key")) as ks:
        with TakaFile.open(gp / "s.txt", ks.get) as f:
            assert f.read(0, 10 ** 6).decode() == secret
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    denies = [e for e in events if e["kind"] == "access" and e["decision"] == "deny"]
    assert any(e["exe"].endswith(("sh", "dash", "bash", "head")) for e in denies), denies
    assert all(e["policy"] == "gp" for e in denies)
    backups = [e for e in events if e["kind"] == "access" and e["decision"] == "permit"
               and e["exe"] == CAT]
    assert backups and all(e["key"] is None for e in backups)


def test_nobody_is_denied(tmp_path):
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg):
        _py("import sys; open(sys.argv[1], 'w').write('x')", str(gp / "f"))
        os.chmod(tmp_path, 0o755)
        r = subprocess.run(["/bin/cat", str(gp / "f")], capture_output=True, timeout=30,
                           user=65534, group=65534)
        assert r.returncode != 0 and b"Permission denied" in r.stderr


def test_sigkill_fails_closed_and_restart_recovers(tmp_path):
    cfg, gp = _cfg(tmp_path)
    d = Daemon(tmp_path, cfg)
    try:
        d.wait_for("READY=1")
        _py("import sys; open(sys.argv[1], 'w').write('survives')", str(gp / "f"))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        r = _py("import sys\ntry:\n print(open(sys.argv[1]).read())\nexcept OSError as e:\n"
                " print('err', e.errno)", str(gp / "f"))
        # a dead agent: the mount is gone (ENOTCONN) or the file is ciphertext-only: never
        # plaintext
        assert "survives" not in r.stdout
    finally:
        d.stop()
    d2 = Daemon(tmp_path, cfg)
    try:
        d2.wait_for("READY=1")
        r = _py("import sys; print(open(sys.argv[1]).read())", str(gp / "f"))
        assert r.stdout.strip() == "survives", r.stderr + d2.logtext()
    finally:
        d2.stop()
    assert not _mounted(gp)


def test_reload_removes_and_adds_guard_points(tmp_path):
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        assert _mounted(gp)
        cfg2 = dict(cfg, guard_points=[])
        write_config(d.config_path, cfg2)
        assert d.jcli("reload")["reloaded"]
        assert not _mounted(gp)
        write_config(d.config_path, cfg)
        assert d.jcli("reload")["reloaded"]
        assert _mounted(gp)
        # the backup tool's raw view: no policy hints for the data path
        assert d.jcli("guard", "list")[0]["stats"]["policy_hints"] == 0
        # a reload to a policy without any raw view: regular files' entries may be kept
        plain = dict(cfg, policies={"gp": {"rules": [cfg["policies"]["gp"]["rules"][0],
                                                     cfg["policies"]["gp"]["rules"][-1]]}})
        write_config(d.config_path, plain)
        assert d.jcli("reload")["reloaded"]
        assert d.jcli("guard", "list")[0]["stats"]["policy_hints"] == 1
        r = _py("import sys; open(sys.argv[1], 'w').write('x'); print(open(sys.argv[1]).read())",
                str(gp / "h.txt"))
        assert r.stdout.strip() == "x", r.stderr
        assert subprocess.run([CAT, str(gp / "h.txt")], capture_output=True).returncode != 0


def test_reload_from_a_process_free_policy_to_process_rules(tmp_path):
    # uid rules only: decisions are cached per uid for every process (hint bit 4); the
    # reload to process rules must not let a process inherit another's cached answer
    cfg, gp = _cfg(tmp_path)
    by_uid = dict(cfg, policies={"gp": {"rules": [
        {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}})
    with running(tmp_path, by_uid) as d:
        r = _py("import sys; open(sys.argv[1], 'w').write('x' * 5000); "
                "print(open(sys.argv[1]).read() == 'x' * 5000)", str(gp / "f"))
        assert r.stdout.strip() == "True", r.stderr
        for _ in range(3):  # cat as root: plaintext, answered from the uid's cache
            out = subprocess.run([CAT, str(gp / "f")], capture_output=True, timeout=30)
            assert out.stdout == b"x" * 5000
        st = d.jcli("guard", "list")[0]["stats"]
        assert st["policy_hints"] & 4 and st["ident_skips"] > 0, st
        write_config(d.config_path, cfg)
        assert d.jcli("reload")["reloaded"]
        assert not d.jcli("guard", "list")[0]["stats"]["policy_hints"] & 4
        # the backup view now: the stored bytes, or EACCES while the kernel still keeps
        # the plaintext node's entry (metadata_cache, docs/guard-points.md); never text
        raw = subprocess.run([CAT, str(gp / "f")], capture_output=True, timeout=30)
        assert raw.stdout[:4] == b"TAKA" if raw.returncode == 0 else \
            b"Permission denied" in raw.stderr, raw
        sh = subprocess.run(["/bin/sh", "-c", f"exec head -c 10 {gp / 'f'}"],
                            capture_output=True, timeout=30)
        assert sh.returncode != 0 and b"Permission denied" in sh.stderr
        r = _py("import sys; print(open(sys.argv[1]).read() == 'x' * 5000)", str(gp / "f"))
        assert r.stdout.strip() == "True", r.stderr


def test_rename_and_link_are_decided_by_the_agent(tmp_path):
    # rename/link misses go through the ring with the destination as `target`: the
    # authorised process may, an unlisted process (cat: read_ops only) may not
    cfg, gp = _cfg(tmp_path)
    with running(tmp_path, cfg) as d:
        r = _py("import os, sys\n"
                "d = sys.argv[1]\n"
                "open(d + '/a', 'w').write('payload')\n"
                "os.rename(d + '/a', d + '/b')\n"
                "os.link(d + '/b', d + '/c')\n"
                "print(open(d + '/c').read())", str(gp))
        assert r.stdout.strip() == "payload", r.stderr + d.logtext()
        mv = subprocess.run(["/bin/mv", str(gp / "b"), str(gp / "moved")], capture_output=True,
                            timeout=30)
        assert mv.returncode != 0 and b"Permission denied" in mv.stderr
        assert sorted(os.listdir(gp)) == ["b", "c"]
        st = d.jcli("guard", "list")[0]["stats"]
        assert st["ring_requests"] >= 4 and st["ops"]["rename"] >= 2 and st["ops"]["link"] >= 2
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "access" and e["operation"] == "rename" and e["decision"] == "deny"
               for e in events), [e for e in events if e.get("operation") == "rename"]
