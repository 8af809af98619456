"""Issue 15 item 6: what a reload that adds guard points costs, and what the guard
points already live see meanwhile.  Printed, never asserted.

    PYTHONPATH=src python benchmarks/reload_latency.py [--adds N] [--rounds R]

Starts takakryptd (foreground, its own keystore and sockets in a temporary directory)
with one guard point A; each round writes a configuration that adds N guard points,
reloads (`takakrypt reload`, which returns once the new ones are mounted) and releases
them again, while a client process reads a file of A in a loop with a fresh decision
each time (the reload bumps the decision generation, and the reader opens the file each
time).  Prints the start-up time, the reload latencies, and the latency of A's reads
during reloads against A's reads while idle.  Needs root and FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_helpers import Daemon, base_config, write_config  # noqa: E402

PY = os.path.realpath(sys.executable)
READER = """
import sys, time
path, stop = sys.argv[1], sys.argv[2]
import os
while not os.path.exists(stop):
    t0 = time.perf_counter()
    with open(path) as f:
        f.read()
    print(time.time(), time.perf_counter() - t0, flush=True)
    time.sleep(0.005)
"""


def _cfg(tmp: Path, names: list[str]) -> dict:
    cfg = base_config(tmp)
    cfg["agent"]["log_level"] = "info"
    cfg["process_sets"] = {"app": {"executables": [PY]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = []
    for n in names:
        (tmp / n).mkdir(exist_ok=True)
        cfg["guard_points"].append({"path": str(tmp / n), "policy": "gp", "key": "k1"})
    return cfg


def _drain(sock) -> None:
    sock.settimeout(None)
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return (f"n={len(xs)} median {statistics.median(xs) * 1e3:.2f} ms, p99 "
            f"{_pct(xs, 0.99) * 1e3:.2f} ms, max {max(xs) * 1e3:.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adds", type=int, default=2, help="guard points each reload adds")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tk-reload-") as td:
        tmp = Path(td)
        t0 = time.perf_counter()
        d = Daemon(tmp, _cfg(tmp, ["a"]))
        try:
            d.wait_for("READY=1")
            start = time.perf_counter() - t0
            # read the notifications nobody waits for (a full socket blocks the agent)
            threading.Thread(target=_drain, args=(d.notify,), daemon=True).start()
            subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'w').write('x' * 4096)",
                            str(tmp / "a" / "f")], check=True, timeout=30)
            stop = tmp / "stop"
            reader = subprocess.Popen([PY, "-c", READER, str(tmp / "a" / "f"), str(stop)],
                                      stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            windows, reloads = [], []
            extra = [f"n{i}" for i in range(a.adds)]
            for _ in range(a.rounds):
                for names in (["a", *extra], ["a"]):
                    write_config(d.config_path, _cfg(tmp, names))
                    w0 = time.time()
                    r0 = time.perf_counter()
                    assert json.loads(d.cli("reload", "--json").stdout)["reloaded"]
                    reloads.append(time.perf_counter() - r0)
                    windows.append((w0, time.time()))
                    time.sleep(0.3)
            stop.touch()
            out, _ = reader.communicate(timeout=30)
            during, idle = [], []
            for line in out.splitlines():
                at, lat = map(float, line.split())
                (during if any(w0 <= at <= w1 for w0, w1 in windows) else idle).append(lat)
            status = d.jcli("guard", "list")
        finally:
            d.stop()
    print(f"start-up to READY=1 (1 guard point):        {start * 1e3:.0f} ms")
    print(f"reload adding/removing {a.adds} guard point(s):   {_ms(reloads)}")
    print(f"reads of guard point A during reloads:      {_ms(during)}")
    print(f"reads of guard point A while idle:          {_ms(idle)}")
    if during and idle:
        print(f"ratio (median during / idle):               "
              f"{statistics.median(during) / statistics.median(idle):.2f}")
    print(f"read_ahead_kb of A:                         {status[0]['stats']['read_ahead_kb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
