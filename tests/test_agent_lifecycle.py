"""takakryptd's life cycle with real guard points (issue 15, items 2, 5-8): signals at
any moment of start-up and reload leave no hung process or mount; mounting never
blocks the decisions of the other guard points; a background start reports its
failure; start-up failures are one line, no traceback; a mount that host processes
cannot see is reported unhealthy."""

import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent_helpers import Daemon, base_config, free_port, running, write_config

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                                or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3")

PY = os.path.realpath(sys.executable)
CAT = os.path.realpath(shutil.which("cat"))
DAEMON = [sys.executable, "-m", "takakrypt.agent.daemon"]
#: a round's process must be gone this long after its signal (else it hangs)
EXIT_BOUND = 30


def _cfg(tmp_path, *names):
    cfg = base_config(tmp_path)
    cfg["process_sets"] = {"app": {"executables": [PY, CAT]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = []
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
        cfg["guard_points"].append({"path": str(tmp_path / n), "policy": "gp", "key": "k1"})
    return cfg


def _mountinfo(pid="self"):
    """mount point -> "major:minor" of the takakrypt mounts (the last one wins)."""
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.startswith("fuse.takakrypt "):
                out[left.split()[4]] = left.split()[2]
    return out


def _abort(dev):
    with contextlib.suppress(OSError):
        with open(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/abort", "w") as f:
            f.write("1")


def _stat_in_child(path, timeout=10):
    """0, an errno, or None if reading the directory hangs (it runs in a child: a hung mount must
    not take the test process with it)."""
    # listdir, not stat: the kernel may answer a stat from its attribute cache
    code = "import os, sys\ntry:\n os.listdir(sys.argv[1])\nexcept OSError as e:\n sys.exit(e.errno)"
    p = subprocess.Popen([PY, "-c", code, path])
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return None


def _sweep(under):
    """Abort and unmount every takakrypt mount below ``under`` (deepest first)."""
    for mp, dev in sorted(_mountinfo().items(), key=lambda x: -len(x[0])):
        if mp.startswith(str(under)):
            _abort(dev)
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)


# --- item 5: signals at random moments of start-up and reload --------------------------

def _round(tmp_path, rng, sig, during_reload):
    cfg = _cfg(tmp_path, "a", "b")
    d = Daemon(tmp_path, cfg)
    try:
        if during_reload:
            d.wait_for("READY=1")
            write_config(d.config_path, _cfg(tmp_path, "a", "c", "d"))
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(rng.uniform(0, 0.3))
        else:
            time.sleep(rng.uniform(0, 1.2))
            if rng.random() < 0.5:  # a reload asked for during start-up, too
                d.proc.send_signal(signal.SIGHUP)
                time.sleep(rng.uniform(0, 0.3))
        d.proc.send_signal(sig)
        try:
            d.proc.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            state = open(f"/proc/{d.proc.pid}/stat").read().split()[2]
            _sweep(tmp_path)  # unhang it, so the machine is not left with a dead mount
            d.proc.kill()
            d.proc.wait()
            pytest.fail(f"{sig!r} {'in reload' if during_reload else 'at start'}: takakryptd "
                        f"did not exit within {EXIT_BOUND} s (state {state}); log: "
                        f"{d.logtext()[-2000:]}")
        for n in "abcd":
            mp = str(tmp_path / n)
            if mp not in _mountinfo():
                continue
            rc = _stat_in_child(mp)
            if rc is None:
                _sweep(tmp_path)
                pytest.fail(f"{mp} hangs after {sig!r}")
            if sig == signal.SIGKILL:  # dead, not hung: the next start cleans it
                assert rc in (errno.ENOTCONN, errno.ECONNABORTED), (mp, rc)
            else:
                pytest.fail(f"{mp} still mounted (stat: {rc}) after a graceful stop by "
                            f"{sig!r}; log: {d.logtext()[-2000:]}")
    finally:
        d.stop()
        _sweep(tmp_path)


def test_signals_at_random_moments_of_start_and_reload(tmp_path):
    rng = random.Random(int(os.environ.get("TAKAKRYPT_TEST_SEED", "15")))
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGKILL]
    for i in range(21):
        _round(tmp_path, rng, sigs[i % 3], during_reload=i % 2 == 1)
    # and after all that, a start that works
    with running(tmp_path, _cfg(tmp_path, "a")) as d:
        r = subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'w').write('ok'); "
                            "print(open(sys.argv[1]).read())", str(tmp_path / "a" / "f")],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "ok", r.stderr + d.logtext()


