import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# tests/kernel/ runs inside the kernel suite's VM only (tests/test_kernel_vm.py boots it
# with TAKAKRYPT_IN_VM=1).  On the host its conftest must not even load: it would take
# the module name "conftest" from this file (`from conftest import VECTORS`).
if os.environ.get("TAKAKRYPT_IN_VM") != "1":
    collect_ignore = ["kernel"]

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VECTORS = json.loads((Path(__file__).parent / "vectors" / "taka_v1.json").read_text())["vectors"]


@pytest.fixture(params=VECTORS, ids=[v["name"] for v in VECTORS])
def vector(request):
    return request.param


@pytest.fixture
def wtmp():
    """A temp dir other users can traverse (pytest's own are 0700); guard point mounts
    left under it are swept at the end."""
    from fuse_helpers import sweep_stale_mounts
    d = Path(tempfile.mkdtemp(prefix="tkfuse-"))
    d.chmod(0o755)
    yield d
    sweep_stale_mounts(str(d))
    shutil.rmtree(d, ignore_errors=True)


# --- the VM boots ------------------------------------------------------------------
# Each VM job (the kernel suite's boot, the shared systemd boot) takes 10-15 minutes
# under TCG and keeps a little over one core busy; the tests that wait for one run last.
# By default a job runs when its first test asks for it: one VM at a time, with nothing
# beside it.  TAKAKRYPT_VM_EARLY=1 starts both as soon as the tests are collected, each
# in a thread, beside each other and the host tests: on 2 cores that was no faster
# (39.4 min against 39.9, and 69 CPU-minutes against 45: TCG guests competing for the
# cores burn far more CPU) and it made a timing-bound host test fail, so it is not the
# default (docs/performance.md, "Test suite time").
_VM_JOBS: dict[str, "VmJob"] = {}


def _selected(item) -> bool:
    """The test runs (is not skipped by a true skipif)."""
    return not any(m.args and m.args[0] for m in item.iter_markers("skipif"))


def _uses_systemd_guest(item) -> bool:
    return "systemd_guest" in getattr(item, "fixturenames", ())


class VmJob:
    """fn() run once, in a thread started by start() or by the first result() call."""

    def __init__(self, fn) -> None:
        self.fn, self.thread, self.value, self.error = fn, None, None, None

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # reported by result(), in the test that waits
            self.error = e

    def start(self) -> None:
        if self.thread is None:
            import threading
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def result(self):
        self.start()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def vm_job(name: str, fn) -> VmJob:
    """The session's job NAME (made from FN the first time)."""
    return _VM_JOBS.setdefault(name, VmJob(fn))


def _waits_for_a_vm(item) -> bool:
    mod = getattr(item, "module", None)
    return _uses_systemd_guest(item) or getattr(mod, "vm_jobs", None) is not None


def pytest_collection_modifyitems(session, config, items):
    # the tests that wait for a VM job go last (in their order): the host tests run
    # meanwhile, beside the VMs, instead of queueing behind the first wait
    items[:] = ([i for i in items if not _waits_for_a_vm(i)]
                + [i for i in items if _waits_for_a_vm(i)])


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    factory = session.config._tmp_path_factory
    # the base directory made here, once: getbasetemp() is not safe to race from the
    # job threads (three threads made three numbered directories)
    factory.getbasetemp()
    if any(_uses_systemd_guest(i) and _selected(i) for i in session.items):
        vm_job("systemd", lambda: _boot_systemd(session.items, factory))
    for mod in {i.module for i in session.items if _selected(i)}:
        early = getattr(mod, "vm_jobs", None)
        if early is not None:
            for name, fn in early(factory).items():
                vm_job(name, fn)
    if _VM_JOBS and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # a SIGTERM (a CI timeout, `timeout`) ends the session like Ctrl-C, so that
        # pytest_sessionfinish kills the VMs (they run in sessions of their own)
        signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("TAKAKRYPT_VM_EARLY", "0") == "1":
        for job in _VM_JOBS.values():
            job.start()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionfinish(session):
    # a session that ends early (-x, Ctrl-C) leaves no VM running
    harness = sys.modules.get("vmharness")
    if harness is not None:
        harness.kill_running_vms()


def _boot_systemd(items, factory) -> dict:
    from vmharness import boot_guests

    mods = {}
    for item in items:
        if _uses_systemd_guest(item) and _selected(item):
            mods.setdefault(item.module.__name__, item.module)
    runs, memory = [], 0
    for name, mod in mods.items():
        script, timeout, mem = mod.SYSTEMD_GUEST
        out = factory.mktemp(name)
        os.chmod(out, 0o755)
        if hasattr(mod, "prepare_guest"):
            mod.prepare_guest(out)
        runs.append((Path(__file__).with_name(script), out, timeout))
        memory = max(memory, int(mem.rstrip("G")))
    if not runs:
        return {}
    boot_guests(runs, memory=f"{memory}G")
    return {name: out for name, (_, out, _) in zip(mods, runs)}


@pytest.fixture(scope="session")
def systemd_guest(request):
    """One VM boot with systemd as PID 1 for every systemd VM test this session runs.

    A test module that uses this fixture names its guest side in ``SYSTEMD_GUEST =
    (script, timeout seconds, memory)`` and may define ``prepare_guest(out)`` (run on
    the host before the boot).  The boot runs the scripts of the modules whose tests are
    selected and not skipped, one after the other (tests/vmharness.py, ``boot_guests``):
    a boot costs about a minute under TCG before the first script starts.  It starts
    with the session (above).  Returns {module name: OUT directory};
    ``vmharness.result_of(out)`` reads a result."""
    job = _VM_JOBS.get("systemd")
    return job.result() if job is not None else {}
