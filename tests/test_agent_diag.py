"""Diagnostics that tell the truth (issue 15, items 9, 10, 12, 14), through a real
takakryptd serving a real guard point: a guard point whose key is missing, a keystore
that goes away for a while, the fields of guard-point audit records, ``keys rotate``
reaching a running agent."""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

from agent_helpers import base_config, running, write_config
from takakrypt.format import parse_header
from takakrypt.keys import open_keystore

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat"))


def _policy(learn=False):
    return {"learn_mode": learn, "rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key", "audit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}


def _cfg(tmp_path, *names, key="k1", ttl=None):
    cfg = base_config(tmp_path)
    cfg["process_sets"] = {"app": {"executables": [PY]}}
    cfg["policies"] = {"enf": _policy(), "learn": _policy(learn=True)}
    cfg["guard_points"] = []
    for name in names or ("guarded",):
        gp = tmp_path / name
        gp.mkdir(exist_ok=True)
        os.chmod(gp, 0o777)
        cfg["guard_points"].append({"path": str(gp), "key": key,
                                    "policy": "learn" if name.startswith("learn") else "enf"})
    if ttl is not None:
        cfg["agent"]["cache"] = {"ttl_seconds": ttl}
    return cfg


def _py(code, *args):
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=60)


WRITE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
READ = "import sys; print(open(sys.argv[1]).read(), end='')"


def _events(tmp_path):
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]


# item 9 ---------------------------------------------------------------------------------

def _drop_key(tmp_path, name):
    """The keystore loses key ``name`` while the agent runs (an older copy restored by
    an admin tool, say): written as the keystore writes itself, MAC and generation."""
    import msgspec

    with open_keystore(str(tmp_path / "keystore.json"),
                       master_key_file=str(tmp_path / "master.key")) as ks:
        ks._update(lambda doc, keys: (msgspec.structs.replace(
            doc, keys=[r for r in doc.keys if r.name != name]), None))


def test_guard_point_whose_key_goes_missing_is_unhealthy_and_audited_with_the_key(tmp_path):
    cfg = _cfg(tmp_path, key="nokey")
    with open_keystore(str(tmp_path / "keystore.json"),
                       master_key_file=str(tmp_path / "master.key")) as ks:
        ks.create("nokey")
    gp = tmp_path / "guarded"
    with running(tmp_path, cfg) as d:
        _drop_key(tmp_path, "nokey")
        r = _py("import os, sys; os.listdir(sys.argv[1])", str(gp))
        assert "Permission denied" in r.stderr
        st = d.cli("status", "--json", check=False)
        assert st.returncode == 1
        st = json.loads(st.stdout)
        assert not st["healthy"] and st["state"] == "unhealthy"
        assert st["health"][f"guard:{gp}"] is False
        assert "'nokey' not found" in st["problems"][f"guard:{gp}"]
        assert "'nokey' not found" in st["guard_points"][0]["error"]
        text = d.cli("status", check=False).stdout
        assert "'nokey' not found" in text
        pc = d.jcli("policy", "check", "--user", "root", "--exe", PY, "--path",
                    str(gp / "x"), "--op", "read")
        assert pc["decision"] == "deny" and "'nokey' not found" in pc["explanation"][-1], pc
        agent_pid = d.proc.pid  # the agent's own look at its mount is not the point here
    denies = [e for e in _events(tmp_path) if e["kind"] == "access" and e["pid"] != agent_pid
              and e["decision"] == "deny" and e["path"] == str(gp)]
    assert denies and all("key 'nokey' not found" in e["reason"] for e in denies), denies


# item 10 --------------------------------------------------------------------------------

def test_keystore_away_held_keys_served_degraded_breaker_open_then_recovers(tmp_path):
    cfg = _cfg(tmp_path, ttl=0.001)  # decisions expire at once: accesses ask the agent
    f = tmp_path / "guarded" / "a.txt"
    ks = tmp_path / "keystore.json"
    with running(tmp_path, cfg) as d:
        assert _py(WRITE, str(f), "held\n").returncode == 0
        assert _py(READ, str(f)).stdout == "held\n"
        assert d.jcli("status")["state"] == "healthy"
        os.rename(ks, tmp_path / "keystore.away")
        try:
            for _ in range(8):  # each status probes the backend: failures open the breaker
                r = _py(READ, str(f))
                assert r.returncode == 0 and r.stdout == "held\n", r.stderr
                st = json.loads(d.cli("status", "--json", check=False).stdout)
                assert st["state"] == "degraded", st
                assert "disappeared" in st["problems"]["key_backend"]
            assert st["key_backend"]["state"] == "open", st
            assert _py(READ, str(f)).stdout == "held\n"  # still served, breaker open
        finally:
            os.rename(tmp_path / "keystore.away", ks)
        st = d.jcli("status")
        assert st["state"] == "healthy" and st["healthy"], st
        assert st["key_backend"]["state"] == "closed"
        assert _py(READ, str(f)).stdout == "held\n"


