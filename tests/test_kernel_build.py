"""kernel/ builds with no warning at W=1 (as errors) and passes sparse with none, against
the headers of the newest /boot/vmlinuz-6.1.* (Debian's linux-headers-amd64; `make test`
installs it and sparse).  The build runs in a copy of kernel/ so it cannot disturb the
module the VM suite loads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import vmharness as vm

TREE = Path(__file__).resolve().parent.parent


def _kbuild() -> str | None:
    k = vm.kernel("6.1.")
    return vm.headers_for(k) if k else None


pytestmark = pytest.mark.skipif(
    _kbuild() is None or shutil.which("make") is None,
    reason="no Linux 6.1 headers (Debian: linux-headers-amd64 with linux-image-amd64)")


@pytest.fixture(scope="module")
def ksrc(tmp_path_factory):
    d = tmp_path_factory.mktemp("ksrc") / "kernel"
    shutil.copytree(TREE / "kernel", d, ignore=shutil.ignore_patterns(
        "*.o", "*.ko", "*.mod*", ".*.cmd", "Module.symvers", "modules.order"))
    return d


def _make(ksrc: Path, *target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ksrc), f"KDIR={_kbuild()}", *target],
                          capture_output=True, text=True, timeout=900)


def test_builds_without_warnings_at_w1(ksrc):
    r = _make(ksrc, "strict")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "warning:" not in log, log[-4000:]
    assert (ksrc / "takakryptfs.ko").exists()


@pytest.mark.skipif(shutil.which("sparse") is None, reason="sparse not installed (Debian: sparse)")
def test_sparse_clean(ksrc):
    _make(ksrc, "clean")
    r = _make(ksrc, "check")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "CHECK" in log, "sparse did not run over the sources"
    assert ": warning:" not in log and ": error:" not in log, log[-4000:]


def test_strict_build_catches_a_warning(tmp_path):
    """Negative control: the same strict build of a copy with one unused variable fails."""
    d = tmp_path / "kernel"
    shutil.copytree(TREE / "kernel", d, ignore=shutil.ignore_patterns(
        "*.o", "*.ko", "*.mod*", ".*.cmd", "Module.symvers", "modules.order"))
    with open(d / "keys.c", "a") as f:
        f.write("\nstatic int tkfs_planted_unused;\n")
    r = _make(d, "strict")
    assert r.returncode != 0 and "tkfs_planted_unused" in r.stdout + r.stderr
