"""takakrypt.agent.krekey, the agent's side of a live rekey on kernel guard points
(docs/kernel.md, "Live rekey"), on the host (the module's side runs in the VM:
tests/kernel/guest/test_tkfs_rekey.py):

* the ioctl ABI: ``kernel/include/uapi/takakrypt_ioctl.h`` (compiled here with gcc) and
  its Python twin agree on every struct size, field offset and ioctl number;
* the journal of the range being sealed again: after a crash, a torn block gets its
  journaled copy back, a block that verifies is left alone (whatever its version), and a
  journal that is incomplete, damaged or names a file replaced since is dropped.  A
  plain directory stands in for the mount here: takakryptd sees the stored bytes through
  it, as it does through takakryptfs."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from takakrypt import format as fmt
from takakrypt.agent import krekey
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import IntegrityError

UAPI = Path(__file__).resolve().parents[1] / "kernel" / "include" / "uapi"

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

STRUCTS = {"takakrypt_rekey_range": krekey.RekeyRange,
           "takakrypt_rekey_finish": krekey.RekeyFinish}


def _c_layout(tmp_path: Path) -> dict[str, int]:
    lines = []
    for cname, py in STRUCTS.items():
        lines.append(f'printf("{cname}=%zu\\n", sizeof(struct {cname}));')
        for f, _ in py._fields_:
            lines.append(f'printf("{cname}.{f}=%zu\\n", offsetof(struct {cname}, {f}));')
    for name in ("TAKAKRYPT_IOC_REKEY_RANGE", "TAKAKRYPT_IOC_REKEY_FINISH",
                 "TAKAKRYPT_REKEY_MAX_BLOCKS"):
        lines.append(f'printf("{name}=%lu\\n", (unsigned long){name});')
    src = tmp_path / "l.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include \"takakrypt_ioctl.h\"\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    exe = tmp_path / "l"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic",
                    f"-I{UAPI}", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (x.split("=") for x in out.split())}


@needs_gcc
def test_ioctl_abi_matches_python(tmp_path: Path) -> None:
    c = _c_layout(tmp_path)
    for cname, py in STRUCTS.items():
        assert c[cname] == ctypes.sizeof(py), cname
        for f, _ in py._fields_:
            assert c[f"{cname}.{f}"] == getattr(py, f).offset, f"{cname}.{f}"
    assert c["TAKAKRYPT_IOC_REKEY_RANGE"] == krekey.IOC_REKEY_RANGE
    assert c["TAKAKRYPT_IOC_REKEY_FINISH"] == krekey.IOC_REKEY_FINISH
    assert c["TAKAKRYPT_REKEY_MAX_BLOCKS"] == krekey.MAX_BLOCKS


def test_state_directory_is_per_guard_point() -> None:
    a = krekey.state_dir_for("/var/lib/takakrypt", "/data/pg")
    assert a == krekey.state_dir_for("/var/lib/takakrypt", "/data/pg/")
    assert a != krekey.state_dir_for("/var/lib/takakrypt", "/data/pg2")
    assert a.startswith("/var/lib/takakrypt/rekey/") and len(Path(a).name) == 16


def test_rekey_file_refuses_bad_paths(tmp_path: Path) -> None:
    k = krekey.KernelRekeyFiles(str(tmp_path), str(tmp_path / "state"), str(tmp_path), "k1")
    for bad in ("", "/abs", "a/../b", "./a", "a//b"):
        with pytest.raises(OSError) as e:
            k.rekey_file(bad, version=2)
        assert e.value.errno == 22, bad
    with pytest.raises(ValueError):
        k.rekey_file("a", version=0)
    k.rekey_cancel(True)
    assert k.rekey_file("a", version=2) == ("cancelled", 0)


# ---- the journal ---------------------------------------------------------------------
KEYS = {("k1", 1): bytes(range(32)), ("k1", 2): bytes(range(32, 64))}
SBS = krekey.STORED_BLOCK


def _keys(name: str, version: int) -> bytearray:
    return bytearray(KEYS[(name, version)])


def _file(path: Path, data: bytes) -> bytes:
    """A v2 file of k1 version 1 holding data; its stored bytes."""
    with TakaFile.create(str(path), "k1", 1, _keys("k1", 1), format_version=2) as f:
        f.write(0, data)
    return path.read_bytes()


def _read(path: Path) -> bytes:
    with TakaFile.open(str(path), _keys) as f:
        return f.read(0, f.size)


def _off(i: int) -> int:
    return fmt.HEADER_SIZE + i * SBS


@pytest.fixture
def kr(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    k = krekey.KernelRekeyFiles(str(mnt), str(tmp_path / "state"), str(mnt), "k1")
    os.close(k.state_fd())
    return k, mnt


def _header_id(path: Path) -> bytes:
    return fmt.parse_header(path.read_bytes()[:fmt.HEADER_SIZE]).file_id


def test_torn_block_gets_its_journaled_copy_back(kr) -> None:
    k, mnt = kr
    data = os.urandom(5 * 4096 + 100)
    stored = _file(mnt / "f", data)
    k._journal_write("f", _header_id(mnt / "f"), 1, stored[_off(1):_off(4)])
    # a power cut mid-write: block 2's first page new (garbage here), the rest old
    torn = bytearray(stored)
    torn[_off(2):_off(2) + 3000] = os.urandom(3000)
    (mnt / "f").write_bytes(torn)
    with pytest.raises(IntegrityError):
        _read(mnt / "f")
    assert k.replay(_keys) == 1
    assert (mnt / "f").read_bytes() == stored
    assert _read(mnt / "f") == data
    assert os.path.getsize(k.journal_path) == 0  # emptied: a second replay does nothing
    assert k.replay(_keys) == 0


def test_blocks_that_verify_are_left_alone(kr) -> None:
    k, mnt = kr
    stored = _file(mnt / "f", os.urandom(3 * 4096))
    k._journal_write("f", _header_id(mnt / "f"), 0, stored[_off(0):])
    # the range was written again completely after the journal (a newer write)
    with TakaFile.open(str(mnt / "f"), _keys, writable=True) as f:
        f.write(4096, b"newer")
    after = (mnt / "f").read_bytes()
    assert after != stored
    assert k.replay(_keys) == 0
    assert (mnt / "f").read_bytes() == after


def test_incomplete_or_foreign_journals_are_dropped(kr) -> None:
    k, mnt = kr
    stored = _file(mnt / "f", os.urandom(2 * 4096))
    fid = _header_id(mnt / "f")
    torn = bytearray(stored)
    torn[_off(0) + 10:_off(0) + 20] = b"x" * 10
    (mnt / "f").write_bytes(torn)
    # the journal itself cut short (the crash came before its fsync): dropped, nothing
    # written (the module never started on that range)
    k._journal_write("f", fid, 0, stored[_off(0):])
    j = Path(k.journal_path).read_bytes()
    Path(k.journal_path).write_bytes(j[:-10])
    assert k.replay(_keys) == 0
    assert (mnt / "f").read_bytes() == torn
    for bad in (b"", b"TKRJ", b"TKRJ\xff\xff\xff\xff", b"XXXX" + j[4:], j[:8] + b"[" + j[9:]):
        Path(k.journal_path).write_bytes(bad)
        assert k.replay(_keys) == 0
    # a journal naming a file replaced since (another file id): dropped
    k._journal_write("f", os.urandom(16), 0, stored[_off(0):])
    assert k.replay(_keys) == 0
    assert (mnt / "f").read_bytes() == torn
    # a journal naming a file that is gone, or a path leaving the guard point
    k._journal_write("gone", fid, 0, stored[_off(0):])
    assert k.replay(_keys) == 0
    k._journal_write("../f", fid, 0, stored[_off(0):])
    assert k.replay(_keys) == 0
    assert (mnt / "f").read_bytes() == torn
    assert os.path.getsize(k.journal_path) == 0
    # and the real journal still works after all that
    k._journal_write("f", fid, 0, stored[_off(0):])
    assert k.replay(_keys) == 1
    assert (mnt / "f").read_bytes() == stored


def test_journal_is_private(kr) -> None:
    k, mnt = kr
    _file(mnt / "f", b"x")
    k._journal_write("f", _header_id(mnt / "f"), 0, b"\0" * 10)
    assert os.stat(k.journal_path).st_mode & 0o777 == 0o600
    assert os.stat(k.state_path).st_mode & 0o777 == 0o700


def test_old_blocks_are_found_holes_are_not() -> None:
    blk = bytearray(os.urandom(SBS))
    blk[-4:] = (1).to_bytes(4, "little")
    assert krekey._has_old_block(bytes(blk), 2)
    assert not krekey._has_old_block(bytes(blk), 1)
    assert not krekey._has_old_block(bytes(SBS) * 3, 2)  # holes
    tail = bytes(blk[:100]) + (1).to_bytes(4, "little")
    assert krekey._has_old_block(bytes(SBS) + tail, 2)   # a short last block
    assert not krekey._has_old_block(b"", 2)
