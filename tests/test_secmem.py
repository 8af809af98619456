"""Keys in memory (issue 14, item 7d): key schedules and derived keys live in secure
memory (src/_native/secmem.c): locked, left out of core dumps, zero in a fork()ed child,
wiped on free; the processes that hold keys write no core files.

The strongest checks scan a process's memory from the outside: every readable mapping a
core dump would hold (no ``dd`` in smaps' VmFlags) is read through /proc/PID/mem and
searched for the AES round keys 2..14 of a key the process holds, which only a key
schedule contains (the process itself never computes them in Python).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from takakrypt import _aesgcm
from takakrypt._aesgcm import BlockCipher

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# ci/asan.sh: ASan turns mlock() into a no-op ("mlock is unsupported" by its allocator)
# and keeps freed heap blocks, key copies included, in its quarantine.
UNDER_ASAN = "libasan" in Path("/proc/self/maps").read_text()
LOCKED = set() if UNDER_ASAN else {"lo"}

needs_ipsecmb = pytest.mark.skipif("ipsecmb" not in _aesgcm.engines(),
                                   reason="intel-ipsec-mb cannot run on this CPU")

# -- AES-256 key expansion (FIPS-197 5.2), to know what a schedule looks like --------

_SBOX = bytes.fromhex(
    "637c777bf26b6fc53001672bfed7ab76ca82c97dfa5947f0add4a2af9ca472c0"
    "b7fd9326363ff7cc34a5e5f171d8311504c723c31896059a071280e2eb27b275"
    "09832c1a1b6e5aa0523bd6b329e32f8453d100ed20fcb15b6acbbe394a4c58cf"
    "d0efaafb434d338545f9027f503c9fa851a3408f929d38f5bcb6da2110fff3d2"
    "cd0c13ec5f974417c4a77e3d645d197360814fdc222a908846eeb814de5e0bdb"
    "e0323a0a4906245cc2d3ac629195e479e7c8376d8dd54ea96c56f4ea657aae08"
    "ba78252e1ca6b4c6e8dd741f4bbd8b8a703eb5664803f60e613557b986c11d9e"
    "e1f8981169d98e949b1e87e9ce5528df8ca1890dbfe6426841992d0fb054bb16")


def aes256_round_keys(key: bytes) -> list[bytes]:
    """The 15 round keys of AES-256 (round key 0 and 1 are the key itself)."""
    w = [bytes(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = w[i - 1]
        if i % 8 == 0:
            t = bytes(_SBOX[b] for b in t[1:] + t[:1])
            t = bytes([t[0] ^ rcon]) + t[1:]
            rcon = (rcon << 1) ^ (0x11B if rcon & 0x80 else 0)
        elif i % 8 == 4:
            t = bytes(_SBOX[b] for b in t)
        w.append(bytes(a ^ b for a, b in zip(w[i - 8], t)))
    return [b"".join(w[4 * r:4 * r + 4]) for r in range(15)]


# -- reading a process's memory -------------------------------------------------------

def mappings(pid: int | str) -> list[dict]:
    """/proc/PID/smaps as [{lo, hi, name, flags: set, locked_kb}]."""
    out: list[dict] = []
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = head.match(line)
            if m:
                out.append({"lo": int(m[1], 16), "hi": int(m[2], 16), "name": m[3],
                            "flags": set(), "locked_kb": 0})
            elif line.startswith("VmFlags:"):
                out[-1]["flags"] = set(line.split()[1:])
            elif line.startswith("Locked:"):
                out[-1]["locked_kb"] = int(line.split()[1])
    return out


def mapping_of(addr: int, pid: int | str = "self") -> dict:
    found = [m for m in mappings(pid) if m["lo"] <= addr < m["hi"]]
    assert len(found) == 1, hex(addr)
    return found[0]


def dumpable_hits(pid: int, needles: list[bytes]) -> list[str]:
    """Where in the dumpable, readable memory of `pid` any of `needles` occurs."""
    hits = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in mappings(pid):
            if "rd" not in m["flags"] or "dd" in m["flags"] or m["name"] == "[vsyscall]":
                continue
            try:
                mem.seek(m["lo"])
                data = mem.read(m["hi"] - m["lo"])
            except OSError:  # guard pages, device mappings
                continue
            for n in needles:
                at = data.find(n)
                if at >= 0:
                    hits.append(f"{n[:4].hex()}.. at {m['lo'] + at:#x} in {m['name'] or 'anon'}"
                                f" {sorted(m['flags'])}")
    return hits


def in_child(fn) -> bytes:
    """Run ``fn() -> bytes`` in a fork()ed child; return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, fn())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return got


