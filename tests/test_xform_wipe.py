"""xform leaves the original plaintext in free blocks unless --wipe: shown on a real
ext4 file system on a loop device, by grepping the raw image after unmounting."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from takakrypt import xform
from takakrypt.errors import UsageError
from test_xform import ks  # noqa: F401 - the keystore fixture


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def _mounted(tmp_path, fstype, *opts):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _run("mount", "-t", fstype, *opts, str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount {fstype}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = _run("umount", str(mnt))
        if r.returncode != 0:
            _run("umount", "-l", str(mnt))


@pytest.fixture
def env(tmp_path, ks):  # noqa: F811 - the fixture, by argument
    """The CLI's environment for test_xform's keystore (key "data")."""
    return dict(os.environ, TAKAKRYPT_KEYSTORE=str(tmp_path / "ks.json"),
                TAKAKRYPT_MASTER_KEY_FILE=str(tmp_path / "mk"))


def _xform(env, path, *extra):
    r = subprocess.run([sys.executable, "-m", "takakrypt", "xform", str(path), "--key", "data",
                        "--json", "-q", *extra], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _plant(d, marker):
    d.mkdir()
    line = marker + b"\n"
    (d / "secret.txt").write_bytes(line * (256 * 1024 // len(line)))
    os.sync()


def test_plaintext_stays_in_free_blocks_unless_wiped(tmp_path, env):
    if not os.path.exists("/sbin/mkfs.ext4") and not os.path.exists("/usr/sbin/mkfs.ext4"):
        pytest.skip("mkfs.ext4 missing")
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    r = _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(img))
    assert r.returncode == 0, r.stderr
    kept, wiped = (b"KEPT-" + os.urandom(12).hex().encode(),
                   b"WIPED-" + os.urandom(12).hex().encode())
    with _mounted(tmp_path, "ext4", "-o", "loop", str(img)) as mnt:
        _plant(mnt / "w", wiped)
        with open(mnt / "w" / "sparse", "wb") as f:  # data, a 2 MiB hole, data
            f.write(wiped * 100)
            f.seek(2 << 20)
            f.write(wiped * 100)
        _plant(mnt / "k", kept)
        os.sync()
        # the wiped tree first: what the second run allocates cannot hide its result
        out = _xform(env, mnt / "w", "--wipe")
        assert out["converted"] == 2 and out["wiped"] == 2 and out["not_wiped"] == []
        out = _xform(env, mnt / "k")
        assert out["converted"] == 1 and out["wiped"] == 0
        for d in ("w", "k"):
            assert (mnt / d / "secret.txt").read_bytes()[:4] == b"TAKA"
    raw = img.read_bytes()
    assert kept in raw       # without --wipe: recoverable from the raw device
    assert wiped not in raw  # with --wipe: gone


def test_wipe_refused_where_blocks_are_not_overwritten_in_place(tmp_path, env):
    with _mounted(tmp_path, "tmpfs", "-o", "size=8m", "tmpfs") as mnt:
        _plant(mnt / "d", b"x" * 16)
        r = subprocess.run([sys.executable, "-m", "takakrypt", "xform", str(mnt / "d"),
                            "--key", "data", "--wipe"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "tmpfs" in r.stderr and "fresh file system" in r.stderr
        assert (mnt / "d" / "secret.txt").read_bytes()[:1] == b"x"  # untouched


def test_wipe_with_decrypt_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--wipe"):
        xform.run(str(tmp_path), keys=lambda *a: bytearray(32), key_name=None,
                  key_version=None, decrypt=True, wipe=True)


def test_xform_help_warns_about_free_blocks():
    r = subprocess.run([sys.executable, "-m", "takakrypt", "xform", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert "--wipe" in r.stdout and "WITHOUT overwriting" in r.stdout
