"""Start takakryptd in a subprocess for tests: own keystore, config, sockets, notify."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run_takakrypt(args, env: dict | None = None, timeout: float | None = None,
                  text: bool = True) -> subprocess.CompletedProcess:
    """`python -m takakrypt ARGS`, output captured.  With TAKAKRYPT_TEST_FORK_CLI=1 (the
    kernel suite's guest sets it) the command runs in a fork of this process instead:
    its own process, exit code and stdio as before, without a Python start and the CLI's
    imports, which cost about 7 s each under TCG emulation."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if os.environ.get("TAKAKRYPT_TEST_FORK_CLI") != "1":
        return subprocess.run([sys.executable, "-m", "takakrypt", *args], env=env,
                              capture_output=True, text=text, timeout=timeout)
    import tempfile

    from takakrypt import cli  # once per test process

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                sys.stdin = open(0, closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.environ.clear()
                os.environ.update(env)
                sys.argv = ["takakrypt", *args]
                code = cli.main(args)
            except SystemExit as e:  # as the interpreter treats it: None 0, text 1
                code = e.code or 0 if isinstance(e.code, (int, type(None))) else 1
                if code == 1 and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code & 0xFF)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["takakrypt", *args], timeout)
            time.sleep(0.02)
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
    if text:
        o, e = o.decode(errors="replace"), e.decode(errors="replace")
    return subprocess.CompletedProcess(["takakrypt", *args], rc, o, e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(tmp: Path, **extra) -> dict:
    from takakrypt.keys import generate_master_key_file, open_keystore

    mk = tmp / "master.key"
    if not mk.exists():
        generate_master_key_file(str(mk))
        with open_keystore(str(tmp / "keystore.json"), master_key_file=str(mk), create=True) as ks:
            ks.create("k1")
    cfg = {
        "agent": {
            "control_socket": str(tmp / "run" / "control.sock"),
            "protocol_socket": str(tmp / "run" / "agent.sock"),
            "pid_file": str(tmp / "run" / "takakryptd.pid"),
            "metrics": {"address": "127.0.0.1", "port": free_port()},
            "log_level": "debug",
        },
        "keys": {"backend": "local", "local": {"path": str(tmp / "keystore.json"),
                                               "master_key_file": str(mk)}},
        "user_sets": {"root": {"users": [0]}},
        "policies": {"p": {"rules": [
            {"user_set": "root", "actions": ["read_ops"], "effects": ["permit", "apply_key"]},
            {"actions": ["all_ops"], "effects": ["deny", "audit"]},
        ]}},
        "audit": {"sinks": [{"type": "file", "path": str(tmp / "audit.jsonl")}]},
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg))


class Daemon:
    """takakryptd --foreground in a child process, with a NOTIFY_SOCKET we bind."""

    def __init__(self, tmp: Path, cfg: dict, *, watchdog_usec: int | None = None,
                 argv_prefix: list[str] | tuple[str, ...] = ()) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.config_path = tmp / "takakrypt.yaml"
        write_config(self.config_path, cfg)
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(30)
        self.log = open(tmp / "takakryptd.log", "wb")
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = subprocess.Popen(
            [*argv_prefix, sys.executable, "-m", "takakrypt.agent.daemon", "--config",
             str(self.config_path), "--foreground"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if field in m.split("\n"):
                    self.messages.remove(m)
                    return m
            if self.proc.poll() is not None:
                raise AssertionError(f"takakryptd exited {self.proc.returncode}: {self.logtext()}")
            # wait up to the deadline, not one socket timeout: a takakryptd starting under
            # TCG on a busy host can take minutes (tests/pg_debian_guest.py asks 300 s)
            self.notify.settimeout(max(0.05, min(5.0, deadline - time.monotonic())))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except socket.timeout:
                continue
        raise AssertionError(f"no {field} from takakryptd; log: {self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        return (self.tmp / "takakryptd.log").read_text(errors="replace")

    def cli(self, *args, check=True, timeout=60):
        env = dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=self.cfg["agent"]["control_socket"])
        r = run_takakrypt(args, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"takakrypt {args} -> {r.returncode}: {r.stderr}")
        return r

    def jcli(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(tmp: Path, cfg: dict, **kw):
    d = Daemon(tmp, cfg, **kw)
    try:
        d.wait_for("READY=1")
        yield d
    finally:
        d.stop()


def until(pred, timeout: float = 30.0, step: float = 0.1):
    """pred()'s first true value within timeout seconds (polled every step), else its
    last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


# a reader that keeps its file open across a key expiry (docs/keys.md section 9): its
# next read past the page cache must fail, so the data path really dropped the key
HOLD_READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
assert os.read(fd, 4) == b"held"
print("open", flush=True)
sys.stdin.readline()
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
try:
    print("read", os.pread(fd, 4, 0), flush=True)
except OSError as e:
    print("errno", e.errno, flush=True)
"""
