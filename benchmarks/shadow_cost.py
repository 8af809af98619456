#!/usr/bin/env python3
"""What the kill-recovery state costs while serving (docs/guard-points.md, "After a kill").

Every classic request is read into its reader's journal slot and copied out, every
reply up to 4 KiB is saved there before it is written, and lookups, forgets, opens and
releases write their shadow records.  This times a metadata-heavy loop (create, write
4 KiB, fsync, stat, read back, rename, unlink) on a guard point served on the classic
/dev/fuse channel with the shadow on and off (TAKAKRYPT_SHADOW=0), alternating A/B
rounds in the same run, and prints the ratio of the medians.

  usage: benchmarks/shadow_cost.py [--files N] [--rounds R] [--json]   (run as root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def one_round(shadow: bool, files: int) -> float:
    from fuse_helpers import guard_mount

    if shadow:
        os.environ.pop("TAKAKRYPT_SHADOW", None)
    else:
        os.environ["TAKAKRYPT_SHADOW"] = "0"
    block = os.urandom(4096)
    with tempfile.TemporaryDirectory(prefix="tk-shadow-") as tmp, \
            guard_mount(Path(tmp), io_uring=False, keeper=shadow) as g:
        d = g.mnt / "d"
        d.mkdir()
        t0 = time.perf_counter()
        for i in range(files):
            p = d / f"f{i}"
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, block)
            os.fsync(fd)
            os.close(fd)
            os.stat(p)
            assert p.read_bytes() == block
            os.rename(p, d / f"g{i}")
            os.unlink(d / f"g{i}")
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="files per round (2000)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args()
    on: list[float] = []
    off: list[float] = []
    for r in range(a.rounds):
        for shadow in ((True, False) if r % 2 == 0 else (False, True)):
            (on if shadow else off).append(one_round(shadow, a.files))
            if not a.json:
                print(f"round {r + 1} shadow {'on ' if shadow else 'off'}: "
                      f"{(on if shadow else off)[-1]:.2f} s", file=sys.stderr)
    res = {"files": a.files, "rounds": a.rounds, "on_s": on, "off_s": off,
           "ratio_on_off": statistics.median(on) / statistics.median(off)}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"shadow on / off (median of {a.rounds}, {a.files} files each): "
              f"{res['ratio_on_off']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
