"""The kernel suite: takakryptfs.ko built here, loaded in Debian's 6.1 kernel booted
under QEMU (TCG) with virtme-ng, and tested there by tests/kernel/guest/ (one VM boot
for the whole suite).  Each guest test is reported here as a test of its own; a guest
test that did not run fails, and so does any panic, oops, BUG, WARNING, lockdep or
kmemleak report in the guest's kernel log (vmharness.kernel_log_problems).

The module is built against the headers of the kernel that boots (/boot's newest
vmlinuz-6.1.*, and the linux-headers package of the same release), so vermagic matches.
"""

from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import vmharness as vm

TREE = vm.TREE
GUEST = TREE / "tests" / "kernel" / "guest"
# TAKAKRYPT_KERNEL_SRC: test a module from another directory (same Makefile contract)
KDIR = Path(os.environ.get("TAKAKRYPT_KERNEL_SRC", TREE / "kernel"))
# TAKAKRYPT_GUEST_FILES=test_agent_engine,test_module: boot for these guest files only
SELECTED = [f for f in os.environ.get("TAKAKRYPT_GUEST_FILES", "").split(",") if f]


def _missing() -> list[str]:
    out = vm.missing(systemd=False, series="6.1.")
    k = vm.kernel("6.1.")
    if k and not vm.headers_for(k):
        out.append(f"linux-headers-{vm.kernel_release(k)} (Debian: linux-headers-amd64, "
                   "upgraded together with linux-image-amd64)")
    return out


def guest_files() -> list[Path]:
    files = sorted(GUEST.glob("test_*.py"))
    return [f for f in files if f.stem in SELECTED] if SELECTED else files


def guest_tests() -> list[str]:
    """module::function of every guest test, read from the source (not imported): the
    functions defined there and the ones imported from another test module
    (``from test_agent_guard import test_x``: the engine-parametrised tests)."""
    out = []
    for f in guest_files():
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                names = [node.name]
            elif isinstance(node, ast.ImportFrom):
                names = [a.asname or a.name for a in node.names]
            else:
                continue
            out += [f"{f.stem}::{n}" for n in names if n.startswith("test_")]
    return out


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(bool(_missing()), reason="VM tooling absent: " + ", ".join(_missing())),
    pytest.mark.skipif(not (KDIR / "Makefile").exists(),
                       reason=f"{KDIR} has no module yet (no Makefile)"),
]


def vm_jobs(factory) -> dict:
    """The suite's boot as a VM job (tests/conftest.py, "the VM boots"): run when its
    first test asks, or with the session's start under TAKAKRYPT_VM_EARLY=1."""
    return {"kernel-suite": lambda: _run_suite(factory)}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from conftest import vm_job
    run, results = vm_job("kernel-suite", vm_jobs(tmp_path_factory)["kernel-suite"]).result()
    print(f"\nguest run: exit {run.rc}; results in {run.out}")
    return run, results


def _run_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("kvm")
    out.chmod(0o755)
    vmlinuz = vm.kernel("6.1.")
    kbuild = vm.headers_for(vmlinuz)
    build = vm.build_module(KDIR, kbuild)
    (out / "build.log").write_text(build.stdout + build.stderr)
    assert build.returncode == 0, f"make -C kernel KDIR={kbuild}:\n{build.stderr[-4000:]}"
    ko = KDIR / "takakryptfs.ko"
    assert ko.exists(), "the build made no kernel/takakryptfs.ko"
    junit = out / "junit.xml"
    where = " ".join(str(f) for f in guest_files()) if SELECTED else str(GUEST)
    cmd = (f"{sys.executable} -m pytest {where} -p no:cacheprovider -q -rA "
           f"--rootdir={TREE} -c {TREE / 'pyproject.toml'} --junitxml={junit}")
    run = vm.run_guest(out, cmd, timeout=2700, env={
        "TAKAKRYPT_IN_VM": "1", "TAKAKRYPT_KO": str(ko), "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": f"{TREE / 'src'}:{TREE / 'tests'}", "HYPOTHESIS_PROFILE": "ci",
        "TAKAKRYPT_TEST_FORK_CLI": "1",
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"})
    return run, _results(junit)


def _results(junit: Path) -> dict[str, tuple[str, str]]:
    """module::function[param] -> (outcome, message) from the guest's junit.xml."""
    if not junit.exists():
        return {}
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        mod = case.get("classname", "").rsplit(".", 1)[-1]
        key = f"{mod}::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "") + "\n" + (el.text or "")
                if tag != "skipped":
                    break
        if key in out and out[key][0] != "passed" and outcome == "passed":
            continue  # a teardown error is a second record of the same test
        out[key] = (outcome, msg)
    return out


@pytest.mark.parametrize("name", guest_tests())
def test_guest(suite, name):
    run, results = suite
    mine = {k: v for k, v in results.items() if k == name or k.startswith(name + "[")}
    if not mine:
        pytest.fail(f"guest test {name} did not run\n{run.tail()}")
    bad = {k: v for k, v in mine.items() if v[0] in ("failed", "error")}
    if bad:
        pytest.fail("\n\n".join(f"{k}: {o}\n{m[-3000:]}" for k, (o, m) in bad.items()))
    if all(o == "skipped" for o, _ in mine.values()):
        pytest.skip("in the guest: " + next(iter(mine.values()))[1].strip()[:300])


def test_guest_suite_completed(suite):
    run, results = suite
    assert results, f"no junit.xml from the guest\n{run.tail()}"
    assert run.rc is not None, f"the guest command never finished\n{run.tail()}"


def test_guest_kernel_log_clean(suite):
    run, _ = suite
    assert run.dmesg, f"no kernel log from the guest\n{run.tail()}"
    assert not run.problems, "the guest kernel reported:\n" + "\n".join(run.problems[:80])
