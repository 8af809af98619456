"""`takakrypt bench` end to end: real FUSE guard points, tiny sizes.

The runner runs in a child process (clients of a mount never run in the process that
serves it, and Ctrl-C is sent to its process group as a terminal would).  No timed
assertions: figures are only checked to be plausible (positive, finite, within wide
bounds), never against each other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from fuse_helpers import fuse_skip_reason, sweep_stale_mounts  # noqa: E402
from takakrypt.bench import SCHEMA  # noqa: E402
from takakrypt.bench.workloads import WORKLOAD_NAMES, postgres_bin  # noqa: E402
from takakrypt.guard import fuse_mounts  # noqa: E402

needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
TINY = ["--quick", "--rounds", "2", "--size", "4", "--files", "120", "--fio-size", "4",
        "--fio-seconds", "1", "--pg-scale", "1", "--pg-seconds", "1", "-q"]
GUARDS = ("fuse", "fuse-allow-all")
TARGETS = ("native", *GUARDS)
#: plausible bounds per unit (anything outside is a broken measurement, not a slow disk)
BOUNDS = {"MiB/s": (0.01, 1e6), "s": (1e-6, 600), "IOPS": (1, 1e8), "TPS": (0.1, 1e7)}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "takakrypt", "bench", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def private_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("takakrypt-bench-")}


@pytest.fixture
def bdir():
    d = Path(tempfile.mkdtemp(prefix="tkbench-test-", dir="/var/tmp"))
    d.chmod(0o755)  # the postgres user reaches its cluster below it
    yield d
    sweep_stale_mounts(str(d))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny run of every workload: (JSON on stdout, saved JSON, HTML path, dir, stderr)."""
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="tkbench-test-", dir="/var/tmp"))
    d.chmod(0o755)
    out = tmp_path_factory.mktemp("bench")
    before = private_dirs()
    try:
        r = bench(*TINY, "--dir", str(d), "--json", "--save", str(out / "run.json"),
                  "--html", str(out / "report.html"))
        left = sorted(os.listdir(d))
        mounts = fuse_mounts(str(d))
    finally:
        sweep_stale_mounts(str(d))
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    return {"doc": json.loads(r.stdout), "saved": json.loads((out / "run.json").read_text()),
            "html": out / "report.html", "left": left, "mounts": mounts,
            "new_private": private_dirs() - before, "stderr": r.stderr, "out": out}


def test_quick_run_json_schema(quick_run):
    doc = quick_run["doc"]
    assert doc == quick_run["saved"]
    assert doc["schema"] == SCHEMA
    for key in ("started", "finished", "settings", "machine", "policy", "targets", "workloads"):
        assert key in doc
    m = doc["machine"]
    assert m["cpus"] >= 1 and m["cpu_model"] and m["kernel"].startswith("Linux")
    assert m["filesystem"]["type"] not in ("", "unknown", "fuse.takakrypt")
    assert doc["settings"]["rounds"] == 2
    names = [t["name"] for t in doc["targets"]]
    assert names[:3] == list(TARGETS), "the realistic guard point comes before allow-all"
    kernel = doc["targets"][3]
    assert kernel["name"] == "kernel" and kernel["reason"]
    assert kernel["status"] == "skipped"
    assert [w["name"] for w in doc["workloads"]] == list(WORKLOAD_NAMES)


def test_every_workload_has_native_and_guard_figures(quick_run):
    for w in quick_run["doc"]["workloads"]:
        if w["status"] == "skipped":  # only where the program is missing, with the reason
            assert w["name"].startswith(("fio", "pgbench")) and w["reason"], w
            assert (w["name"] == "pgbench" and postgres_bin() is None) or \
                (w["name"].startswith("fio") and shutil.which("fio") is None), w
            assert not w["results"]
            continue
        assert w["status"] == "ok" and not w.get("errors"), w
        lo, hi = BOUNDS[w["unit"]]
        for t in TARGETS:
            res = w["results"][t]
            assert len(res["values"]) == 2, (w["name"], t)
            assert all(math.isfinite(v) and lo <= v <= hi for v in res["values"]), (w, t)
            assert res["min"] <= res["q1"] <= res["median"] <= res["q3"] <= res["max"]
        for g in GUARDS:
            r = w["ratios"][g]
            assert 0 < r["min"] <= r["max"] and math.isfinite(r["median"]) and r["median"] > 0
            native, guard = w["results"]["native"]["median"], w["results"][g]["median"]
            want = guard / native if w["higher_is_better"] else native / guard
            assert r["median"] == pytest.approx(want)


def test_realistic_policy_names_programs_by_path_and_hash(quick_run):
    pol = quick_run["doc"]["policy"]["realistic"]
    import hashlib
    dd = os.path.realpath(shutil.which("dd"))
    assert json.dumps(dd) in pol
    assert hashlib.sha256(Path(dd).read_bytes()).hexdigest() in pol
    assert pol.rstrip().endswith("{actions: [all_ops], effects: [deny]}")


def test_quick_run_leaves_nothing(quick_run):
    assert quick_run["mounts"] == []
    assert quick_run["left"] == []          # the work directory is gone
    assert quick_run["new_private"] == set()  # the key's private directory too


