"""Checks shared by the PostgreSQL end-to-end tests: what tar and the disk hold."""

from __future__ import annotations

import grp
import os
import pwd
import tarfile
from pathlib import Path

from takakrypt.cryptofile import TakaFile
from takakrypt.keys import open_keystore


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def fuse_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2].startswith("fuse")
                   for line in f)


def tar_members_are_taka(tar_path: Path, marker: bytes) -> list[str]:
    """Every regular file in the archive is stored TAKA bytes, the marker is nowhere;
    returns the member names."""
    nreg = 0
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            if not m.isreg():
                continue
            nreg += 1
            data = tf.extractfile(m).read()
            assert data[:4] == b"TAKA", (m.name, data[:16])
            assert len(data) >= 128, m.name
        names = tf.getnames()
    assert nreg > 100, nreg
    assert marker not in tar_path.read_bytes()
    return names


def files_at_rest(gp: Path, keystore: Path, master_key: Path, marker: bytes) -> list[str]:
    """Every regular file below ``gp`` (unmounted) is a TAKA file the keystore
    decrypts, with no marker in its stored bytes; returns the files whose plaintext
    holds the marker."""
    seen_in, count = [], 0
    with open_keystore(str(keystore), master_key_file=str(master_key)) as ks:
        for root, _dirs, files in os.walk(gp):
            for name in files:
                p = Path(root) / name
                if not p.is_file() or p.is_symlink():
                    continue
                raw = p.read_bytes()
                assert raw[:4] == b"TAKA", p
                assert marker not in raw, f"plaintext marker at rest in {p}"
                with TakaFile.open(p, ks.get) as f:
                    plain = f.read(0, f.size)
                assert len(plain) == f.size
                if marker in plain:
                    seen_in.append(str(p.relative_to(gp)))
                count += 1
        with TakaFile.open(gp / "PG_VERSION", ks.get) as f:
            assert f.read(0, 100) == b"15\n"
    assert count > 100, count
    return seen_in
