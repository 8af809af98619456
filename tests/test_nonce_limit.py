"""The per-file GCM budget (docs/file-format.md, "Encryption count"): header bytes
104..111 count the block encryptions reserved under the file key, leased ahead in
chunks; writers warn past the soft limit and refuse past the hard one.

The limits are lowered for the test: module constants for the Python writer, and for
the C engine a test build (CFLAGS=-DTK_TEST_NONCE_LIMITS, built here in a copy of the
tree) that reads TK_TEST_NONCE_LIMITS="chunk:soft:hard" from its environment.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fuse_helpers
from fuse_helpers import fuse_skip_reason, guard_mount, sweep_stale_mounts
from takakrypt import format as fmt
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import KeyUsageExhausted
from takakrypt.stream import decrypt_file, encrypt_file, inspect_file

KEY = bytes(range(32))
BS = 4096
ROOT = Path(__file__).resolve().parent.parent


def _keys(name, version):
    return bytearray(KEY)


def _lease(path: Path) -> int:
    return fmt.parse_header(path.read_bytes()[:fmt.HEADER_SIZE]).encryptions


@pytest.fixture
def low_limits(monkeypatch):
    monkeypatch.setattr(fmt, "NONCE_CHUNK", 4)
    monkeypatch.setattr(fmt, "NONCE_SOFT_LIMIT", 8)
    monkeypatch.setattr(fmt, "NONCE_HARD_LIMIT", 16)


def test_count_is_leased_in_the_header(tmp_path, low_limits, caplog):
    p = tmp_path / "f.taka"
    data = os.urandom(3 * BS)
    with TakaFile.create(str(p), "k", 1, bytearray(KEY)) as f:
        assert _lease(p) == 4  # the first lease comes with the new file's header
        f.write(0, data)  # 3 encryptions
        assert _lease(p) == 4
        f.write(0, data[:BS])  # 4
        assert _lease(p) == 4
        f.write(BS, data[BS:2 * BS])  # 5: a new lease, written before the encryption
        assert _lease(p) == 5 + 4
    # reopened, the whole lease counts as used (it may have been, before a crash)
    with caplog.at_level(logging.WARNING, logger="takakrypt.cryptofile"):
        with TakaFile.open(str(p), _keys, writable=True) as f:
            f.write(0, b"x")  # 10
            assert _lease(p) == 10 + 4 and "re-key" in caplog.text  # past the soft limit
            f.write(BS, b"y")  # 11
            f.write(2 * BS, b"z")  # 12
            f.write(0, b"a")  # 13
            f.write(0, b"b")  # 14
            assert _lease(p) == 14
            f.write(0, b"c")  # 15: lease capped at the hard limit
            assert _lease(p) == 16
            f.write(0, b"d")  # 16
            before = p.read_bytes()
            with pytest.raises(KeyUsageExhausted):
                f.write(0, b"e")
            with pytest.raises(KeyUsageExhausted):
                f.truncate(100)  # re-encrypts the new last block: refused too
    assert p.read_bytes() == before  # nothing changed
    with TakaFile.open(str(p), _keys) as f:
        assert f.read(0, 1) == b"d" and f.size == 3 * BS
    assert KeyUsageExhausted.exit_code not in (4, 5)  # a key problem, not a file problem


def test_every_reader_accepts_the_count(tmp_path):
    """The field is authenticated data, not a reserved zero: every reader takes it."""
    p = tmp_path / "f.taka"
    data = os.urandom(5000)
    with TakaFile.create(str(p), "guard", 1, bytearray(KEY)) as f:
        f.write(0, data)
    assert _lease(p) == fmt.NONCE_CHUNK
    assert inspect_file(str(p))["plaintext_size"] == 5000
    decrypt_file(str(p), str(tmp_path / "o"), _keys)
    assert (tmp_path / "o").read_bytes() == data
    # a tampered count fails the header tag
    raw = bytearray(p.read_bytes())
    raw[104] ^= 1
    (tmp_path / "t.taka").write_bytes(raw)
    with pytest.raises(Exception, match="header failed authentication"):
        decrypt_file(str(tmp_path / "t.taka"), None, _keys)


def test_stream_encrypt_counts_exactly(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(os.urandom(3 * BS + 1))
    encrypt_file(str(src), str(tmp_path / "out"), "k", 1, bytearray(KEY))
    assert _lease(tmp_path / "out") == 4


def test_xform_counts_exactly(tmp_path):
    from takakrypt import xform
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_bytes(os.urandom(5 * BS + 7))
    xform.run(str(d), keys=_keys, key_name="k", key_version=1, decrypt=False)
    assert _lease(d / "a") == 6


# --- the C engine -----------------------------------------------------------------------

fuse_only = pytest.mark.skipif(fuse_skip_reason() is not None or not shutil.which("gcc"),
                               reason=fuse_skip_reason() or "needs gcc")


@pytest.fixture(scope="module")
def test_build(tmp_path_factory):
    """A copy of the tree with the native code built with -DTK_TEST_NONCE_LIMITS."""
    work = tmp_path_factory.mktemp("nonce-build")
    for d in ("src", "kernel", "tests"):
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns(
            "*.so", "__pycache__", ".pytest_cache"))
    for f in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, work / f)
    env = dict(os.environ, CFLAGS=(os.environ.get("CFLAGS", "") + " -DTK_TEST_NONCE_LIMITS"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work,
                       env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return work


def _direct_write(path: Path, off: int, byte: int) -> int:
    """One aligned 4 KiB O_DIRECT write (one block encryption); 0 or the errno."""
    buf = mmap.mmap(-1, BS)
    buf.write(bytes([byte]) * BS)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        os.pwritev(fd, [buf], off)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
        buf.close()


@fuse_only
def test_engine_leases_warns_and_refuses(wtmp, test_build, monkeypatch):
    sweep_stale_mounts()
    # the guard server runs from the test build (its own fuse_helpers puts its src first)
    monkeypatch.setattr(fuse_helpers, "HERE", test_build / "tests")
    monkeypatch.setattr(fuse_helpers, "SRC", test_build / "src")
    monkeypatch.setenv("TK_TEST_NONCE_LIMITS", "4:8:16")
    with guard_mount(wtmp, key=KEY) as g:
        f, b = g.mnt / "f", g.backing / "f"
        assert _direct_write(f, 0, 1) == 0  # create (lease 4) + 1
        assert _lease(b) == 4
        for i in range(3):  # 2, 3, 4
            assert _direct_write(f, BS, 2 + i) == 0
        assert _lease(b) == 4
        assert _direct_write(f, 0, 9) == 0  # 5: new lease
        assert _lease(b) == 9
        assert g.stats()["nonce_lease_warnings"] == 1  # 9 > soft limit 8
        results = [_direct_write(f, 0, 10 + i) for i in range(12)]  # 6 .. 17
        assert results == [0] * 11 + [errno.EKEYEXPIRED], results
        assert _lease(b) == 16
        st = g.stats()
        assert st["nonce_limit_refusals"] == 1 and st["nonce_lease_warnings"] >= 2
        assert (f.read_bytes()[:1], f.read_bytes()[BS:BS + 1]) == (bytes([20]), bytes([4]))
    with TakaFile.open(str(b), _keys) as tf:  # the reference reader agrees
        assert tf.read(0, 1) == bytes([20]) and tf.size == 2 * BS
    # remounted: the lease on disk counts as used, so the file stays refused
    with guard_mount(wtmp, path=g.backing, key=KEY) as g2:
        assert _direct_write(g2.mnt / "f", 0, 1) == errno.EKEYEXPIRED
        assert (g2.mnt / "f").read_bytes()[:1] == bytes([20])
