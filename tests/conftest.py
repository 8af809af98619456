import json
import os
import shutil
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


@pytest.fixture(scope="session")
def systemd_guest(request, tmp_path_factory):
    """One VM boot with systemd as PID 1 for every systemd VM test this session runs.

    A test module that uses this fixture names its guest side in ``SYSTEMD_GUEST =
    (script, timeout seconds, memory)`` and may define ``prepare_guest(out)`` (run on
    the host before the boot).  The boot runs the scripts of the modules whose tests are
    selected and not skipped, one after the other (tests/vmharness.py, ``boot_guests``):
    a boot costs about a minute under TCG before the first script starts.  Returns
    {module name: OUT directory}; ``vmharness.result_of(out)`` reads a result."""
    from vmharness import boot_guests

    mods = {}
    for item in request.session.items:
        if "systemd_guest" not in getattr(item, "fixturenames", ()):
            continue
        if any(m.args and m.args[0] for m in item.iter_markers("skipif")):
            continue  # the test skips: its script need not run
        mods.setdefault(item.module.__name__, item.module)
    runs, memory = [], 0
    for name, mod in mods.items():
        script, timeout, mem = mod.SYSTEMD_GUEST
        out = tmp_path_factory.mktemp(name)
        os.chmod(out, 0o755)
        if hasattr(mod, "prepare_guest"):
            mod.prepare_guest(out)
        runs.append((Path(__file__).with_name(script), out, timeout))
        memory = max(memory, int(mem.rstrip("G")))
    if not runs:
        return {}
    boot_guests(runs, memory=f"{memory}G")
    return {name: out for name, (_, out, _) in zip(mods, runs)}