# -- the native cipher -----------------------------------------------------------------

@needs_ipsecmb
def test_key_schedule_is_locked_undumped_and_wiped_on_fork() -> None:
    c = BlockCipher(os.urandom(32), engine="ipsecmb")
    addr, size = c._key_area()
    m = mapping_of(addr)
    assert m["lo"] <= addr + size <= m["hi"]
    assert LOCKED | {"dd", "wf"} <= m["flags"], m["flags"]  # locked, dont-dump, wipe-on-fork
    assert m["locked_kb"] > 0 or UNDER_ASAN
    st = _aesgcm.secure_memory_stats()
    assert st["in_use"] >= 1 and st["bytes_locked"] > 0 and st["lock_failures"] == 0


@needs_ipsecmb
def test_the_schedule_is_the_aes_expansion_and_is_zeroed_on_wipe() -> None:
    key = os.urandom(32)
    c = BlockCipher(key, engine="ipsecmb")
    addr, size = c._key_area()
    assert _aesgcm._secure_peek(addr, 240) == b"".join(aes256_round_keys(key))
    before = _aesgcm.secure_memory_stats()["in_use"]
    c.wipe()
    assert _aesgcm.secure_memory_stats()["in_use"] == before - 1
    assert _aesgcm._secure_peek(addr, size) == bytes(size)  # still mapped, now zero


@needs_ipsecmb
def test_an_inherited_cipher_is_zero_in_the_child_and_fails_closed() -> None:
    key = os.urandom(32)
    c = BlockCipher(key, engine="ipsecmb")
    addr, size = c._key_area()

    def child() -> bytes:
        zero = _aesgcm._secure_peek(addr, size) == bytes(size)
        try:
            c.encrypt(b"x" * 100, b"", 0)
            refused = False
        except RuntimeError as e:
            refused = "fork" in str(e)
        c.wipe()  # freeing an inherited slot works
        fresh = BlockCipher(key, engine="ipsecmb")  # a new one does
        ok = fresh.decrypt(fresh.encrypt(b"y" * 10, b"", 0), b"", 0) == b"y" * 10
        return bytes([zero, refused, ok])

    got = in_child(child)
    assert got == b"\x01\x01\x01"  # zeroed, refused with an error, re-creatable
    assert c.decrypt(c.encrypt(b"z", b"", 0), b"", 0) == b"z"  # the parent is unaffected


_UNLOCKABLE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from test_secmem import mapping_of
from takakrypt import _aesgcm
from takakrypt.keys.secret import lock, lock_stats
c = _aesgcm.BlockCipher(os.urandom(32), engine="ipsecmb")
ok = c.decrypt(c.encrypt(b"data", b"", 0), b"", 0) == b"data"
m = mapping_of(c._key_area()[0])
print(json.dumps({"ok": ok, "flags": sorted(m["flags"]), "native": _aesgcm.secure_memory_stats(),
                  "py_locked": lock(bytearray(32)), "py": lock_stats()}))