# --- item 6: mounting does not block the other guard points ---------------------------

def _hung_mount(path):
    """A takakrypt-typed FUSE mount at ``path`` whose server (this test) never answers:
    returns (fd, dev).  A stat of it waits until the connection is aborted."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"takakrypt", str(path).encode(), b"fuse.takakrypt", 0, opts) != 0:
        os.close(fd)
        pytest.skip(f"cannot mount a test FUSE server: {os.strerror(ctypes.get_errno())}")
    return fd, _mountinfo()[str(path)]


def _waiting(dev):
    with open(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/waiting") as f:
        return int(f.read())


def test_a_guard_point_answers_while_another_is_being_mounted(tmp_path):
    cfg = _cfg(tmp_path, "a")
    with running(tmp_path, cfg) as d:
        subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'w').write('alive')",
                        str(tmp_path / "a" / "f")], check=True, timeout=30)
        cfg2 = _cfg(tmp_path, "a", "b")  # (after the hung mount this would stat b)
        # b's mount point holds a hung mount: the agent probes it (stale?) before mounting;
        # nothing in this process may stat it until it is aborted below
        fd, dev = _hung_mount(tmp_path / "b")
        try:
            write_config(d.config_path, cfg2)
            result = {}
            reload = threading.Thread(target=lambda: result.update(r=d.cli("reload", "--json")))
            reload.start()
            deadline = time.monotonic() + 30
            b = str(tmp_path / "b")
            while True:  # until the agent's probe waits on the hung mount
                # the agent's loop answers meanwhile (it used to stat b itself, blocked)
                st = json.loads(d.cli("status", "--json", check=False).stdout)
                assert "guard_points" in st, f"the agent did not answer: {st}"
                gps = {g["path"]: g for g in st["guard_points"]}
                if b in gps and _waiting(dev) > 0:
                    break
                assert time.monotonic() < deadline and reload.is_alive(), d.logtext()
                time.sleep(0.01)
            assert not gps[b]["mounted"]
            # the reload bumped the generation: decisions for a go on meanwhile
            r = subprocess.run([CAT, str(tmp_path / "a" / "f")], capture_output=True,
                               text=True, timeout=30)
            assert r.returncode == 0 and r.stdout == "alive", r.stderr
            assert reload.is_alive() and _waiting(dev) > 0  # b is still being mounted
        finally:
            _abort(dev)  # the probe gets ECONNABORTED: stale, the agent unmounts it
            os.close(fd)
        reload.join(60)
        assert json.loads(result["r"].stdout)["reloaded"]
        st = d.jcli("status")
        gps = {g["path"]: g for g in st["guard_points"]}
        assert gps[str(tmp_path / "b")]["mounted"], st
        r = subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'w').write('b'); "
                            "print(open(sys.argv[1]).read())", str(tmp_path / "b" / "f")],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "b", r.stderr  # the agent's own mount, serving
    audit = (tmp_path / "audit.jsonl").read_text()
    assert "agent unavailable" not in audit


def test_readahead_applied_and_no_spurious_deny(tmp_path):
    with running(tmp_path, _cfg(tmp_path, "a")) as d:
        g = d.jcli("guard", "list")[0]
        assert isinstance(g["stats"]["read_ahead_kb"], int), g
        assert g["stats"]["read_ahead_kb"] > 0
    assert "agent unavailable" not in (tmp_path / "audit.jsonl").read_text()
    assert "agent unavailable" not in (tmp_path / "takakryptd.log").read_text()


# --- item 2: a mount the host does not see -------------------------------------------

def test_mount_hidden_from_pid1_is_unhealthy(tmp_path):
    if not os.access("/proc/1/mountinfo", os.R_OK) or not shutil.which("unshare"):
        pytest.skip("needs /proc/1/mountinfo and unshare(1)")
    cfg = _cfg(tmp_path, "a")
    gp = str(tmp_path / "a")
    d = Daemon(tmp_path, cfg, argv_prefix=["unshare", "--mount", "--propagation", "private"])
    try:
        d.wait_for("READY=1")
        assert gp not in _mountinfo()  # the test's namespace does not see it either
        r = d.cli("status", check=False)
        assert r.returncode == 1 and "UNHEALTHY" in r.stdout, r.stdout
        assert "not visible in PID 1's mount namespace" in r.stdout
        st = json.loads(d.cli("status", "--json", check=False).stdout)
        assert st["healthy"] is False and st["health"][f"guard:{gp}"] is False
        assert "not visible in PID 1's mount namespace" in st["guard_points"][0]["error"]
    finally:
        d.stop()
    assert "not visible in PID 1's mount namespace" in (tmp_path / "takakryptd.log").read_text()
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "guard-point" and "PID 1" in e.get("reason", "")
               and e.get("path") == gp for e in events), events


def test_mount_seen_by_pid1_is_healthy(tmp_path):
    gp = str(tmp_path / "a")
    with running(tmp_path, _cfg(tmp_path, "a")) as d:
        if os.access("/proc/1/mountinfo", os.R_OK):
            assert gp in _mountinfo("1")
        st = d.jcli("status")
        assert st["healthy"] and st["health"][f"guard:{gp}"] is True, st
        assert st["guard_points"][0]["error"] is None


# --- item 7: background mode reports its failure --------------------------------------

def _background(args, cwd=None, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | (env_extra or {})
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)


def _stop_background(cfg):
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(open(cfg["agent"]["pid_file"]).read())
        os.kill(pid, signal.SIGTERM)
        for _ in range(3000):
            os.kill(pid, 0)
            time.sleep(0.01)


def test_background_second_instance_exits_2(tmp_path):
    cfg = base_config(tmp_path)
    with running(tmp_path, cfg):
        r = _background(["--config", str(tmp_path / "takakrypt.yaml")])
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "already running" in r.stderr and "Traceback" not in r.stderr


def test_background_wrong_passphrase_exits_7(tmp_path):
    from takakrypt.keys import open_keystore

    cfg = base_config(tmp_path)
    (tmp_path / "pass").write_text("right passphrase\n")
    with open_keystore(str(tmp_path / "ks2.json"), passphrase=b"right passphrase",
                       create=True) as ks:
        ks.create("k1")
    (tmp_path / "pass").write_text("wrong passphrase\n")
    cfg["keys"] = {"backend": "local", "local": {"path": str(tmp_path / "ks2.json"),
                                                 "passphrase_file": str(tmp_path / "pass")}}
    write_config(tmp_path / "c.yaml", cfg)
    try:
        r = _background(["--config", str(tmp_path / "c.yaml")])
    finally:
        _stop_background(cfg)
    assert r.returncode == 7, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "takakryptd: error:" in r.stderr, r.stderr


def test_background_relative_config_path(tmp_path):
    cfg = base_config(tmp_path)
    write_config(tmp_path / "c.yaml", cfg)
    try:
        r = _background(["--config", "c.yaml"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        env = dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"])
        st = subprocess.run([sys.executable, "-m", "takakrypt", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["config"] == str(tmp_path / "c.yaml")
    finally:
        _stop_background(cfg)


# --- item 8: start-up failures are one line, no traceback ------------------------------

def _start_fails(tmp_path, cfg):
    write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([*DAEMON, "--config", str(tmp_path / "c.yaml"), "--foreground"],
                       capture_output=True, text=True, timeout=60)
    errors = [x for x in r.stderr.splitlines() if x.startswith("takakryptd: error:")]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1, r.stderr
    assert str(tmp_path / "c.yaml") in errors[0]
    return r.returncode, errors[0]


def test_metrics_port_in_use(tmp_path):
    import socket

    cfg = base_config(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        cfg["agent"]["metrics"]["port"] = s.getsockname()[1]
        rc, line = _start_fails(tmp_path, cfg)
    assert rc == 3 and "$.agent.metrics" in line and "in use" in line, line


def test_control_socket_directory_cannot_be_created(tmp_path):
    cfg = base_config(tmp_path)
    (tmp_path / "plainfile").write_text("")
    cfg["agent"]["control_socket"] = str(tmp_path / "plainfile" / "run" / "control.sock")
    rc, line = _start_fails(tmp_path, cfg)
    assert rc == 3 and "$.agent.control_socket" in line, line


def test_protocol_socket_and_pid_file_directories(tmp_path):
    (tmp_path / "plainfile").write_text("")
    cfg = base_config(tmp_path)
    cfg["agent"]["protocol_socket"] = str(tmp_path / "plainfile" / "agent.sock")
    rc, line = _start_fails(tmp_path, cfg)
    assert rc == 3 and "$.agent.protocol_socket" in line, line
    cfg = base_config(tmp_path)
    cfg["agent"]["pid_file"] = str(tmp_path / "plainfile" / "run" / "takakryptd.pid")
    rc, line = _start_fails(tmp_path, cfg)
    assert rc == 3 and "$.agent.pid_file" in line, line
