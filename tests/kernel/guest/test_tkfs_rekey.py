"""Live rekey on ``engine: kernel`` guard points (docs/kernel.md, "Live rekey";
docs/operations.md, "Rotating keys and live rekey"): takakryptd asks the module to seal
each TAKA v2 file's old blocks again in place (kernel/rekey.c), driven by the same
``takakrypt rekey`` run as on FUSE guard points.

* under a writer and a reader: every file, a sparse one and the one being written
  included, reads back byte for byte during and after the run, every stored block ends
  on the new version (holes stay holes), the headers' oldest version is raised, the
  reference reader decrypts the stored bytes, and each file and the run are audited;
* the crash loop: takakryptd SIGKILLed mid-run ten times, each time restarted (the run
  resumes from its state in ``agent.state_dir``): every read after every kill returns
  the reference bytes, and the run ends with every file on the new version;
* only the registered takakryptd may use the ioctls (EPERM for anyone else), and a
  TAKA v1 file is reported as skipped, not failed, and left readable.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent_helpers import base_config, until
from test_agent_engine import _decrypt, _start, running
from test_tkfs_format_v2 import block_versions as _block_versions
from test_tkfs_format_v2 import header as _header

HDR, BS, SBS = 128, 4096, 4096 + 28
PY = sys.executable  # the venv's: takakrypt and its dependencies


def _cfg(tmp: Path, **gp_extra) -> tuple[dict, Path, Path]:
    cfg = base_config(tmp)
    gp, backing = tmp / "gp", tmp / "store"
    gp.mkdir(exist_ok=True)
    backing.mkdir(exist_ok=True)
    cfg["agent"]["state_dir"] = str(tmp / "state")
    cfg["policies"] = {"p": {"rules": [
        {"user_set": "root", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "p", "key": "k1", "engine": "kernel",
                            "backing": str(backing), "format": 2, **gp_extra}]
    return cfg, gp, backing


def _keys(tmp: Path, *args: str) -> dict:
    r = subprocess.run([PY, "-m", "takakrypt", "keys", *args, "--keystore",
                        str(tmp / "keystore.json"), "--master-key-file",
                        str(tmp / "master.key"), "--json"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=str(tmp / "run" /
                                                                         "control.sock")))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _populate(gp: Path, rng: random.Random) -> dict[str, bytes]:
    ref = {}
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 70_000, (1 << 20) + 3]):
        rel = f"d{i % 2}/f{i}"
        (gp / rel).parent.mkdir(exist_ok=True)
        ref[rel] = rng.randbytes(size)
        (gp / rel).write_bytes(ref[rel])
    # sparse: data, a 5-block hole, data
    with open(gp / "sparse", "wb") as f:
        f.write(b"a" * 5000)
        f.seek(7 * BS)
        f.write(b"z" * 100)
    ref["sparse"] = b"a" * 5000 + bytes(7 * BS - 5000) + b"z" * 100
    ref["hot"] = rng.randbytes(300_000)
    (gp / "hot").write_bytes(ref["hot"])
    os.sync()
    return ref


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _audit(tmp: Path) -> list[dict]:
    p = tmp / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _wait_done(d, gp: Path, timeout: float = 600) -> dict:
    until(lambda: d.jcli("rekey", "status", str(gp))["state"] in ("done", "failed"), timeout,
          step=1.0)
    return d.jcli("rekey", "status", str(gp))


def test_kernel_live_rekey_under_a_writer_and_a_reader(scratch):
    cfg, gp, backing = _cfg(scratch, rekey_rate=0.5)  # MB/s: the run lasts seconds
    rng = random.Random(20)
    with running(scratch, cfg) as d:
        ref = _populate(gp, rng)
        base = _header(backing / "hot").key_version
        assert {_header(backing / r).version for r in ref if ref[r]} == {2}
        new = _keys(scratch, "rotate", "k1")["current_version"]
        assert new == base + 1

        lock = threading.Lock()
        stop = threading.Event()
        problems: list[str] = []
        counts = {"writes": 0, "reads": 0}

        def writer() -> None:
            wr = random.Random(1)
            fd = os.open(gp / "hot", os.O_RDWR)
            try:
                while not stop.is_set():
                    with lock:
                        data = bytearray(ref["hot"])
                        off = wr.randrange(0, len(data) + 2000)
                        chunk = wr.randbytes(wr.randrange(1, 9000))
                        os.pwrite(fd, chunk, off)
                        if off > len(data):
                            data += bytes(off - len(data))
                        data[off:off + len(chunk)] = chunk
                        ref["hot"] = bytes(data)
                        counts["writes"] += 1
                    time.sleep(0.02)
            except OSError as e:
                problems.append(f"writer: {e}")
            finally:
                os.close(fd)

        def reader() -> None:
            n = 0
            try:
                while not stop.is_set():
                    for rel in sorted(ref):
                        with lock:
                            want = ref[rel]
                            got = (gp / rel).read_bytes()
                        if got != want:
                            problems.append(f"{rel}: wrong bytes during the rekey")
                        counts["reads"] += 1
                    n += 1
                    if n % 3 == 0:
                        _drop_caches()  # from the stored blocks, whatever their version
            except OSError as e:
                problems.append(f"reader: {e}")

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        try:
            st = d.jcli("rekey", "start", str(gp))
            assert st["state"] == "running" and st["target_version"] == new, st
            st = _wait_done(d, gp)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not problems, problems[:5]
        assert counts["writes"] > 10 and counts["reads"] > 10, counts
        assert st["state"] == "done", st
        assert st["files_failed"] == 0 and st["busy"] == 0, st
        # every file was sealed again; the empty one has at most a header (moved to
        # the new version) or nothing stored at all ("current")
        assert st["files_rekeyed"] + st["files_current"] == len(ref), st
        assert st["files_rekeyed"] >= len(ref) - 1, st

        os.sync()
        _drop_caches()
        for rel, want in ref.items():
            assert (gp / rel).read_bytes() == want, rel
            if not want:
                continue
            stored = backing / rel
            h = _header(stored)
            assert (h.key_version, h.oldest_version) == (new, new), (rel, h)
            vs = _block_versions(stored)
            if rel == "sparse":
                assert vs == [new, new, None, None, None, None, None, new], vs
            else:
                assert set(vs) == {new}, (rel, vs)
            assert _decrypt(scratch, stored) == want, rel
        use = d.jcli("keys", "versions", "k1", "--usage", str(gp), "--keystore",
                     str(scratch / "keystore.json"), "--master-key-file",
                     str(scratch / "master.key"))
        assert [v["version"] for v in use["versions"] if v["files"]] == [new], use
        status = d.jcli("status")
        assert [(x["guard"], x["state"]) for x in status["rekeys"]] == [(str(gp), "done")]
    ev = _audit(scratch)
    runs = [e["reason"].split(":")[0] for e in ev if e["kind"] == "rekey"]
    assert runs == ["rekey started", "rekey finished"], runs
    done = {e["path"] for e in ev if e["kind"] == "rekey-file"
            and e["detail"].get("outcome") == "done"}
    assert {str(gp / r) for r in ref if ref[r]} <= done, done


def test_kernel_rekey_survives_sigkill_of_takakryptd(scratch):
    # slow enough that every kill lands mid-run (about 3 MB at 50 kB/s)
    cfg, gp, backing = _cfg(scratch, rekey_rate=0.05)
    rng = random.Random(21)
    with running(scratch, cfg):
        ref = {}
        for i in range(6):
            ref[f"f{i}"] = rng.randbytes(rng.choice([300_000, 700_001]))
            (gp / f"f{i}").write_bytes(ref[f"f{i}"])
        os.sync()
    base = _header(backing / "f0").key_version
    new = _keys(scratch, "rotate", "k1")["current_version"]
    kills = 0
    mixed_seen = 0
    for rnd in range(10):
        d = _start(scratch, cfg)
        try:
            if rnd == 0:
                st = d.jcli("rekey", "start", str(gp))
                assert st["state"] == "running", st
            else:  # resumed by itself from the state file
                st = d.jcli("rekey", "status", str(gp))
                assert st["state"] in ("running", "done"), st
                assert st["runs"] >= 2 or st["state"] == "done", st
            time.sleep(random.Random(rnd).uniform(0.5, 3.0))
            for rel, want in ref.items():  # while the run goes on: never wrong bytes
                assert (gp / rel).read_bytes() == want, (rnd, rel)
            mixed_seen += sum(1 for r in ref if len(set(_block_versions(backing / r))) > 1)
        finally:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGKILL)
                kills += 1
            d.stop(timeout=60)
        _drop_caches()
    assert kills == 10
    with running(scratch, cfg) as d:
        st = _wait_done(d, gp)
        assert st["state"] == "done" and st["files_failed"] == 0, st
        assert st["runs"] >= 2, st
        _drop_caches()
        for rel, want in ref.items():
            assert (gp / rel).read_bytes() == want, rel
    for rel, want in ref.items():
        h = _header(backing / rel)
        assert (h.key_version, h.oldest_version) == (new, new), (rel, h)
        assert set(_block_versions(backing / rel)) == {new}, rel
        assert _decrypt(scratch, backing / rel) == want, rel
    assert new == base + 1
    # the rate limit kept the run going across kills: some kill found files half done
    assert mixed_seen > 0


def test_kernel_rekey_ioctls_refused_to_others_and_v1_files_skipped(scratch):
    from takakrypt.agent import krekey

    cfg, gp, backing = _cfg(scratch)
    with running(scratch, cfg) as d:
        (gp / "a").write_bytes(b"x" * 10_000)
        # a v1 file made by the reference writer, put into the store (a guard point
        # made before format 2 was the default)
        subprocess.run([PY, "-m", "takakrypt", "encrypt", "--taka-version", "1", "--key",
                        "k1", "--keystore", str(scratch / "keystore.json"),
                        "--master-key-file", str(scratch / "master.key"), "-q", "-",
                        str(backing / "old1")], input=b"v1 data" * 1000, check=True,
                       capture_output=True, timeout=120)
        assert _header(backing / "old1").version == 1
        os.sync()
        # this process is not the registered agent: EPERM, the file untouched
        fd = os.open(gp / "a", os.O_RDONLY)
        try:
            r = krekey.RekeyRange(start=0, count=8, version=2)
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.ioctl(fd, ctypes.c_ulong(krekey.IOC_REKEY_RANGE), ctypes.byref(r)) == -1
            assert ctypes.get_errno() == errno.EPERM
        finally:
            os.close(fd)
        new = _keys(scratch, "rotate", "k1")["current_version"]
        d.cli("rekey", "start", str(gp), "--wait", timeout=600)
        st = d.jcli("rekey", "status", str(gp))
        assert st["state"] == "done" and st["files_rekeyed"] == 1, st
        assert st["files_skipped"] == 1 and st["files_failed"] == 0, st
        assert st["errors"] == [{"path": "old1", "error": "skipped-v1"}], st["errors"]
        assert (gp / "old1").read_bytes() == b"v1 data" * 1000
        assert (gp / "a").read_bytes() == b"x" * 10_000
        assert _header(backing / "a").oldest_version == new
    skipped = [e for e in _audit(scratch) if e["kind"] == "rekey-file"
               and e["detail"].get("outcome") == "skipped-v1"]
    assert [e["path"] for e in skipped] == [str(gp / "old1")]


def test_block_torn_during_a_rekey_is_put_back_from_the_journal(scratch):
    """A power cut while the module wrote a range again (simulated: the agent stopped,
    then a block half overwritten in the store and the range's journal left as it was
    when the cut came): the next takakryptd puts the block back before it serves."""
    from takakrypt.agent import krekey

    cfg, gp, backing = _cfg(scratch)
    data = random.Random(22).randbytes(4 * BS + 10)
    with running(scratch, cfg) as d:
        (gp / "f").write_bytes(data)
        os.sync()
        _keys(scratch, "rotate", "k1")
        d.cli("rekey", "start", str(gp), "--wait", timeout=600)  # makes the state dir
    stored = (backing / "f").read_bytes()
    k = krekey.KernelRekeyFiles(str(gp), cfg["agent"]["state_dir"], str(gp), "k1")
    k._journal_write("f", _header(backing / "f").file_id, 0, stored[HDR:])
    torn = bytearray(stored)
    torn[HDR + SBS + 100:HDR + SBS + 3000] = os.urandom(2900)  # block 1's first page
    (backing / "f").write_bytes(torn)
    with running(scratch, cfg):
        assert (backing / "f").read_bytes() == stored
        assert (gp / "f").read_bytes() == data
    assert os.path.getsize(k.journal_path) == 0
    why = [e["reason"] for e in _audit(scratch) if e["kind"] == "rekey"]
    assert any("1 block(s)" in r and "put back from the rekey journal" in r for r in why), why