"""


def _no_memlock() -> None:  # preexec_fn: no CAP_IPC_LOCK, RLIMIT_MEMLOCK 0
    import resource
    _libc().prctl(PR_CAPBSET_DROP, 14, 0, 0, 0)  # CAP_IPC_LOCK
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


@needs_ipsecmb
@pytest.mark.skipif(UNDER_ASAN, reason="ASan's mlock() never fails")
def test_mlock_refused_fails_soft() -> None:
    """An unprivileged process over RLIMIT_MEMLOCK still encrypts: its key pages are
    unlocked but still undumped and wiped on fork, and the refusals are counted."""
    import json
    r = subprocess.run([sys.executable, "-c", _UNLOCKABLE, str(HERE)], capture_output=True,
                       preexec_fn=_no_memlock, env=dict(os.environ, PYTHONPATH=str(SRC)),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"]
    assert {"dd", "wf"} <= set(out["flags"]) and "lo" not in out["flags"]
    assert out["native"]["lock_failures"] >= 1 and out["native"]["bytes_locked"] == 0
    assert out["py_locked"] is False and out["py"]["lock_failures"] >= 1


_HOLDER = """
import sys
from takakrypt._aesgcm import BlockCipher
key = bytes.fromhex(sys.argv[1])  # kept: the scan must find it
c = BlockCipher(key, engine="ipsecmb")
c.encrypt(b"x" * 100000, b"", 0)
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holder(key: bytes):
    """A child process holding a cipher for `key` (never the round keys in Python)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, key.hex()], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready and p.stdout.readline() == b"ready\n"
        yield p.pid
    finally:
        p.kill()
        p.wait()


@needs_ipsecmb
def test_no_round_key_in_the_dumpable_memory_of_a_cipher_holder() -> None:
    key = os.urandom(32)
    needles = aes256_round_keys(key)[2:]
    with holder(key) as pid:
        assert dumpable_hits(pid, needles) == []
        # the scan does find what is dumpable: the key itself (a Python bytes object)
        assert dumpable_hits(pid, [key]) != []


# -- the guard point -------------------------------------------------------------------

def _fuse_skip() -> str | None:
    sys.path.insert(0, str(HERE))
    from fuse_helpers import fuse_skip_reason
    return fuse_skip_reason()


@needs_ipsecmb
@pytest.mark.skipif(_fuse_skip() is not None, reason=str(_fuse_skip()))
def test_guard_point_keeps_file_keys_out_of_dumpable_memory(tmp_path: Path) -> None:
    """The engine's per-file block key schedule and header MAC key (derived in C, never
    seen by Python in the server) are in no dumpable mapping of the server while the
    file is open and after it was read."""
    from fuse_helpers import guard_mount

    from takakrypt import format as fmt

    key = os.urandom(32)
    with guard_mount(tmp_path, key=key) as g:
        f = g.mnt / "secret.txt"
        f.write_bytes(b"TOP-SECRET " * 1000)
        with open(f, "rb") as fh:
            assert fh.read(11) == b"TOP-SECRET "
            file_id = (g.backing / "secret.txt").read_bytes()[16:32]
            enc, mac = fmt.derive_file_keys(bytearray(key), file_id)
            needles = [bytes(mac), *aes256_round_keys(bytes(enc))[2:]]
            assert dumpable_hits(g.proc.pid, needles) == []
        assert (g.mnt / "secret.txt").read_bytes() == b"TOP-SECRET " * 1000
        assert dumpable_hits(g.proc.pid, needles) == []


# -- the processes that hold keys ----------------------------------------------------------
#
# Dumpability is seen from outside through /proc/PID/mem: the kernel refuses a
# non-dumpable process's memory to a reader without CAP_SYS_PTRACE even under the same
# uid.  Its capability rule (the reader's effective set must cover the target's permitted
# set) would refuse a full-capability root target anyway, so the targets run without
# CAP_SYS_PTRACE in their bounding set and the reader drops it from its effective set:
# then only dumpability decides.

PR_CAPBSET_DROP, CAP_SYS_PTRACE = 24, 19


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _without_ptrace_cap() -> None:  # preexec_fn of a target
    _libc().prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0)


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, preexec_fn=_without_ptrace_cap,
                            env=dict(os.environ, PYTHONPATH=str(SRC)), **kw)


def assert_hardened(pid: int) -> None:
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(ln for ln in limits.splitlines() if ln.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    assert not memory_readable(pid)  # not dumpable


def memory_readable(pid: int) -> bool:
    """Can a same-uid reader without CAP_SYS_PTRACE open /proc/PID/mem?"""
    def child() -> bytes:
        _drop_effective_cap(_libc(), CAP_SYS_PTRACE)
        try:
            with open(f"/proc/{pid}/mem", "rb"):
                return b"1"
        except PermissionError:
            return b"0"

    return in_child(child) == b"1"


def test_the_dumpability_probe_tells_the_two_apart() -> None:
    plain = spawn([sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    hardened = spawn([sys.executable, "-c", "import sys; from takakrypt.cli import "
                      "harden_process; harden_process(); print(flush=True); sys.stdin.read()"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for p in (plain, hardened):
            p.stdout.readline()
        assert memory_readable(plain.pid)
        assert_hardened(hardened.pid)
    finally:
        for p in (plain, hardened):
            p.kill()
            p.wait()


@pytest.mark.skipif(_fuse_skip() is not None, reason=str(_fuse_skip()))
def test_guard_server_writes_no_core_file(tmp_path: Path) -> None:
    """`python -m takakrypt.guard` (the foreground server) hardens itself like the CLI
    and the agent: RLIMIT_CORE 0 and not dumpable."""
    from fuse_helpers import unmount_path

    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    mnt, back = tmp_path / "mnt", tmp_path / "back"
    mnt.mkdir()
    back.mkdir()
    p = spawn([sys.executable, "-m", "takakrypt.guard", "--mountpoint", str(mnt),
               "--backing", str(back), "--key-file", str(keyfile), "--allow-all"],
              stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready and p.stdout.readline().startswith(b"mounted")
        assert_hardened(p.pid)
    finally:
        p.terminate()
        p.wait()
        unmount_path(str(mnt))


def test_agent_writes_no_core_file(tmp_path: Path) -> None:
    """takakryptd (which serves the guard points in production) hardens itself."""
    import time

    from agent_helpers import base_config, write_config

    cfg = base_config(tmp_path)
    write_config(tmp_path / "takakrypt.yaml", cfg)
    p = spawn([sys.executable, "-m", "takakrypt.agent.daemon", "--config",
               str(tmp_path / "takakrypt.yaml"), "--foreground"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = Path(cfg["agent"]["control_socket"])
        for _ in range(3000):  # a wait for start-up, not a timed assertion
            if sock.exists() or p.poll() is not None:
                break
            time.sleep(0.01)
        assert p.poll() is None and sock.exists()
        assert_hardened(p.pid)
    finally:
        p.terminate()
        p.wait()


def _drop_effective_cap(libc, cap: int) -> None:
    """capset(2): remove `cap` from the effective and permitted sets of this thread."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    hdr = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    word, bit = divmod(cap, 32)
    data[word].effective &= ~(1 << bit)
    data[word].permitted &= ~(1 << bit)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


