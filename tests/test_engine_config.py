"""``engine: fuse | kernel`` per guard point: the configuration key, what `takakrypt
config check` says about the kernel module on this machine, and the mount-table and
mount(2) side of agent.kmount that runs without the module (the rest runs in the VM:
tests/kernel/guest/test_agent_engine.py)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent_helpers import base_config
from takakrypt import config
from takakrypt.agent import kmount
from takakrypt.errors import ConfigError

GP = "  - {path: /srv/data, policy: p, key: k1%s}\n"
BASE = """\
version: 1
policies:
  p:
    rules:
      - {actions: [all_ops], effects: [deny]}
guard_points:
"""


def _load(extra: str = "", key: str = "k1") -> config.Config:
    return config.loads(BASE + (GP % extra).replace("key: k1", f"key: {key!r}"),
                        source="e.yaml")


def test_default_engine_is_fuse():
    assert _load().guard_points[0].engine == "fuse"
    assert config.ENGINES[0] == "fuse"
    assert _load(", engine: kernel").guard_points[0].engine == "kernel"
    assert _load(", engine: fuse").guard_points[0].engine == "fuse"


@pytest.mark.parametrize("extra,expect", [
    (", engine: kernal", "e.yaml:7: $.guard_points[0].engine: unknown engine 'kernal' "
                         "(use fuse or kernel)"),
    (", engine: FUSE", "e.yaml:7: $.guard_points[0].engine: unknown engine 'FUSE'"),
    (", engine: 1", "e.yaml:7: $.guard_points[0].engine: expected `str`, got `int`"),
    (", engine: null", "e.yaml:7: $.guard_points[0].engine: expected `str`, got `null`"),
])
def test_bad_engine_is_a_config_error(extra, expect):
    with pytest.raises(ConfigError) as ei:
        _load(extra)
    assert str(ei.value).startswith(expect), str(ei.value)
    assert ei.value.exit_code == 3


def test_key_grace():
    assert _load(", engine: kernel").guard_points[0].key_grace == 0   # default: none
    gp = _load(", engine: kernel, key_grace: 120").guard_points[0]
    assert gp.key_grace == 120
    g = kmount.KernelGuard(gp, 4)
    assert g.data == "key=k1,gp=4,grace=120,format=2"
    mine = kmount.MountEntry(1, 0, "0:1", "/srv/data", "takakryptfs", "/srv/data",
                             "rw,key=k1,gp=4,grace=120,format=2")
    other = kmount.MountEntry(1, 0, "0:1", "/srv/data", "takakryptfs", "/srv/data",
                             "rw,key=k1,gp=4,format=2")
    assert g.matches(mine) and not g.matches(other)   # a changed grace is a new mount
    for extra, msg in ((", engine: kernel, key_grace: -1", "must be between 0 and 86400"),
                       (", engine: kernel, key_grace: 86401", "must be between 0 and 86400"),
                       (", key_grace: 5", "only engine kernel keeps keys"),
                       (", engine: kernel, key_grace: 1.5", "expected `int`")):
        with pytest.raises(ConfigError, match=r"\$\.guard_points\[0\]\.key_grace: " + msg):
            _load(extra)


@pytest.mark.parametrize("key", ["k1,decide=none", "-k", ".k", "k" * 64, "k 1", "k/1"])
def test_kernel_engine_key_must_be_a_mount_option_value(key):
    # the key name becomes key= of the mount: a comma would smuggle in another option
    with pytest.raises(ConfigError, match=r"\$\.guard_points\[0\]\.key: engine kernel needs "
                                          r"a key name"):
        _load(", engine: kernel", key=key)
    assert _load(", engine: fuse", key=key).guard_points[0].key == key  # FUSE: no mount option
    with pytest.raises(kmount.KernelGuardError):
        kmount.mount_data(key, 1)


def test_mount_data():
    assert kmount.mount_data("pg-data.v2_x", 3) == "key=pg-data.v2_x,gp=3"
    assert kmount.mount_data("k1", 2, 30) == "key=k1,gp=2,grace=30"
    assert kmount.mount_data("k1", 2, 0, 2) == "key=k1,gp=2,format=2"
    with pytest.raises(kmount.KernelGuardError, match="format 3"):
        kmount.mount_data("k1", 2, 0, 3)
    with pytest.raises(kmount.KernelGuardError, match="key_grace"):
        kmount.mount_data("k1", 2, -1)
    with pytest.raises(kmount.KernelGuardError, match="id 0"):
        kmount.mount_data("k1", 0)


# the module's state ---------------------------------------------------------------------

def test_module_state_loaded(tmp_path):
    (tmp_path / "sys" / "takakryptfs").mkdir(parents=True)
    st = kmount.module_state(sys_module=str(tmp_path / "sys"))
    assert st.state == "loaded" and st.detail.endswith("/takakryptfs")
    assert "mounts it in place" in st.consequence()


def test_module_state_loadable_and_absent(tmp_path):
    base = tmp_path / "lib" / "9.9.9-test"
    base.mkdir(parents=True)
    (base / "modules.dep").write_text("kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz\n"
                                      "kernel/fs/takakryptfs_not.ko:\n")
    kw = dict(sys_module=str(tmp_path / "sys"), modules_dir=str(tmp_path / "lib"),
              release="9.9.9-test", use_modinfo=False)
    st = kmount.module_state(**kw)
    assert st.state == "absent" and "9.9.9-test" in st.detail
    assert "refuses to start" in st.consequence() and "engine: fuse" in st.consequence()
    (base / "modules.dep").write_text("kernel/fs/ext4/ext4.ko.xz:\n"
                                      "updates/takakryptfs.ko.xz:\n")
    st = kmount.module_state(**kw)
    assert st == ("loadable", str(base / "updates/takakryptfs.ko.xz"))
    assert "modprobe takakryptfs" in st.consequence()
    assert "never falls back to FUSE" in st.consequence()


@pytest.mark.skipif(os.path.isdir("/sys/module/takakryptfs"), reason="takakryptfs is loaded here")
def test_module_state_of_this_host():
    st = kmount.module_state()
    r = subprocess.run(["sh", "-c", "PATH=$PATH:/sbin:/usr/sbin modinfo -n takakryptfs"],
                       capture_output=True, text=True)
    assert st.state == ("loadable" if r.returncode == 0 else "absent"), (st, r.stdout)


# config check ---------------------------------------------------------------------------

def _check(tmp_path: Path, gps: list[dict], *args: str) -> subprocess.CompletedProcess:
    cfg = base_config(tmp_path)
    for g in gps:
        Path(g["path"]).mkdir(exist_ok=True)
    cfg["guard_points"] = gps
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "takakrypt", "config", "check", *args, str(f)],
                          capture_output=True, text=True, timeout=60)


def test_config_check_explains_kernel_guard_points(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    gps = [{"path": a, "policy": "p", "key": "k1"},
           {"path": b, "policy": "p", "key": "k1", "engine": "kernel"},
           {"path": c, "policy": "p", "key": "k1", "engine": "kernel", "enabled": False}]
    state = kmount.module_state()
    r = _check(tmp_path, gps, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["valid"] and out["guard_points"] == [a, b, c]  # as before: the paths
    eng = {e["path"]: e for e in out["engines"]}
    assert eng[a] == {"path": a, "engine": "fuse", "enabled": True}
    assert eng[b]["engine"] == "kernel" and eng[b]["module"]["state"] == state.state
    assert eng[b]["module"]["detail"] == state.detail
    if state.state == "loaded":
        assert f"-o key=k1,gp=2 {b} {b}" in eng[b]["module"]["takakryptd"]
    else:
        assert "refuses to start this guard point" in eng[b]["module"]["takakryptd"]
        assert "never falls back to FUSE or to an unprotected directory" in \
            eng[b]["module"]["takakryptd"]
    assert "does not mount it" in eng[c]["module"]["takakryptd"]
    text = _check(tmp_path, gps)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].endswith("OK (1 policies, 2 rules, 3 guard points)")
    assert [x for x in lines if x.startswith(f"guard point {b}: engine kernel: takakryptfs ")]
    assert not [x for x in lines if x.startswith(f"guard point {a}:")]  # fuse: nothing to say


def test_config_check_refuses_a_bad_engine(tmp_path):
    r = _check(tmp_path, [{"path": str(tmp_path / "a"), "policy": "p", "key": "k1",
                           "engine": "ebpf"}], "--json")
    assert r.returncode == 3
    err = json.loads(r.stdout)
    assert err["exit_code"] == 3 and "$.guard_points[0].engine: unknown engine 'ebpf'" in \
        err["message"]


# the mount table and mount(2), without the module ----------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")
_libc = ctypes.CDLL(None, use_errno=True)


def _tmpfs(path: Path) -> None:
    path.mkdir(exist_ok=True)
    assert _libc.mount(b"tk-test", str(path).encode(), b"tmpfs", 0, b"size=1m") == 0, \
        os.strerror(ctypes.get_errno())


def _umount(path: Path) -> None:
    _libc.umount2(str(path).encode(), 0)


def _spec(path: Path, engine: str = "kernel", backing: str | None = None):
    return config.GuardPoint(path=str(path), policy="p", key="k1", engine=engine,
                             backing=backing)


@needs_root
def test_mountinfo_is_read_with_escapes(tmp_path):
    d = tmp_path / "with space\tand tab"
    _tmpfs(d)
    try:
        at = kmount.mounts_at(str(d))
        assert len(at) == 1 and at[0].fstype == "tmpfs" and at[0].source == "tk-test"
        assert kmount.options(at[0])["size"] == "1024k"
    finally:
        _umount(d)
    assert kmount.mounts_at(str(d)) == []


def test_matches_reuses_only_the_same_mount():
    g = kmount.KernelGuard(_spec(Path("/srv/d")), 2)
    assert g.data == "key=k1,gp=2,format=2"

    def entry(fstype="takakryptfs", source="/srv/d", opts="rw,key=k1,gp=2,format=2"):
        return kmount.MountEntry(1, 0, "0:99", "/srv/d", fstype, source, opts)

    assert g.matches(entry())
    assert not g.matches(entry(opts="rw,key=k1,gp=2,format=1"))          # another format
    assert not g.matches(entry(opts="rw,key=k1,gp=2"))  # a module of before format=
    assert g.matches(entry(source="/srv/d/"))
    assert not g.matches(entry(opts="rw,key=k2,gp=2,format=2"))
    assert not g.matches(entry(opts="rw,key=k1,gp=3,format=2"))
    assert not g.matches(entry(opts="rw,key=k1,format=2"))             # gp=0: any guard point
    assert not g.matches(entry(opts="rw,key=k1,gp=2,decide=none,format=2"))  # the test-only mode
    assert g.matches(entry(opts="rw,key=k1,gp=2,decide=agent,format=2"))  # the default, shown
    assert not g.matches(entry(source="/srv/other"))
    assert not g.matches(entry(fstype="fuse.takakrypt"))
    b = kmount.KernelGuard(_spec(Path("/srv/d"), backing="/srv/store"), 2)
    assert b.matches(entry(source="/srv/store")) and not b.matches(entry())


@needs_root
@pytest.mark.skipif(os.path.isdir("/sys/module/takakryptfs"), reason="takakryptfs is loaded here")
def test_mount_without_the_module_fails_and_leaves_nothing(tmp_path):
    d = tmp_path / "gp"
    d.mkdir()
    g = kmount.KernelGuard(_spec(d), 1)
    with pytest.raises(kmount.KernelGuardError) as ei:
        g.mount()
    assert ei.value.errno == errno.ENODEV
    assert "modprobe takakryptfs" in str(ei.value) and not str(ei.value).startswith("[Errno")
    assert kmount.mounts_at(str(d)) == [] and not g.is_mounted
    assert g.mount_problem() == "not mounted"
    assert g.unmount() == "not mounted"
    with pytest.raises(kmount.KernelGuardError, match="does not exist"):
        kmount.KernelGuard(_spec(tmp_path / "nope"), 1).mount()


@needs_root
def test_never_unmounts_another_file_system(tmp_path):
    d = tmp_path / "gp"
    _tmpfs(d)
    try:
        g = kmount.KernelGuard(_spec(d), 1)
        assert g.unmount() == "not mounted"
        assert kmount.unmount_all(str(d)) == 0
        assert [m.fstype for m in kmount.mounts_at(str(d))] == ["tmpfs"]
        assert g.mount_problem() == "not mounted" and g.visible_to_init() is None
    finally:
        _umount(d)
