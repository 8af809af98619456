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
