"""Issue 16: a guard point outlives its takakryptd.  The bundle format and both carriers
(systemd's fd store, the --upgrade socket) with real descriptors, and the daemon's
handover protocol with a stand-in engine (tests/fake_engine.py); the same paths with
the real FUSE engine are in test_agent_handover_e2e.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import fake_engine
from agent_helpers import base_config
from handover_helpers import FakeSystemd
from takakrypt.agent import handover
from takakrypt.agent.client import AgentClient, permitted
from takakrypt.agent.notify import Notifier

PRELUDE = "import fake_engine; fake_engine.install()"


def _pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


# ------------------------------------------------------------------------------------------
# the bundle and its carriers


def test_state_fd_is_sealed_and_checked():
    fd = handover.state_fd("/data/pg", 2, b"\x00engine\xff")
    try:
        assert handover.read_state_fd(fd) == ({"v": 1, "path": "/data/pg", "nfds": 2,
                                               "len": 8}, b"\x00engine\xff")
        with pytest.raises(OSError):
            os.pwrite(fd, b"X", 0)  # sealed: nobody rewrites the state on its way
    finally:
        os.close(fd)
    r, w = os.pipe()  # not a sealed memfd
    try:
        with pytest.raises(handover.HandoverError, match="unusable|not sealed"):
            handover.read_state_fd(r)
    finally:
        os.close(r)
        os.close(w)


def test_fd_store_round_trip_by_name(tmp_path):
    sd = FakeSystemd(tmp_path)
    try:
        n = Notifier({"NOTIFY_SOCKET": sd.path})
        a, b = _pipe_with(b"conn a"), _pipe_with(b"conn b")
        names = handover.store(n.send_fds, "/srv/a:b", [a, b], b"state-a")
        handover.store(n.send_fds, "/srv/c", [_pipe_with(b"conn c")], b"state-c")
        deadline = time.monotonic() + 10
        while len(sd.names()) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(":" not in x and len(x) <= 255 for x in sd.names())
        # systemd hands them back in whatever order it keeps them: names decide
        passed = {os.dup(fd): name for name, fd in reversed(sd.store)}
        bundles, problems = handover.bundles_from_store(passed)
        assert problems == []
        assert sorted(bundles) == ["/srv/a:b", "/srv/c"]
        got = bundles["/srv/a:b"]
        assert got.state == b"state-a" and got.names == names
        assert [os.read(fd, 100) for fd in got.fds] == [b"conn a", b"conn b"]
        for x in bundles.values():
            x.close()
        handover.remove(n.send_fds, names)
        deadline = time.monotonic() + 10
        while len(sd.names()) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(x.startswith(handover.fdname("/srv/c", 0)[:-1]) for x in sd.names())
        n.close()
    finally:
        sd.close()


def test_incomplete_fd_store_entry_is_refused():
    st = handover.state_fd("/srv/a", 2, b"s")
    passed = {st: handover.fdname("/srv/a", 0),
              _pipe_with(b"x"): handover.fdname("/srv/a", 1),  # fd 2 of 2 is missing
              _pipe_with(b"y"): "some-socket"}
    bundles, problems = handover.bundles_from_store(passed)
    assert "/srv/a" not in bundles
    assert any("1 of 2 descriptors" in p for p in problems), problems
    assert any("'some-socket'" in p for p in problems), problems
    for fd in passed:  # all closed: nothing half-used is kept
        with pytest.raises(OSError):
            os.fstat(fd)


def test_upgrade_socket_round_trip_and_garbage():
    old, new = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    items = [("/srv/a", [_pipe_with(b"A")], b"sa"), ("/srv/b", [_pipe_with(b"B")], b"sb")]
    t = threading.Thread(target=handover.send_bundles, args=(old, items))
    t.start()
    got = handover.recv_bundles(new)
    t.join()
    assert {p: (os.read(b.fds[0], 9), b.state) for p, b in got.items()} == \
        {"/srv/a": (b"A", b"sa"), "/srv/b": (b"B", b"sb")}
    for b in got.values():
        b.close()
    # a record whose state names another path: refused, its fds closed
    fd = _pipe_with(b"C")
    st = handover.state_fd("/srv/other", 1, b"")
    handover.send_record(old, {"path": "/srv/c"}, [st, fd])
    with pytest.raises(handover.HandoverError, match="does not match"):
        handover.recv_bundles(new)
    old.sendmsg([b"\xff not json"])
    with pytest.raises(handover.HandoverError, match="bad handover record"):
        handover.recv_bundles(new)
    old.close()
    with pytest.raises(handover.HandoverError, match="closed"):
        handover.recv_bundles(new)
    new.close()


# ------------------------------------------------------------------------------------------
# the daemon's protocol (stand-in engine)


def _cfg(tmp_path, *names):
    cfg = base_config(tmp_path)
    cfg["guard_points"] = []
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
        cfg["guard_points"].append({"path": str(tmp_path / n), "policy": "p", "key": "k1"})
    return cfg


def _stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(60)


def _status(cfg):
    r = subprocess.run([sys.executable, "-m", "takakrypt", "status", "--json"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ,
                                TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"]))
    return json.loads(r.stdout)


def _root_may_read(cfg, path) -> bool:
    """The agent's decision for this (root) process reading ``path``, over the
    protocol socket (the same decide() the data path's cache misses reach)."""
    with AgentClient(cfg["agent"]["protocol_socket"]) as c:
        return permitted(c.policy_check(path=str(path), action="read", uid=0, gid=0))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("TK_FAKE_LOG", str(tmp_path / "engine.log"))
    sd = FakeSystemd(tmp_path)
    yield sd
    sd.close()


def test_sigterm_stores_and_next_start_resumes(tmp_path, fake):
    cfg = _cfg(tmp_path, "a", "b")
    p1 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    fake.wait_for("READY=1", p1)
    assert _stop(p1) == 0
    ev = fake_engine.events(str(tmp_path / "engine.log"))
    assert [e for _, e, _, _ in ev if e == "unmount"] == []  # never uncovered
    assert sorted(e[1:3] for e in ev if e[1] in ("begin", "done")) == sorted(
        (e, str(tmp_path / n)) for e in ("begin", "done") for n in "ab")
    assert len(fake.names()) == 4  # per guard point: state memfd + the connection
    mounted = {w: d for _, e, w, d in ev if e == "mount"}

    p2 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    fake.wait_for("READY=1", p2)
    ev2 = [e for e in fake_engine.events(str(tmp_path / "engine.log")) if e[0] == p2.pid]
    assert {w: d for _, e, w, d in ev2 if e == "resume"} == mounted  # the same pipes
    assert [e for _, e, _, _ in ev2 if e == "mount"] == []
    deadline = time.monotonic() + 10
    while fake.names() and time.monotonic() < deadline:  # stale entries removed
        time.sleep(0.05)
    assert fake.names() == []
    assert _stop(p2) == 0
    assert len(fake.names()) == 4  # fresh ones, at the stop


def test_failed_resume_is_not_remounted_nor_ready(tmp_path, fake):
    cfg = _cfg(tmp_path, "a")
    p1 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    fake.wait_for("READY=1", p1)
    assert _stop(p1) == 0
    stored = fake.names()
    p2 = fake.start(tmp_path, cfg, prelude=PRELUDE, env={"TK_FAKE_RESUME_FAIL": "1"})
    try:
        status = fake.wait_for("STATUS=not ready: guard point "
                               f"{tmp_path / 'a'}: cannot take over the connection the "
                               "previous takakryptd handed over", p2, prefix=True)
        assert "READY=1" not in status
        st = _status(cfg)
        assert not st["guard_points"][0]["mounted"]
        assert "engine state does not match (fake) (not remounted; requests wait in " \
            "the kernel)" in st["guard_points"][0]["error"], st
        assert not any(m for m in fake.messages if "READY=1" in m.split("\n"))
        ev2 = [e for pid, e, _w, _d in fake_engine.events(str(tmp_path / "engine.log"))
               if pid == p2.pid]
        assert ev2 == ["resume-failed"]  # and no mount over the live connection
        assert fake.names() == stored  # still in the store for the next try
    finally:
        assert _stop(p2) == 0
    assert fake.names() == stored


def test_keystore_unloadable_takes_over_and_denies(tmp_path, fake):
    cfg = _cfg(tmp_path, "a")
    p1 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    fake.wait_for("READY=1", p1)
    assert _stop(p1) == 0
    key = tmp_path / "master.key"
    good = key.read_bytes()
    key.write_bytes(os.urandom(len(good)))  # the successor cannot open its keystore
    p2 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    try:
        ready = fake.wait_for("READY=1", p2)
        assert "STATUS=denying every access: the key backend cannot be opened" in ready
        st = _status(cfg)
        assert st["state"] == "unhealthy", st
        assert "the key backend cannot be opened" in st["denying_all"]
        assert "every access is denied" in st["problems"][f"guard:{tmp_path / 'a'}"]
        assert not _root_may_read(cfg, tmp_path / "a" / "f")  # EACCES on the data path
        ev = [e for e in fake_engine.events(str(tmp_path / "engine.log")) if e[0] == p2.pid]
        assert [e[1] for e in ev] == ["resume"]
    finally:
        assert _stop(p2) == 0
    key.write_bytes(good)
    p3 = fake.start(tmp_path, cfg, prelude=PRELUDE)
    ready = fake.wait_for("READY=1", p3)
    assert "STATUS=running" in ready
    assert _status(cfg)["state"] == "healthy"
    assert _root_may_read(cfg, tmp_path / "a" / "f")
    assert _stop(p3) == 0


def _events(tmp_path, pid):
    return [(e, w, d) for p, e, w, d in fake_engine.events(str(tmp_path / "engine.log"))
            if p == pid]


def _wait_event(tmp_path, pid, event, proc):
    while not any(e == event for e, _w, _d in _events(tmp_path, pid)):
        assert proc.poll() is None, f"exited {proc.returncode}"
        time.sleep(0.02)


def test_upgrade_takes_over_and_the_old_one_exits(tmp_path, fake):
    cfg = _cfg(tmp_path, "a", "b")
    old = fake.start(tmp_path, cfg, prelude=PRELUDE, fd_store=False)
    fake.wait_for("READY=1", old)
    new = fake.start(tmp_path, cfg, "--upgrade", prelude=PRELUDE, fd_store=False,
                     log="new.log")
    try:
        fake.wait_for(f"MAINPID={new.pid}", new)
        assert old.wait(60) == 0
        mounted = {w: d for e, w, d in _events(tmp_path, old.pid) if e == "mount"}
        assert {w: d for e, w, d in _events(tmp_path, new.pid) if e == "resume"} == mounted
        assert [e for e, _w, _d in _events(tmp_path, old.pid)
                if e in ("unmount", "abort")] == []
        assert [e for e, _w, _d in _events(tmp_path, new.pid) if e == "mount"] == []
        pid = int(open(cfg["agent"]["pid_file"]).read())
        assert pid == new.pid == _status(cfg)["pid"]  # the pid file and socket moved
        assert _status(cfg)["state"] == "healthy"
        assert _root_may_read(cfg, tmp_path / "a" / "f")  # the protocol socket too
    finally:
        assert _stop(new) == 0


def test_failed_upgrade_leaves_the_old_one_serving(tmp_path, fake):
    cfg = _cfg(tmp_path, "a")
    old = fake.start(tmp_path, cfg, prelude=PRELUDE, fd_store=False)
    try:
        fake.wait_for("READY=1", old)
        new = fake.start(tmp_path, cfg, "--upgrade", prelude=PRELUDE, fd_store=False,
                         log="new.log", env={"TK_FAKE_RESUME_FAIL": "1"})
        assert new.wait(60) == 13
        log = (tmp_path / "new.log").read_text()
        assert "cannot take over" in log and "the running takakryptd keeps serving" in log
        assert [e for e, _w, _d in _events(tmp_path, old.pid)] == ["mount", "begin", "abort"]
        assert old.poll() is None
        st = _status(cfg)
        assert st["pid"] == old.pid and st["state"] == "healthy", st
        assert int(open(cfg["agent"]["pid_file"]).read()) == old.pid
    finally:
        assert _stop(old) == 0


def test_second_upgrade_at_the_same_time_is_refused(tmp_path, fake):
    cfg = _cfg(tmp_path, "a")
    gate = tmp_path / "go"
    old = fake.start(tmp_path, cfg, prelude=PRELUDE, fd_store=False)
    fake.wait_for("READY=1", old)
    first = fake.start(tmp_path, cfg, "--upgrade", prelude=PRELUDE, fd_store=False,
                       log="first.log", env={"TK_FAKE_GATE": str(gate)})
    try:
        _wait_event(tmp_path, first.pid, "resume-waits", first)  # mid-handover
        second = fake.start(tmp_path, cfg, "--upgrade", prelude=PRELUDE, fd_store=False,
                            log="second.log")
        assert second.wait(60) == 2
        assert "an upgrade of takakryptd is already under way" in \
            (tmp_path / "second.log").read_text()
        assert _events(tmp_path, second.pid) == []
        gate.touch()
        fake.wait_for(f"MAINPID={first.pid}", first, prefix=False)
        assert old.wait(60) == 0
    finally:
        gate.touch()
        _stop(first)
        _stop(old)


def test_ready_only_once_every_guard_point_is_served(tmp_path, fake):
    cfg = _cfg(tmp_path, "a", "b")
    broken = tmp_path / "b-fails"
    broken.touch()
    p = fake.start(tmp_path, cfg, prelude=PRELUDE, env={"TK_FAKE_MOUNT_FAIL": str(broken)})
    try:
        fake.wait_for(f"STATUS=not ready: guard point {tmp_path / 'b'}: [Errno 5] cannot "
                      "mount guard point", p, prefix=True)
        assert _status(cfg)["state"] == "unhealthy"  # answering, a serving, b down
        assert not any("READY=1" in m.split("\n") for m in fake.messages)
        broken.unlink()
        p.send_signal(signal.SIGHUP)  # the reload mounts b: now ready
        fake.wait_for("READY=1", p)
        assert _status(cfg)["state"] == "healthy"
    finally:
        assert _stop(p) == 0
