"""How long takakryptd takes to start (exec to READY=1) and to stop (SIGTERM to exit):
together they are the stall a `systemctl restart` puts on a guard point's applications
(docs/operations.md), and they are most of what the VM tests wait for.  Printed, never
asserted.

    PYTHONPATH=src python benchmarks/agent_start.py [--rounds N] [--reference SRC]

Each round starts takakryptd (foreground, its own keystore, sockets and one FUSE guard
point under a deployment-style policy in a temporary directory), waits for READY=1,
stops it with SIGTERM and waits for it to exit.  With ``--reference SRC`` (the ``src``
directory of another checkout, e.g. a `git worktree` of the previous commit) the rounds
alternate between this tree and that one, and the medians are printed side by side with
their ratio.  Both trees' bytecode is written first (as ci/test.sh does), so that
neither pays for compiling.  Needs root and FUSE.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_helpers import Daemon, base_config  # noqa: E402

TREE = Path(__file__).resolve().parent.parent
PY = os.path.realpath(sys.executable)


def _cfg(tmp: Path) -> dict:
    cfg = base_config(tmp)
    cfg["agent"]["log_level"] = "info"
    (tmp / "gp").mkdir(exist_ok=True)
    cfg["process_sets"] = {"app": {"executables": [PY]}}
    cfg["policies"] = {"gp": {"rules": [
        {"user_set": "root", "process_set": "app", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = [{"path": str(tmp / "gp"), "policy": "gp", "key": "k1"}]
    return cfg


def one(tmp: Path, cfg: dict, src: Path) -> tuple[float, float]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src)
    try:
        t0 = time.perf_counter()
        d = Daemon(tmp, cfg)
        d.wait_for("READY=1", 120)
        t1 = time.perf_counter()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    t2 = time.perf_counter()
    rc = d.stop(signal.SIGTERM, timeout=60)
    t3 = time.perf_counter()
    if rc != 0:
        raise SystemExit(f"takakryptd ({src}) exited {rc}: {d.logtext()[-2000:]}")
    return t1 - t0, t3 - t2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds per tree (default 10)")
    ap.add_argument("--reference", type=Path, help="the src directory of another checkout")
    ap.add_argument("--json", type=Path, help="write the samples here")
    a = ap.parse_args()
    trees = {"this": TREE / "src"}
    if a.reference:
        trees["reference"] = a.reference.resolve()
    for src in trees.values():
        compileall.compile_dir(str(src), quiet=2)
    samples: dict[str, dict[str, list[float]]] = {k: {"start": [], "stop": []} for k in trees}
    with tempfile.TemporaryDirectory(prefix="tk-start-") as t:
        tmp = Path(t)
        cfg = _cfg(tmp)
        one(tmp, cfg, trees["this"])  # warm-up: page cache, keystore made
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                start, stop = one(tmp, cfg, trees[name])
                samples[name]["start"].append(start)
                samples[name]["stop"].append(stop)
            print(f"\rround {r + 1}/{a.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}
    print(f"{'':10} {'start (s)':>10} {'stop (s)':>10} {'start+stop':>11}")
    for k, m in med.items():
        print(f"{k:10} {m['start']:10.3f} {m['stop']:10.3f} {m['start'] + m['stop']:11.3f}")
    if "reference" in med:
        r, t = med["reference"], med["this"]
        print(f"{'ratio':10} {t['start'] / r['start']:9.2f}x {t['stop'] / r['stop']:9.2f}x "
              f"{(t['start'] + t['stop']) / (r['start'] + r['stop']):10.2f}x  (this / reference)")
    if a.json:
        a.json.write_text(json.dumps({"rounds": a.rounds, "samples": samples,
                                      "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
