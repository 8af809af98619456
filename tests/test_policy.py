"""Policy engine: table tests per set type and effect, properties, explanations."""

import datetime as dt
import hashlib
import os
import shutil
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from takakrypt import config, policy, procinfo

UTC = dt.timezone.utc


def proc(exe="/usr/bin/cat", comm=None, cmdline=None, exe_id=None, pid=0):
    comm = comm or os.path.basename(exe)
    cmdline = cmdline or (exe,)
    return procinfo.Process(pid=pid, start_time=1, exe=exe, comm=comm, cmdline=cmdline,
                            exe_id=exe_id,
                            database=procinfo.detect_database(exe))


def req(uid=1000, gid=1000, groups=(), p=None, path="f", action="read", when=None):
    return policy.Request(uid=uid, gid=gid, groups=tuple(groups), process=p or proc(),
                          path=path, action=action,
                          when=when or dt.datetime(2026, 11, 23, 10, 0, tzinfo=UTC))


def engine(rules, hasher=None, **sets):
    doc = {"policies": {"p": {"rules": rules}}}
    doc.update(sets)
    import yaml
    return policy.Engine(config.loads(yaml.safe_dump(doc)), hasher=hasher)


def decide(eng, r, explain=False):
    return eng.evaluate("p", r, explain=explain)


# user sets ------------------------------------------------------------------------------

@pytest.mark.parametrize("users,groups,r,expect", [
    ([1000], [], req(uid=1000), True),
    ([1001], [], req(uid=1000), False),
    (["root"], [], req(uid=0), True),
    (["nobody"], [], req(uid=0), False),
    ([], [50], req(gid=50), True),
    ([], [50], req(gid=1, groups=[7, 50]), True),   # supplementary groups count
    ([], [50], req(gid=1, groups=[7]), False),
    ([], ["root"], req(gid=0), True),
    (["no-such-user-xyz"], [], req(uid=4242), False),
])
def test_user_sets(users, groups, r, expect):
    us = {"u": {k: v for k, v in (("users", users), ("groups", groups)) if v}}
    eng = engine([{"user_set": "u", "effects": ["permit"]}], user_sets=us)
    assert decide(eng, r).permit is expect
    neg = engine([{"user_set": "!u", "effects": ["permit"]}], user_sets=us)
    assert decide(neg, r).permit is (not expect)


# process sets ---------------------------------------------------------------------------

def test_process_set_executable_glob_name_and_database():
    ps = {"pg": {"executables": ["/usr/lib/postgresql/*/bin/postgres"]},
          "named": {"executables": ["/usr/bin/*"], "names": ["pg_dump"]},
          "db": {"executables": ["/**"], "databases": ["postgres", "mysql"]},
          "both": {"executables": ["/usr/sbin/*"], "databases": ["mysql"]}}
    pg = proc("/usr/lib/postgresql/15/bin/postgres")
    for name, p, expect in [
        ("pg", pg, True), ("pg", proc("/usr/lib/postgresql/15/sbin/postgres"), False),
        ("pg", proc("/usr/lib/postgresql/15/bin/sub/postgres"), False),  # * stays in one dir
        ("named", proc("/usr/bin/pg_dump"), True), ("named", proc("/usr/bin/cat"), False),
        ("db", pg, True), ("db", proc("/usr/sbin/mariadbd"), True),
        ("db", proc("/usr/bin/cat"), False),
        # a backend rewrites its argv but runs the postgres binary; argv alone is no type
        ("db", proc("/usr/lib/postgresql/15/bin/postgres",
                    cmdline=("postgres: 15/main: checkpointer",)), True),
        ("db", proc("/usr/bin/x", cmdline=("postgres: 15/main: checkpointer",)), False),
        ("db", proc("/usr/bin/sleep", comm="postgres", cmdline=("postgres",)), False),
        ("both", proc("/usr/sbin/mysqld"), True), ("both", proc("/usr/sbin/nginx"), False),
        ("both", proc("/opt/mysqld"), False),
    ]:
        eng = engine([{"process_set": name, "effects": ["permit"]}], process_sets=ps)
        assert decide(eng, req(p=p)).permit is expect, (name, p.exe)


