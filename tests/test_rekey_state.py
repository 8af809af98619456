"""The rekey manager's parts that need no mount (src/takakrypt/agent/rekey.py): the walk
order a resumed run relies on, the state file (atomic, 0600, damage refused with a
message), leftover temporaries, key usage from headers, the pacer."""

from __future__ import annotations

import os
import random
import stat
import time

import msgspec
import pytest

from takakrypt import format as fmt
from takakrypt.agent import rekey as R
from takakrypt.errors import UsageError


def _dirfd(p) -> int:
    return os.open(p, os.O_RDONLY | os.O_DIRECTORY)


def _taka(key: str, version: int) -> bytes:
    h = fmt.Header(key_id=key, key_version=version, file_id=os.urandom(16),
                   block_size=4096, plaintext_size=0)
    return h.pack(b"\0" * 32)


def test_walk_is_sorted_depth_first_and_skips_own_names(tmp_path):
    for rel in ("b/z", "b/a", "a", "B", ".takakrypt-rekey.state", "c/.takakrypt-rekey.x1",
                "c/d/e", "\xe9"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * len(rel))
    os.symlink("a", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    fd = _dirfd(tmp_path)
    try:
        got = [("/".join(p), n) for p, n in R.walk(fd)]
    finally:
        os.close(fd)
    assert got == [("B", 1), ("a", 1), ("b/a", 3), ("b/z", 3), ("c/d/e", 5), ("\xe9", 1)]


def test_resume_order_is_total(tmp_path):
    """A cursor splits the walk exactly: files after it are those not yet done."""
    rng = random.Random(3)
    for i in range(60):
        p = tmp_path / "/".join(f"d{rng.randrange(3)}" for _ in range(rng.randrange(3))) / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    fd = _dirfd(tmp_path)
    try:
        order = [p for p, _ in R.walk(fd)]
    finally:
        os.close(fd)
    assert len(order) == 60
    for cut in range(len(order)):
        cursor = R._key(order[cut])
        rest = [p for p in order if R._key(p) > cursor]
        assert rest == order[cut + 1:]


def test_state_file_roundtrip_mode_and_damage(tmp_path):
    fd = _dirfd(tmp_path)
    try:
        assert R.load_state(fd) is None
        st = R.RekeyState(format=R.STATE_FORMAT, version=1, guard="/g", key="k",
                          target_version=3, state=R.RUNNING, rate=5, started=time.time(),
                          updated=0.0, cursor=["a", "b"], busy={"x": 2})
        R.save_state(fd, st)
        p = tmp_path / R.STATE_NAME
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        back = R.load_state(fd)
        assert back == st
        assert [x.name for x in tmp_path.iterdir()] == [R.STATE_NAME]  # no temp left
        d = back.as_dict()
        assert d["busy"] == 1 and d["files_done"] == 0 and "format" not in d
        for bad in (b"", b"{", b'{"format": "x"}', msgspec.json.encode(
                msgspec.structs.replace(st, state="bogus")),
                msgspec.json.encode(msgspec.structs.replace(st, format="other"))):
            p.write_bytes(bad)
            with pytest.raises(UsageError) as ei:
                R.load_state(fd)
            assert R.STATE_NAME in str(ei.value)
    finally:
        os.close(fd)


def test_remove_leftovers_keeps_state_and_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in (".takakrypt-rekey.tmp.0123456789abcdef", "sub/.takakrypt-rekey.tmp.fedcba9876543210",
                R.STATE_NAME + ".tmp-4242", R.STATE_NAME, "keep", "sub/.takakrypt-other",
                "sub/.takakrypt-rekey.tmp.short", "sub/" + R.STATE_NAME + ".tmp-1"):
        (tmp_path / rel).write_bytes(b"x")
    fd = _dirfd(tmp_path)
    try:
        assert R.remove_leftovers(fd) == 3
        assert R.remove_leftovers(fd) == 0
    finally:
        os.close(fd)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    # only the data path's names (16 hex digits) and the top's state temporaries go
    assert left == sorted([R.STATE_NAME, "keep", "sub/" + R.STATE_NAME + ".tmp-1",
                           "sub/.takakrypt-other", "sub/.takakrypt-rekey.tmp.short"])


def test_usage_counts_versions_from_headers(tmp_path):
    (tmp_path / "d").mkdir()
    files = {"a": ("k", 1), "b": ("k", 1), "d/c": ("k", 2), "d/e": ("other", 4)}
    for rel, (key, v) in files.items():
        (tmp_path / rel).write_bytes(_taka(key, v) + b"junk")
    (tmp_path / "plain").write_bytes(b"not a taka file at all" * 10)
    (tmp_path / "short").write_bytes(b"TAKA")
    fd = _dirfd(tmp_path)
    try:
        u = R.usage(fd, "k")
    finally:
        os.close(fd)
    assert u["versions"] == {1: 2, 2: 1}
    assert u["other_keys"] == {"other": 1}
    assert u["unreadable"] == 2 and u["files"] == 6
    assert u["examples"] == {1: "a", 2: "d/c"}


def test_pacer_holds_the_rate():
    slept = []
    p = R.Pacer(1000, slept.append)
    p.wait(1000)  # the burst allowance
    assert slept == []
    p.wait(500)
    assert slept and 0.4 < slept[-1] <= 0.5
    none = R.Pacer(0, slept.append)
    n = len(slept)
    none.wait(10**9)
    assert len(slept) == n