# item 12 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One agent, an enforcing and a learn-mode guard point, a few accesses; the JSON
    audit records of each (pid, path, operation)."""
    tmp = tmp_path_factory.mktemp("audit")
    cfg = _cfg(tmp, "guarded", "learnt")
    pids = {}
    with running(tmp, cfg):
        for gp in ("guarded", "learnt"):
            r = _py("import os, sys; open(sys.argv[1], 'w').write('x'); print(os.getpid())",
                    str(tmp / gp / "a.txt"))
            assert r.returncode == 0, r.stderr
            pids[gp, "app"] = int(r.stdout)
            p = subprocess.Popen([CAT, str(tmp / gp / "a.txt")], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            p.communicate(timeout=30)
            pids[gp, "cat"] = p.pid
    events = [e for e in _events(tmp) if e["kind"] == "access"]
    return tmp, pids, events


def _one(audited, gp, who, op):
    tmp, pids, events = audited
    found = [e for e in events if e["pid"] == pids[gp, who] and op in (None, e["operation"])
             and e["path"] in (str(tmp / gp), str(tmp / gp / "a.txt"))]
    assert found, (gp, who, op, events)
    return found


def test_audit_rule_is_the_matching_rule(audited):
    assert [e["rule"] for e in _one(audited, "guarded", "app", "create")] == [0]
    assert {e["rule"] for e in _one(audited, "guarded", "cat", None)} == {1}


def test_audit_key_version_of_a_decision_that_applies_the_key(audited):
    assert all(e["key"] == "k1" and e["key_version"] == 1
               for e in _one(audited, "guarded", "app", "create"))
    assert all(e["key_version"] is None for e in _one(audited, "guarded", "cat", None))


def test_audit_latency_is_measured(audited):
    for who, op in (("app", "create"), ("cat", None)):
        assert all(e["latency_us"] > 0 for e in _one(audited, "guarded", who, op))


def test_audit_learn_mode_is_the_policys(audited):
    learnt = _one(audited, "learnt", "cat", None)
    assert all(e["learn_mode"] and e["decision"] == "would-deny" for e in learnt), learnt
    assert all(e["learn_mode"] for e in _one(audited, "learnt", "app", "create"))
    assert not any(e["learn_mode"] for e in _one(audited, "guarded", "cat", None))


def test_audit_each_access_is_logged_once(audited):
    _, _, events = audited
    seen = collections.Counter((e["pid"], e["path"], e["operation"]) for e in events
                               if e["path"].endswith("a.txt"))
    assert seen and max(seen.values()) == 1, seen


# item 14 --------------------------------------------------------------------------------

def test_keys_rotate_reaches_the_running_agent(tmp_path):
    cfg = _cfg(tmp_path)
    gp = tmp_path / "guarded"
    with running(tmp_path, cfg) as d:
        assert _py(WRITE, str(gp / "v1.txt"), "one").returncode == 0
        r = d.cli("keys", "rotate", "k1", "--keystore", str(tmp_path / "keystore.json"),
                  "--master-key-file", str(tmp_path / "master.key"))
        assert "use version 2" in r.stdout and "new files" in r.stdout
        assert "re-read the keystore" in r.stdout
        assert _py(WRITE, str(gp / "v2.txt"), "two").returncode == 0
        assert _py(READ, str(gp / "v1.txt")).stdout == "one"
        assert _py(READ, str(gp / "v2.txt")).stdout == "two"
    assert parse_header((gp / "v1.txt").read_bytes()).key_version == 1
    assert parse_header((gp / "v2.txt").read_bytes()).key_version == 2


# item 11 --------------------------------------------------------------------------------

def _both(tmp_path, cfg, *, start=True):
    """(exit status, stderr) of `takakrypt config check` and of a takakryptd start (one
    that must fail)."""
    path = tmp_path / "check.yaml"
    write_config(path, cfg)
    check = subprocess.run([sys.executable, "-m", "takakrypt", "config", "check", str(path)],
                           capture_output=True, text=True, timeout=60)
    if not start:
        return check, None
    start = subprocess.run([sys.executable, "-m", "takakrypt.agent.daemon", "--config", str(path),
                            "--foreground"], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    return check, start


def _creds(cfg, **local):
    cfg["keys"] = {"backend": "local", "local": local}
    return cfg


@pytest.mark.parametrize("case, message", [
    ("no-credentials", "$.keys.local: give exactly one of passphrase_file or master_key_file"),
    ("kmip", "$.keys.kmip.ca_file: required: the KMIP backend needs mutual TLS"),
    ("no-directory", "$.guard_points[0].path: {tmp}/nowhere does not exist"),
    ("unknown-key", "$.guard_points[0].key: key 'nokey' not found in the key backend"),
])
def test_config_check_and_the_daemon_refuse_the_same(tmp_path, case, message):
    cfg = _cfg(tmp_path)
    if case == "no-credentials":
        _creds(cfg, path=str(tmp_path / "keystore.json"))
    elif case == "kmip":
        cfg["keys"] = {"backend": "kmip", "kmip": {"host": "kms.example"}}
    elif case == "no-directory":
        cfg["guard_points"][0]["path"] = str(tmp_path / "nowhere")
    else:
        cfg["guard_points"][0]["key"] = "nokey"
    message = message.format(tmp=tmp_path)
    check, start = _both(tmp_path, cfg)
    assert check.returncode == 3 and message in check.stderr, check.stderr
    assert start.returncode == 3 and message in start.stderr, start.stderr
    assert "Traceback" not in check.stderr + start.stderr


def test_config_check_reports_every_error_in_one_run(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["policies"]["enf"]["rules"][0]["actionz"] = ["read"]          # decoding
    cfg["policies"]["learn"]["rules"][0]["effects"] = ["alow"]        # meaning
    cfg["agent"]["request_timeoutt"] = 3                              # top-level field
    cfg["guard_points"].append({"path": str(tmp_path / "nowhere"), "policy": "learn",
                                "key": "k1"})                         # this machine
    check, start = _both(tmp_path, cfg)
    for out in (check.stderr, start.stderr):
        assert "$.policies.enf.rules[0].actionz: unknown field" in out, out
        assert "$.policies.learn.rules[0].effects[0]: unknown effect 'alow'" in out, out
        assert "$.agent.request_timeoutt: unknown field" in out, out
        assert "unknown policy 'enf'" not in out  # no echo of a policy that failed to decode
    assert check.returncode == start.returncode == 3


def test_config_check_checks_the_machine_when_the_file_is_valid(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["guard_points"].append({"path": str(tmp_path / "nowhere"), "policy": "learn",
                                "key": "nokey"})
    check, start = _both(tmp_path, cfg)
    for out in (check.stderr, start.stderr):
        assert f"$.guard_points[1].path: {tmp_path}/nowhere does not exist" in out, out
        assert "$.guard_points[1].key: key 'nokey' not found" in out, out


# agent.request_timeout ------------------------------------------------------------------

def test_request_timeout_is_the_data_paths_wait_for_a_decision(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["agent"]["request_timeout"] = 2.5
    with running(tmp_path, cfg) as d:
        assert [g["request_timeout_ms"] for g in d.jcli("guard", "list")] == [2500]


# docs/operations.md's exit-code table ---------------------------------------------------

def test_operations_doc_exit_table_matches_errors_py():
    import re
    from pathlib import Path

    from takakrypt.errors import EXIT_CODES

    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    section = doc.split("### Exit status", 1)[1].split("\n#", 1)[0]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)]
    assert codes == sorted(EXIT_CODES), (codes, sorted(EXIT_CODES))


def test_a_disabled_guard_point_is_not_checked(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["guard_points"].append({"path": str(tmp_path / "nowhere"), "policy": "enf",
                                "key": "nokey", "enabled": False})
    check, _ = _both(tmp_path, cfg, start=False)
    assert check.returncode == 0, check.stderr