def test_text_table_and_progress_on_a_terminal(bdir):
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "takakrypt", "bench", "--dir", str(bdir),
                          "--workloads", "seq-write", "--rounds", "1", "--size", "2",
                          "--no-save"], env=env(), stderr=slave, stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    os.close(slave)
    drawn = b""
    while True:
        try:
            c = os.read(master, 4096)
        except OSError:
            break
        if not c:
            break
        drawn += c
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0, drawn
    os.close(master)
    assert b"steps" in drawn and b"round 1/1: seq on fuse (policy)" in drawn
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("workload"))
    assert header.index("fuse (policy)") < header.index("fuse (allow-all)")
    row = next(ln for ln in lines if ln.startswith("seq-write"))
    assert row.count("[") == 5  # native, policy + ratio, allow-all + ratio
    assert "kernel engine: " in out


@needs_fuse
@pytest.mark.parametrize("when", ["mounted", "pgbench"])
def test_sigint_mid_run_leaves_no_mount(bdir, when):
    if when == "pgbench" and postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed")
    before = private_dirs()
    args = (["--workloads", "seq-write", "--size", "16", "--rounds", "50"] if when == "mounted"
            else ["--workloads", "pgbench", "--pg-scale", "1", "--pg-seconds", "30"])
    p = subprocess.Popen([sys.executable, "-m", "takakrypt", "bench", "--dir", str(bdir),
                          "--no-save", "-q", *args], env=env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,
                         # a test run started in the background (`cmd &`) inherits an
                         # ignored SIGINT; the run must see Ctrl-C as a terminal sends it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def reached() -> bool:
        if len(fuse_mounts(str(bdir))) < 2:
            return False
        if when == "mounted":
            return True
        # a cluster is up on native and on the policy guard point (names are in clear
        # in the backing directories)
        return (len(list(bdir.glob(".takakrypt-bench-*/native/pg/postmaster.pid"))) == 1
                and len(list(bdir.glob(".takakrypt-bench-*/fuse.back/pg/postmaster.pid"))) == 1)
    try:
        deadline = time.monotonic() + 300
        while not reached():  # a wait, not a timed assertion
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.05)
        if when == "pgbench":
            time.sleep(1)  # into the measured pgbench run
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert fuse_mounts(str(bdir)) == []
    assert os.listdir(bdir) == []
    assert private_dirs() - before == set()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(bdir) not in ps  # no postgres (nor anything else) left running on it


# ---------------------------------------------------------------------------------------
# the HTML report in a real browser


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def run_chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    home = tempfile.mkdtemp(prefix="tkbench-chromium-")
    try:
        return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                               "--hide-scrollbars", f"--user-data-dir={home}", *args],
                              capture_output=True, timeout=120,
                              env=dict(os.environ, HOME=home))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def test_html_report_renders_its_plots_in_chromium(quick_run):
    doc = quick_run["doc"]
    page = quick_run["html"]
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<link" not in text  # self-contained
    r = run_chromium("--dump-dom", page.as_uri())
    if r.returncode != 0 or b"<svg" not in r.stdout:
        pytest.skip(f"chromium cannot run here: {r.stderr.decode(errors='replace')[-300:]}")
    dom = r.stdout.decode()
    measured = [w for w in doc["workloads"] if w["ratios"]]
    assert 'id="ratio-plot"' in dom
    assert dom.count('class="tk-plot workload-plot"') == len(measured)
    bars = dom.count('class="bar"')
    assert bars == len(measured) * len(GUARDS) + len(measured) * len(TARGETS)
    assert dom.count('class="whisker"') == 3 * bars
    for w in measured:
        for g in GUARDS:
            assert f'data-workload="{w["name"]}" data-target="{g}"' in dom
    assert 'id="ratios-table"' in dom and doc["machine"]["cpu_model"] in dom

    shot = quick_run["out"] / "shot.png"
    r = run_chromium(f"--screenshot={shot}", "--window-size=1000,900", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-500:]
    w, h, bpp, rows = decode_png(shot.read_bytes())
    assert (w, h) == (1000, 900)
    non_white = policy_blue = 0
    for row in rows:
        for i in range(0, len(row), bpp):
            px = row[i:i + 3]
            if min(px) < 240:
                non_white += 1
            if abs(px[0] - 0x1f) < 8 and abs(px[1] - 0x77) < 8 and abs(px[2] - 0xb4) < 8:
                policy_blue += 1
    assert non_white > 0.02 * w * h  # not blank
    assert policy_blue > 500  # the policy guard point's bars are drawn in the first screen


# ---------------------------------------------------------------------------------------
# no mount needed


def test_compare_prints_ratio_changes(quick_run, tmp_path):
    a = quick_run["doc"]
    b = json.loads(json.dumps(a))
    w = next(x for x in b["workloads"] if x["ratios"])
    w["ratios"]["fuse"]["median"] *= 1.25
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    r = bench("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines()
               if ln.split()[:2] == [w["name"], "fuse"])
    assert row.endswith("+25%")
    r = bench("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json")
    c = json.loads(r.stdout)
    got = next(x for x in c["rows"] if x["workload"] == w["name"] and x["target"] == "fuse")
    assert got["change"] == pytest.approx(0.25)
    assert c["machine_differs"] == []


def test_compare_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    r = bench("--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json"))
    assert r.returncode == 2 and "not a takakrypt bench result" in r.stderr


def test_usage_errors_exit_2(tmp_path):
    r = bench("--workloads", "nope", "--dir", str(tmp_path))
    assert r.returncode == 2 and "unknown workload nope" in r.stderr
    r = bench("--dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_is_a_manual():
    r = bench("--help")
    assert r.returncode == 0
    for s in ("--quick", "--html FILE", "--compare A B", "exit status:", "16", "130",
              "SHA-256", "docs/benchmarking.md"):
        assert s in r.stdout, s
