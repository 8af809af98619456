"""A guard point server for the live rekey tests (tests/test_fuse_rekey.py).

The server is a child process (``python tests/rekey_helpers.py SPEC.json``, started by
``fuse_helpers.serve_child``), as for every mount test: clients never run in the
serving process.  Its keys come from a local keystore (master key file) that the test
rotates; ``rekey_file`` runs in the server (it is a method of the mount), asked over a
Unix socket, one JSON line per request and answer, each connection in its own thread
(a slow rekey never blocks a cancel):

  {"op": "rekey", "path": P, "version": V, "rate": R, "chunk_blocks": C}
        -> {"outcome": O, "bytes": N} | {"errno": E, "error": MSG}
  {"op": "cancel", "on": bool}   {"op": "bump"}   {"op": "invalidate"}   {"op": "stats"}
  {"op": "drop_keys"}
  {"op": "leftovers"}            -> {"removed": N}  (rekeyfile.remove_leftovers)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

from fuse_helpers import serve_child  # noqa: E402


class RekeyGuard:
    """A running guard point (served by a child) that can rekey its files."""

    def __init__(self, mnt: Path, backing: Path, workdir: Path, proc) -> None:
        self.mnt, self.backing, self.workdir, self.proc = mnt, backing, workdir, proc
        self.sock_path = str(workdir / "control.sock")

    def call(self, req: dict, timeout: float | None = 120.0) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock_path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the guard server closed the connection")
                buf += chunk
        return json.loads(buf)

    def rekey(self, path: str, *, version: int = 0, rate: int = 0, chunk_blocks: int = 256,
              timeout: float | None = 120.0) -> tuple[str, int]:
        r = self.call({"op": "rekey", "path": path, "version": version, "rate": rate,
                       "chunk_blocks": chunk_blocks}, timeout)
        if "errno" in r:
            raise OSError(r["errno"], r["error"])
        return r["outcome"], r["bytes"]

    def rekey_async(self, path: str, **kw) -> RekeyCall:
        return RekeyCall(self, path, kw)

    def cancel(self, on: bool = True) -> None:
        self.call({"op": "cancel", "on": on})

    def bump(self) -> None:
        self.call({"op": "bump"})

    def invalidate(self) -> None:
        self.call({"op": "invalidate"})

    def drop_keys(self) -> None:
        self.call({"op": "drop_keys"})

    def stats(self) -> dict:
        return self.call({"op": "stats"})["stats"]

    def leftovers(self) -> int:
        return self.call({"op": "leftovers"})["removed"]

    def audit_events(self) -> list[dict]:
        p = self.workdir / "audit.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class RekeyCall(threading.Thread):
    """A rekey running in the background (result() waits for it)."""

    def __init__(self, guard: RekeyGuard, path: str, kw: dict) -> None:
        super().__init__(daemon=True)
        self.guard, self.path, self.kw = guard, path, kw
        self.value: tuple[str, int] | BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.guard.rekey(self.path, **self.kw)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self.value = e

    def result(self, timeout: float = 120.0) -> tuple[str, int]:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"rekey of {self.path} still running")
        if isinstance(self.value, BaseException):
            raise self.value
        assert self.value is not None
        return self.value


def make_keystore(tmp: Path, key_name: str = "guard") -> tuple[Path, Path]:
    """A local keystore with key ``key_name`` at version 1: (keystore, master key)."""
    sys.path.insert(0, str(SRC))
    from takakrypt.keys import generate_master_key_file, open_keystore
    mk, ks = tmp / "master.key", tmp / "keystore.json"
    generate_master_key_file(str(mk))
    with open_keystore(str(ks), master_key_file=str(mk), create=True) as k:
        k.create(key_name)
    return ks, mk


def rotate(keys: tuple[Path, Path], name: str = "guard") -> int:
    """A new version of key ``name`` in the keystore ``keys`` (make_keystore's pair)."""
    sys.path.insert(0, str(SRC))
    from takakrypt.keys import open_keystore
    with open_keystore(str(keys[0]), master_key_file=str(keys[1])) as ks:
        return ks.rotate(name).current_version


def key_lookup(keys: tuple[Path, Path]):
    """``lookup(name, version)`` of the keystore, for the reference reader."""
    sys.path.insert(0, str(SRC))
    from takakrypt.keys import open_keystore
    ks = open_keystore(str(keys[0]), master_key_file=str(keys[1]))
    return lambda name, version: ks.get(name, version)


def header(path: Path):
    """The parsed header of a stored (backing) file."""
    sys.path.insert(0, str(SRC))
    from takakrypt import format as fmt
    with open(path, "rb") as f:
        return fmt.parse_header(f.read(fmt.HEADER_SIZE))


@contextlib.contextmanager
def rekey_mount(tmp: Path, keystore: Path, master_key: Path, *, key_name: str = "guard",
                in_place: bool = False, threads: int = 4, io_uring: bool | None = None,
                metadata_cache: float = 1.0, env: dict | None = None,
                format_version: int = 1):
    """Mount a guard point over ``tmp/backing`` (or ``tmp/data`` in place) served by a
    child process with the keystore's keys; yields a :class:`RekeyGuard`."""
    if io_uring is None:
        io_uring = os.environ.get("TAKAKRYPT_TEST_IO_URING", "1") != "0"
    tmp = Path(tmp)
    workdir = Path(tempfile.mkdtemp(prefix="rekey-", dir=tmp))
    if in_place:
        mnt = backing = tmp / "data"
    else:
        backing, mnt = tmp / "backing", tmp / "mnt"
        mnt.mkdir(exist_ok=True)
    backing.mkdir(exist_ok=True)
    spec = {"mountpoint": str(mnt), "backing": None if in_place else str(backing),
            "keystore": str(keystore), "master_key": str(master_key), "key_name": key_name,
            "threads": threads, "io_uring": io_uring, "metadata_cache": metadata_cache,
            "audit_log": str(workdir / "audit.jsonl"), "socket": str(workdir / "control.sock"),
            "env": env or {}, "format_version": format_version}
    (workdir / "spec.json").write_text(json.dumps(spec))
    with serve_child(Path(__file__), workdir, mnt) as proc:
        yield RekeyGuard(mnt, backing, workdir, proc)


# ---------------------------------------------------------------------------------------
# the server (child process)


def _serve(spec_path: str) -> int:
    sys.path.insert(0, str(SRC))
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec.get("env") or {})
    from takakrypt import rekeyfile
    from takakrypt.guard import GuardPoint, effects_mask
    from takakrypt.keys import open_keystore
    from takakrypt.sigflags import SignalFlags

    ks = open_keystore(spec["keystore"], master_key_file=spec["master_key"])
    lock = threading.Lock()
    audit_log = open(spec["audit_log"], "a", buffering=1)

    raw_uid = int(os.environ.get("TK_TEST_RAW_UID", "-1"))  # gets the stored bytes

    def decide(uid, gid, pid, path, action):
        if uid == raw_uid:
            return effects_mask(["permit"]), 1, 0, 60.0
        return effects_mask(["permit", "apply_key"]), 0, 0, 60.0

    def audit(kind, uid, gid, pid, path, action, effects, detail):
        with lock:
            audit_log.write(json.dumps({"kind": kind, "path": path, "action": action,
                                        "detail": detail}) + "\n")

    gp = GuardPoint(spec["mountpoint"], backing=spec["backing"], key_name=spec["key_name"],
                    get_key=lambda name, version: ks.get(name, version),
                    current_version=lambda name: ks.info(name).current_version,
                    decide=decide, audit=audit, threads=spec["threads"],
                    io_uring=spec["io_uring"], metadata_cache=spec["metadata_cache"],
                    format_version=spec.get("format_version", 1))
    if raw_uid < 0:
        gp.set_policy_hints(True, True, True)
    sigs = SignalFlags(signal.SIGTERM, signal.SIGINT)
    gp.mount()

    def handle(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            req = json.loads(f.readline())
            op = req["op"]
            try:
                if op == "rekey":
                    outcome, n = gp.rekey_file(req["path"], version=req.get("version", 0),
                                               rate=req.get("rate", 0),
                                               chunk_blocks=req.get("chunk_blocks", 256))
                    ans = {"outcome": outcome, "bytes": n}
                elif op == "cancel":
                    gp.rekey_cancel(req.get("on", True))
                    ans = {}
                elif op == "bump":
                    gp.bump_generation()
                    ans = {}
                elif op == "invalidate":
                    gp.invalidate()
                    ans = {}
                elif op == "drop_keys":
                    gp.drop_keys()
                    ans = {}
                elif op == "stats":
                    ans = {"stats": gp.stats()}
                elif op == "leftovers":
                    fd = gp.backing_fd()
                    try:
                        ans = {"removed": rekeyfile.remove_leftovers(fd)}
                    finally:
                        os.close(fd)
                else:
                    ans = {"errno": 22, "error": f"unknown op {op}"}
            except OSError as e:
                ans = {"errno": e.errno, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - answered, never kills the server
                ans = {"errno": 5, "error": f"{type(e).__name__}: {e}"}
            conn.sendall(json.dumps(ans).encode() + b"\n")

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(spec["socket"])
    srv.listen(16)
    srv.settimeout(0.05)
    tmpf = Path(spec_path).parent / "server.pid.tmp"
    tmpf.write_text(str(os.getpid()))
    os.rename(tmpf, Path(spec_path).parent / "server.pid")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while not sigs.seen(signal.SIGTERM, signal.SIGINT):
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    finally:
        gp.unmount()
        ks.close()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