def test_process_set_sha256_signature(tmp_path):
    exe = tmp_path / "tool"
    shutil.copy("/usr/bin/true", exe)
    digest = hashlib.sha256(exe.read_bytes()).hexdigest()
    ps = {"signed": {"executables": [str(tmp_path) + "/*"], "sha256": [digest]}}
    eng = engine([{"process_set": "signed", "effects": ["permit"]}], process_sets=ps,
                 hasher=procinfo.ExeHasher(racy_ctime=0))
    p = proc(str(exe), exe_id=procinfo.file_identity(str(exe)))
    assert decide(eng, req(p=p)).permit
    assert decide(eng, req(p=p)).permit
    assert eng.hasher.hashes == 1  # cached by (dev, ino, size, mtime, ctime)
    # the same path with other content is not in the set
    exe.write_bytes(exe.read_bytes() + b"\0")
    p2 = proc(str(exe), exe_id=procinfo.file_identity(str(exe)))
    d = decide(eng, req(p=p2), explain=True)
    assert not d.permit and "signature" in " ".join(d.explanation)
    assert eng.hasher.hashes == 2


# resource sets --------------------------------------------------------------------------

@pytest.mark.parametrize("paths,sub,path,expect", [
    (["base/**"], False, "base/1/2", True),
    (["base/**"], False, "basement", False),
    (["*.conf"], False, "postgresql.conf", True),
    (["*.conf"], False, "sub/x.conf", False),
    (["**/*.conf"], False, "sub/x.conf", True),
    (["**/*.conf"], False, "x.conf", True),
    (["pg_wal"], True, "pg_wal/000001", True),
    (["pg_wal"], False, "pg_wal/000001", False),
    (["pg_wal"], True, "pg_wal", True),
    (["file?.txt"], False, "file1.txt", True),
    (["file[0-3].txt"], False, "file4.txt", False),
    (["file[!0-3].txt"], False, "file4.txt", True),
])
def test_resource_sets(paths, sub, path, expect):
    rs = {"r": {"paths": paths, "subdirectories": sub}}
    eng = engine([{"resource_set": "r", "effects": ["permit"]}], resource_sets=rs)
    assert decide(eng, req(path=path)).permit is expect


# time sets ------------------------------------------------------------------------------

@pytest.mark.parametrize("ts,when,expect", [
    ({"days": ["mon"], "start": "08:00", "end": "18:00", "timezone": "UTC"},
     dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC), True),            # Monday 08:00
    ({"days": ["mon"], "start": "08:00", "end": "18:00", "timezone": "UTC"},
     dt.datetime(2026, 11, 23, 18, 0, tzinfo=UTC), False),           # end is exclusive
    ({"days": ["tue"], "start": "08:00", "end": "18:00", "timezone": "UTC"},
     dt.datetime(2026, 11, 23, 9, 0, tzinfo=UTC), False),            # wrong day
    ({"days": ["mon"], "start": "08:00", "end": "18:00", "timezone": "Asia/Tokyo"},
     dt.datetime(2026, 11, 23, 0, 30, tzinfo=UTC), True),            # 09:30 in Tokyo
    ({"days": ["mon"], "start": "08:00", "end": "18:00", "timezone": "America/New_York"},
     dt.datetime(2026, 11, 23, 13, 30, tzinfo=UTC), True),           # 08:30 NY (EST)
    ({"days": ["fri"], "start": "22:00", "end": "06:00", "timezone": "UTC"},
     dt.datetime(2026, 11, 28, 3, 0, tzinfo=UTC), True),            # Sat 03:00, started Fri
    ({"days": ["sat"], "start": "22:00", "end": "06:00", "timezone": "UTC"},
     dt.datetime(2026, 11, 28, 3, 0, tzinfo=UTC), False),
])
def test_time_sets(ts, when, expect):
    eng = engine([{"time_set": "t", "effects": ["permit"]}], time_sets={"t": ts})
    d = decide(eng, req(when=when))
    assert d.permit is expect
    assert d.cache_ttl is not None and 0 < d.cache_ttl <= 86400


