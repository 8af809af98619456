#!/usr/bin/env python3
"""What the data path's live rekey costs a database, without the agent around it:
pgbench TPS while every file of the cluster is rekeyed, as a ratio to TPS without a
rekey in the same pgbench run.

PostgreSQL 15 on a FUSE guard point served by tests/rekey_helpers.py (allow-all policy,
keys from a local keystore); pgbench -i -s SCALE; the key rotated; one pgbench run
(-c 4 -j 2 -P 1) of which LEAD seconds run without a rekey (the first 3 s not counted),
then DURING seconds with passes of GuardPoint.rekey_file over every file (a new key
version per pass) at RATE bytes/s per file, then TAIL seconds without.  Reference TPS:
the mean per-second TPS before and after; ratio: the mean during / that reference.
Prints; asserts nothing (the guard point's documentation quotes the numbers).

  usage: benchmarks/rekey_datapath.py [--scale N] [--rate MB/S] [--chunk BLOCKS]
                                      [--lead S] [--during S] [--tail S]   (as root)
  BENCH_ROOT   where to work (default /var/tmp)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from pg_helpers import PGBIN, Cluster, gid, uid  # noqa: E402
from rekey_helpers import make_keystore, rekey_mount  # noqa: E402

from takakrypt.keys import open_keystore  # noqa: E402

PROGRESS = re.compile(r"progress: ([\d.]+) s, ([\d.]+) tps")


def files_below(root: Path) -> list[str]:
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".takakrypt-")]
        for n in names:
            p = Path(d) / n
            if not n.startswith(".takakrypt-") and p.is_file() and not p.is_symlink():
                out.append(str(p.relative_to(root)))
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--rate", type=float, default=20.0, help="MB/s per file (0: unlimited)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lead", type=float, default=20.0)
    ap.add_argument("--during", type=float, default=40.0)
    ap.add_argument("--tail", type=float, default=20.0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tk-rekey-dp-", dir=os.environ.get("BENCH_ROOT",
                                                                          "/var/tmp")))
    os.chmod(work, 0o755)
    backing, sock = work / "backing", work / "sock"
    for d in (backing, sock):
        d.mkdir(mode=0o700)
        os.chown(d, uid("postgres"), gid("postgres"))
    keys = make_keystore(work)
    rate = int(a.rate * 1e6)
    try:
        with rekey_mount(work, *keys) as g:
            pg = Cluster(g.mnt, sock)
            pg.initdb()
            pg.start("shared_buffers=64MB")
            try:
                r = pg.run(str(PGBIN / "pgbench"), "-i", "-q", "-s", str(a.scale), timeout=1800)
                assert r.returncode == 0, r.stderr
                pg.psql("CHECKPOINT")
                total = a.lead + a.during + a.tail
                bench = subprocess.Popen(
                    [str(PGBIN / "pgbench"), "-c", "4", "-j", "2", "-P", "1", "-T",
                     str(int(total))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, user="postgres", group="postgres", extra_groups=[],
                    env=pg.env, cwd=str(sock))
                t0 = time.monotonic()
                stats = {"files": 0, "bytes": 0, "passes": 0, "outcomes": {}, "max_s": 0.0}
                window = [0.0, 0.0]

                def rekeys() -> None:
                    time.sleep(a.lead)
                    window[0] = time.monotonic() - t0
                    end = t0 + a.lead + a.during
                    while time.monotonic() < end:
                        with open_keystore(str(keys[0]), master_key_file=str(keys[1])) as ks:
                            v = ks.rotate("guard").current_version
                        for rel in files_below(g.backing):
                            if time.monotonic() >= end:
                                break
                            s = time.monotonic()
                            try:
                                outcome, n = g.rekey(rel, version=v, rate=rate,
                                                     chunk_blocks=a.chunk)
                            except OSError as e:
                                outcome, n = f"errno {e.errno}", 0
                            stats["max_s"] = max(stats["max_s"], time.monotonic() - s)
                            stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
                            if outcome == "done":
                                stats["files"] += 1
                                stats["bytes"] += n
                        stats["passes"] += 1
                    window[1] = time.monotonic() - t0

                t = threading.Thread(target=rekeys)
                t.start()
                out, err = bench.communicate(timeout=total + 600)
                t.join()
                assert bench.returncode == 0, err
            finally:
                pg.stop()
            before, during, after = [], [], []
            for m in PROGRESS.finditer(err + out):
                sec, tps = float(m.group(1)), float(m.group(2))
                if 3 < sec <= window[0]:
                    before.append(tps)
                elif window[0] + 1 < sec <= window[1]:
                    during.append(tps)
                elif sec > window[1] + 1:
                    after.append(tps)
            ref = (sum(before) + sum(after)) / max(1, len(before) + len(after))
            dur = sum(during) / max(1, len(during))
            el = window[1] - window[0]
            print(f"scale {a.scale}, rate {a.rate} MB/s per file, chunk {a.chunk} blocks")
            print(f"tps before {sum(before) / max(1, len(before)):.0f} ({len(before)} s), "
                  f"during {dur:.0f} ({len(during)} s), "
                  f"after {sum(after) / max(1, len(after)):.0f} ({len(after)} s)")
            print(f"ratio during / reference: {dur / ref:.2f}")
            print(f"rekeyed {stats['files']} files, {stats['bytes'] / 1e6:.1f} MB in "
                  f"{el:.1f} s ({stats['bytes'] / 1e6 / max(el, 1e-6):.1f} MB/s), "
                  f"{stats['passes']} passes, outcomes {stats['outcomes']}, "
                  f"longest file {stats['max_s']:.2f} s")
            print("engine:", {k: v for k, v in g.stats().items() if k.startswith("rekey")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
