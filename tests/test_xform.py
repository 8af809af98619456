"""takakrypt xform: in-place initial encryption, verification, resumability, refusal."""

import json
import os
import subprocess
import sys

import pytest

from takakrypt import format as fmt
from takakrypt import xform
from takakrypt.cryptofile import TakaFile
from takakrypt.errors import UsageError
from takakrypt.keys import generate_master_key_file, open_keystore


@pytest.fixture
def ks(tmp_path):
    mk = tmp_path / "mk"
    generate_master_key_file(str(mk))
    with open_keystore(str(tmp_path / "ks.json"), master_key_file=str(mk), create=True) as k:
        k.create("data")
        yield k


def _tree(root):
    files = {}
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 300_000]):
        p = root / ("sub" if i % 2 else "") / f"f{i}"
        p.write_bytes(os.urandom(size))
        files[p] = p.read_bytes()
    big = root / "sub" / "deeper" / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    files[big] = big.read_bytes()
    os.chmod(big, 0o640)
    os.chown(big, 1234, 5678)
    os.setxattr(big, "user.tag", b"v1")
    os.utime(big, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    (root / "link").symlink_to("f0")
    return files


def test_encrypt_verify_and_decrypt_round_trip(tmp_path, ks):
    root = tmp_path / "data"
    root.mkdir()
    files = _tree(root)
    s = xform.run(str(root), keys=ks.get, key_name="data", key_version=1, decrypt=False)
    assert s.converted == len(files) and not s.failed
    assert {x["path"] for x in s.skipped} == {"link"}
    big = root / "sub" / "deeper" / "big"
    st = big.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.getxattr(big, "user.tag") == b"v1"
    for p, data in files.items():
        raw = p.read_bytes()
        assert raw[:4] == b"TAKA" and len(raw) == fmt.stored_size(len(data))
        with TakaFile.open(p, ks.get) as f:
            assert f.read(0, len(data) + 10) == data
    assert not list(root.rglob("*takakrypt-xform*"))
    # running again is a no-op
    s2 = xform.run(str(root), keys=ks.get, key_name="data", key_version=1, decrypt=False)
    assert s2.converted == 0 and s2.already == len(files)
    s3 = xform.run(str(root), keys=ks.get, key_name=None, key_version=None, decrypt=True)
    assert s3.converted == len(files)
    for p, data in files.items():
        assert p.read_bytes() == data


@pytest.mark.parametrize("crash_after", [0, 2, 5])
def test_resume_after_crash(tmp_path, ks, crash_after):
    """Kill the process mid-run (SIGKILL from inside after N files); rerun completes and
    every file is intact; no temporaries are left."""
    root = tmp_path / "data"
    root.mkdir()
    files = _tree(root)
    code = f"""
import os, sys, signal
sys.path.insert(0, {os.path.dirname(xform.__file__)!r} + "/..")
from takakrypt import xform
from takakrypt.keys import open_keystore
ks = open_keystore({str(tmp_path / 'ks.json')!r}, master_key_file={str(tmp_path / 'mk')!r})
n = [0]
orig = xform._pwrite_full
def crashing(fd, data, off):
    orig(fd, data[: len(data) // 2], off)
    n[0] += 1
    if n[0] > {crash_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    orig(fd, data[len(data) // 2:], off + len(data) // 2)
xform._pwrite_full = crashing
xform.run({str(root)!r}, keys=ks.get, key_name="data", key_version=1, decrypt=False)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    assert (root / xform.JOURNAL).exists()
    s = xform.run(str(root), keys=ks.get, key_name="data", key_version=1, decrypt=False)
    assert s.resumed and s.cleaned_temporaries == 1
    assert s.converted + s.already == len(files)
    for p, data in files.items():
        with TakaFile.open(p, ks.get) as f:
            assert f.read(0, len(data) + 1) == data
    assert not (root / xform.JOURNAL).exists()
    assert not list(root.rglob("*takakrypt-xform-tmp"))


def test_interrupted_decrypt_leaves_no_plaintext_temporary(tmp_path, ks):
    root = tmp_path / "data"
    root.mkdir()
    _tree(root)
    xform.run(str(root), keys=ks.get, key_name="data", key_version=1, decrypt=False)
    # simulate a crash of --decrypt: journal + a plaintext temporary
    j = xform._Journal(str(root))
    j.open()
    j.write(direction="decrypt", key=None, version=None)
    j.f.close()
    tmp = root / f".f0{xform.TMP_SUFFIX}"
    tmp.write_bytes(b"secret plaintext")
    s = xform.run(str(root), keys=ks.get, key_name=None, key_version=None, decrypt=True)
    assert s.cleaned_temporaries == 1 and not tmp.exists()


def test_conflicting_resume_is_refused(tmp_path, ks):
    root = tmp_path / "data"
    root.mkdir()
    j = xform._Journal(str(root))
    j.open()
    j.write(direction="encrypt", key="data", version=1)
    j.f.close()
    with pytest.raises(UsageError, match="must be finished first"):
        xform.run(str(root), keys=ks.get, key_name=None, key_version=None, decrypt=True)


def test_refuses_mount_point(tmp_path, ks):
    with pytest.raises(UsageError, match="mount"):
        xform.run("/proc", keys=ks.get, key_name="data", key_version=1, decrypt=False)


def test_cli_xform_json(tmp_path, ks):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a").write_bytes(b"hello")
    env = dict(os.environ, TAKAKRYPT_KEYSTORE=str(tmp_path / "ks.json"),
               TAKAKRYPT_MASTER_KEY_FILE=str(tmp_path / "mk"))
    r = subprocess.run([sys.executable, "-m", "takakrypt", "xform", str(root), "--key", "data",
                        "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["converted"] == 1 and out["direction"] == "encrypt"
    assert (root / "a").read_bytes()[:4] == b"TAKA"