def test_after_hours_deny_ttl_stops_at_boundary():
    ts = {"t": {"days": ["mon"], "start": "08:00", "end": "18:00", "timezone": "UTC"}}
    eng = engine([{"time_set": "t", "effects": ["permit"]}], time_sets=ts)
    d = decide(eng, req(when=dt.datetime(2026, 11, 23, 17, 59, 30, tzinfo=UTC)))
    assert d.permit and d.cache_ttl == pytest.approx(30)


# effects and actions --------------------------------------------------------------------

@pytest.mark.parametrize("effects,permit,apply_key,audit", [
    (["permit"], True, False, False),
    (["permit", "apply_key"], True, True, False),
    (["permit", "audit"], True, False, True),
    (["permit", "apply_key", "audit"], True, True, True),
    (["deny"], False, False, True),          # every deny is audited
    (["deny", "audit"], False, False, True),
])
def test_effect_combinations(effects, permit, apply_key, audit):
    d = decide(engine([{"effects": effects}]), req())
    assert (d.permit, d.apply_key, d.audit) == (permit, apply_key, audit)
    assert d.rule == 0


def test_actions_and_groups():
    eng = engine([{"actions": ["read_ops"], "effects": ["permit"]},
                  {"actions": ["write", "create"], "effects": ["permit", "apply_key"]}])
    for a in config.ACTIONS:
        d = decide(eng, req(action=a))
        if a in config.ACTION_GROUPS["read_ops"]:
            assert d.rule == 0
        elif a in ("write", "create"):
            assert d.rule == 1 and d.apply_key
        else:
            assert d.rule == -1 and not d.permit


def test_no_match_is_deny_and_explained():
    us = {"dba": {"users": [5]}}
    eng = engine([{"user_set": "dba", "actions": ["read"], "effects": ["permit"]},
                  {"user_set": "!dba", "actions": ["write"], "effects": ["permit"]}],
                 user_sets=us)
    d = decide(eng, req(uid=5, action="write"), explain=True)
    assert not d.permit and d.rule == -1 and d.verdict == "deny"
    assert d.explanation[0].startswith("rule 0 skipped: action write not in ['read']")
    assert "excludes" in d.explanation[1]
    assert d.explanation[-1] == "no rule matched: default deny"


def test_learn_mode_turns_deny_into_would_deny():
    import yaml
    doc = {"policies": {"p": {"learn_mode": True, "rules": [{"actions": ["read"],
                                                            "effects": ["permit"]}]}}}
    eng = policy.Engine(config.loads(yaml.safe_dump(doc)))
    d = eng.evaluate("p", req(action="write"))
    assert d.permit and d.would_deny and d.audit and d.verdict == "would-deny"
    assert eng.evaluate("p", req(action="read")).verdict == "permit"


# properties -----------------------------------------------------------------------------

_rule = st.fixed_dictionaries({
    "effects": st.sampled_from([["permit"], ["deny"], ["permit", "apply_key"],
                                ["deny", "audit"]]),
    "actions": st.lists(st.sampled_from(list(config.ACTIONS) + ["read_ops", "write_ops"]),
                        min_size=1, max_size=3),
}, optional={
    "user_set": st.sampled_from(["u", "!u"]),
    "resource_set": st.sampled_from(["r", "!r"]),
})
_req = st.builds(lambda uid, path, action: req(uid=uid, path=path, action=action),
                 st.sampled_from([0, 5, 1000]), st.sampled_from(["a", "b/c", "data/x"]),
                 st.sampled_from(config.ACTIONS))