# -- the Python key buffers ------------------------------------------------------------

def _buffer_address(buf: bytearray) -> int:
    import ctypes
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def test_keystore_buffers_are_locked_undumped_and_released_by_wipe(tmp_path: Path) -> None:
    from takakrypt.keys import generate_master_key_file, open_keystore, wipe
    from takakrypt.keys.secret import lock_stats

    mk = tmp_path / "master.key"
    generate_master_key_file(str(mk))
    with open_keystore(str(tmp_path / "ks.json"), master_key_file=str(mk), create=True) as ks:
        ks.create("k")
        key = ks.get("k")
        held = lock_stats()["buffers"]
        for buf in (key, ks._keys.wrap.value, ks._keys.mac.value):
            m = mapping_of(_buffer_address(buf))
            assert LOCKED | {"dd"} <= m["flags"], m
            assert m["locked_kb"] > 0 or UNDER_ASAN
        wipe(key)
        assert key == bytes(32)
        assert lock_stats()["buffers"] == held - 1
    assert lock_stats()["lock_failures"] == 0


_KEYSTORE_HOLDER = """
import sys
from takakrypt.keys import open_keystore
ks = open_keystore(sys.argv[1], master_key_file=sys.argv[2])
key = ks.get("k")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine keeps freed Python objects "
                    "(cryptography's key copies) readable; the normal build runs this")
def test_no_keystore_key_in_the_dumpable_memory_of_its_holder(tmp_path: Path) -> None:
    """A process holding an open keystore and an unwrapped data key: neither the key
    nor the keystore's wrapping and MAC keys are in a mapping a core dump would hold."""
    from takakrypt.keys import generate_master_key_file, open_keystore

    mk, path = tmp_path / "master.key", tmp_path / "ks.json"
    generate_master_key_file(str(mk))
    with open_keystore(str(path), master_key_file=str(mk), create=True) as ks:
        ks.create("k")
        secrets = [bytes(ks.get("k")), bytes(ks._keys.wrap.value), bytes(ks._keys.mac.value)]
    p = subprocess.Popen([sys.executable, "-c", _KEYSTORE_HOLDER, str(path), str(mk)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready and p.stdout.readline() == b"ready\n"
        assert dumpable_hits(p.pid, secrets) == []
    finally:
        p.kill()
        p.wait()