SETS = {"user_sets": {"u": {"users": [5]}}, "resource_sets": {"r": {"paths": ["data/**"]}}}


@given(st.lists(_rule, min_size=1, max_size=6), _rule, st.lists(_req, min_size=1, max_size=5))
def test_trailing_rule_never_changes_earlier_decision(rules, extra, reqs):
    a, b = engine(rules, **SETS), engine(rules + [extra], **SETS)
    for r in reqs:
        da, db = decide(a, r), decide(b, r)
        if da.rule != -1:
            assert (db.rule, db.effects) == (da.rule, da.effects)
        else:
            assert db.rule in (-1, len(rules))


@given(st.lists(_rule, min_size=1, max_size=6), st.lists(_req, min_size=1, max_size=5))
def test_first_match_decides_and_explanation_agrees(rules, reqs):
    eng = engine(rules, **SETS)
    for r in reqs:
        d = decide(eng, r, explain=True)
        skipped = [n for n in d.explanation if "skipped" in n]
        assert len(skipped) == (d.rule if d.rule >= 0 else len(rules))
        assert d.permit == ("permit" in d.effects)


# process identity from /proc ------------------------------------------------------------

def test_inspect_real_process_and_thread():
    child = subprocess.Popen(["sleep", "30"])
    try:
        # Popen may return while the child is still inside execve (vfork): wait for it
        for _ in range(1000):
            p = procinfo.inspect(child.pid)
            if p.cmdline == ("sleep", "30") and p.comm == "sleep":
                break
            threading.Event().wait(0.005)
        assert p.pid == child.pid and p.exe == os.path.realpath(shutil.which("sleep"))
        assert p.comm == "sleep" and p.cmdline == ("sleep", "30")
        assert p.start_time > 0 and p.uid == os.geteuid()
    finally:
        child.kill()
        child.wait()
    try:  # gone, or the pid was already reused by a different process
        assert procinfo.inspect(child.pid).start_time != p.start_time
    except procinfo.ProcessGone:
        pass
    # a thread id maps to its process
    tids = []
    ev = threading.Event()
    t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), ev.wait(5)))
    t.start()
    while not tids:
        threading.Event().wait(0.001)
    try:
        assert procinfo.inspect(tids[0]).pid == os.getpid()
    finally:
        ev.set()
        t.join()


def test_start_time_distinguishes_processes():
    a = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    sa = procinfo.start_time_of(a.pid)
    a.wait()
    b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        assert procinfo.start_time_of(b.pid) >= sa
        assert (b.pid, procinfo.start_time_of(b.pid)) != (a.pid, sa)
    finally:
        b.kill()
        b.wait()


def test_database_detection():
    d = procinfo.detect_database
    assert d("/usr/lib/postgresql/15/bin/postgres") == "postgres"
    assert d("/usr/sbin/mariadbd") == "mysql"
    assert d("/usr/bin/mongod") == "mongodb"
    assert d("/u01/app/oracle/bin/oracle") == "oracle"  # ora_pmon_SID runs this binary
    assert d("/usr/bin/cat") is None


# ANY_PATH: the caching hint must be sound (the data path caches such an answer once for
# every path of the guard point) -----------------------------------------------------------

_PATHS = ["a", "b/c", "data", "data/x", "data/y/z", ""]


@given(st.lists(_rule, min_size=1, max_size=6), st.lists(_req, min_size=1, max_size=5))
def test_any_path_decisions_hold_for_every_path(rules, reqs):
    eng = engine(rules, **SETS)
    for r in reqs:
        d = decide(eng, r)
        if not d.any_path:
            continue
        for p in _PATHS:
            o = decide(eng, req(uid=r.uid, path=p, action=r.action))
            assert (o.rule, o.effects, o.any_path) == (d.rule, d.effects, True), (p, r)


def test_any_path_cases():
    rs = {"r": {"paths": ["data/**"]}}
    us = {"u": {"users": [5]}}
    # no resource set anywhere: every answer holds for every path
    eng = engine([{"user_set": "u", "effects": ["permit"]}], user_sets=us)
    assert decide(eng, req(uid=5)).any_path and decide(eng, req(uid=6)).any_path
    # a rule with a resource set decides: path-specific
    eng = engine([{"resource_set": "r", "effects": ["permit"]},
                  {"effects": ["deny"]}], resource_sets=rs)
    assert not decide(eng, req(path="data/x")).any_path
    # ... and a rule kept from deciding by its path alone makes later answers specific
    assert not decide(eng, req(path="other")).any_path
    # a rule with a resource set that cannot match this caller does not matter
    eng = engine([{"user_set": "u", "resource_set": "r", "effects": ["permit"]},
                  {"effects": ["permit", "apply_key"]}], resource_sets=rs, user_sets=us)
    d = decide(eng, req(uid=6, path="data/x"))
    assert d.any_path and d.apply_key
    assert not decide(eng, req(uid=5, path="other")).any_path
    # nor one for another action
    eng = engine([{"actions": ["write"], "resource_set": "r", "effects": ["deny"]},
                  {"effects": ["permit"]}], resource_sets=rs)
    assert decide(eng, req(action="read")).any_path
    assert not decide(eng, req(action="write", path="x")).any_path


# metadata hints: facts for every caller and path (the data path lets the kernel keep
# regular files' entries and attributes on them) --------------------------------------------

_hint_rule = st.fixed_dictionaries({
    "effects": st.sampled_from([["permit"], ["deny"], ["permit", "apply_key"],
                                ["deny", "audit"], ["permit", "apply_key", "audit"]]),
    "actions": st.lists(st.sampled_from(list(config.ACTIONS) + ["read_ops", "write_ops"]),
                        min_size=1, max_size=3),
}, optional={
    "user_set": st.sampled_from(["u", "!u"]),
    "resource_set": st.sampled_from(["r", "!r"]),
})


@given(st.lists(_hint_rule, min_size=1, max_size=6))
def test_metadata_hints_hold_for_every_caller_and_path(rules):
    eng = engine(rules, **SETS)
    plain_only, getattr_all = eng.metadata_hints("p")
    assert not getattr_all or plain_only
    for uid in (0, 5, 1000):
        for path in _PATHS:
            if plain_only:
                for action in policy.VIEW_ACTIONS:
                    d = decide(eng, req(uid=uid, path=path, action=action))
                    assert not d.permit or d.apply_key, (uid, path, action)
            if getattr_all:
                d = decide(eng, req(uid=uid, path=path, action="getattr"))
                assert d.permit and d.apply_key and not d.audit, (uid, path)


_PF_SETS = {"user_sets": {"u": {"users": [5]}, "g": {"groups": [50]}},
            "resource_sets": {"r": {"paths": ["data/**"]}},
            "process_sets": {"cat": {"executables": ["/usr/bin/cat"]}}}
_pf_rule = st.fixed_dictionaries({
    "effects": st.sampled_from([["permit"], ["deny"], ["permit", "apply_key"],
                                ["deny", "audit"]]),
    "actions": st.lists(st.sampled_from(list(config.ACTIONS)), min_size=1, max_size=3),
}, optional={
    "user_set": st.sampled_from(["u", "!u", "g", "!g"]),
    "resource_set": st.sampled_from(["r", "!r"]),
    "process_set": st.sampled_from(["cat", "!cat"]),
})
_PF_CALLERS = [(proc("/usr/bin/cat"), ()), (proc("/usr/bin/tar"), ()),
               (proc("/usr/bin/cat"), (50,)), (proc("/usr/sbin/postgres"), (7, 50))]


@given(st.lists(_pf_rule, min_size=1, max_size=6))
def test_process_free_policies_decide_by_uid_and_gid_alone(rules):
    # what the data path relies on when it caches a decision per uid/gid for every
    # process: whatever the executable and the supplementary groups, the same answer
    eng = engine(rules, **_PF_SETS)
    if not eng.process_free("p"):
        return
    for uid in (0, 5, 1000):
        for path in ("f", "data/x"):
            for action in ("read", "write", "getattr", "create"):
                got = {(d.permit, d.apply_key, d.audit, d.rule) for d in
                       (decide(eng, req(uid=uid, gid=1, groups=g, p=p, path=path,
                                        action=action)) for p, g in _PF_CALLERS)}
                assert len(got) == 1, (uid, path, action, got)


def test_any_process_is_set_exactly_for_process_free_policies():
    # the POLICY_CHECK hint ANY_PROCESS (handler.effects_of) comes from Decision.any_process
    p = proc("/usr/bin/cat")
    free = engine([{"user_set": "u", "effects": ["permit", "apply_key"]}], **_PF_SETS)
    assert decide(free, req(uid=5, gid=1, p=p, path="f", action="read")).any_process
    assert decide(free, req(uid=6, gid=1, p=p, path="f", action="read")).any_process  # deny
    bound = engine([{"process_set": "cat", "effects": ["permit", "apply_key"]}], **_PF_SETS)
    assert not decide(bound, req(uid=5, gid=1, p=p, path="f", action="read")).any_process


def test_process_free_cases():
    allow = {"effects": ["permit", "apply_key"]}
    assert engine([allow]).process_free("p")
    assert engine([{"user_set": "u", "effects": ["permit", "apply_key"]},
                   {"resource_set": "r", "effects": ["deny", "audit"]}],
                  **_PF_SETS).process_free("p")
    # a process set, even negated, even in a rule after an unconditional one
    assert not engine([{"process_set": "cat", "effects": ["permit"]}],
                      **_PF_SETS).process_free("p")
    assert not engine([allow, {"process_set": "!cat", "effects": ["deny"]}],
                      **_PF_SETS).process_free("p")
    # a user set with groups: supplementary groups come from /proc
    assert not engine([{"user_set": "g", "effects": ["permit"]}],
                      **_PF_SETS).process_free("p")
    us = {"user_sets": {"n": {"users": ["root"], "groups": ["root"]}}}
    assert not engine([{"user_set": "!n", "effects": ["deny"]}], **us).process_free("p")


def test_metadata_hints_cases():
    us = {"u": {"users": [5]}}
    allow = {"effects": ["permit", "apply_key"]}
    assert engine([allow]).metadata_hints("p") == (True, True)
    # a raw view for anyone (backup): neither
    assert engine([{"user_set": "u", "effects": ["permit"]}, allow],
                  user_sets=us).metadata_hints("p") == (False, False)
    # ... unless the permit picks no view (listing a directory)
    assert engine([{"actions": ["list"], "effects": ["permit"]}, allow]
                  ).metadata_hints("p") == (True, True)
    # the usual database policy: plaintext for some, deny for the rest
    assert engine([{"user_set": "u", "effects": ["permit", "apply_key"]},
                   {"effects": ["deny", "audit"]}], user_sets=us).metadata_hints("p") == \
        (True, False)
    # getattr for everyone, data for some
    assert engine([{"actions": ["getattr", "list"], "effects": ["permit", "apply_key"]},
                   {"user_set": "u", "effects": ["permit", "apply_key"]}],
                  user_sets=us).metadata_hints("p") == (True, True)
    # an audited getattr must reach the engine every time
    assert engine([{"actions": ["getattr"], "effects": ["permit", "apply_key", "audit"]},
                   allow]).metadata_hints("p") == (True, False)
    # learn mode writes would-deny events: no getattr_all
    import yaml
    doc = {"policies": {"p": {"learn_mode": True, "rules": [allow]}}}
    assert policy.Engine(config.loads(yaml.safe_dump(doc))).metadata_hints("p") == \
        (True, False)
