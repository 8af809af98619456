#!/usr/bin/env python3
"""What the per-file encryption count (docs/file-format.md, "Encryption count") costs:
small random writes on a guard point built from this tree against the same guard point
built from a reference commit (before the count), in the same run, rounds alternating.

Each round writes --writes random aligned 4 KiB blocks (O_DIRECT, so each is one FUSE
WRITE and one block encryption) into a 64 MiB file. With the default limits the count
adds one 128-byte header write per 65,536 block encryptions, and one per file creation
or state reload; the test build's lowered limits (--chunk) show what a small chunk
would cost instead.

  usage: benchmarks/nonce_lease.py [--ref COMMIT] [--writes N] [--rounds N] [--chunk N]
                                                                         (run as root)
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import fuse_helpers  # noqa: E402

BS = 4096
FILE_SIZE = 64 << 20


def build(tree: Path, cflags: str = "") -> None:
    env = dict(os.environ, CFLAGS=(os.environ.get("CFLAGS", "") + " " + cflags).strip())
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                   check=True, capture_output=True)


def checkout(commit: str, dst: Path) -> None:
    dst.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src", "kernel",
                              "tests", "setup.py", "pyproject.toml"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def copy_tree(dst: Path) -> None:
    dst.mkdir()
    for d in ("src", "kernel", "tests"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns(
            "*.so", "__pycache__", ".pytest_cache"))
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / f, dst / f)


def one_round(mnt: Path, writes: int, seed: int) -> float:
    buf = mmap.mmap(-1, BS)
    buf.write(os.urandom(BS))
    rng = random.Random(seed)
    offs = [rng.randrange(FILE_SIZE // BS) * BS for _ in range(writes)]
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_DIRECT)
    try:
        t0 = time.perf_counter()
        for off in offs:
            os.pwritev(fd, [buf], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="eaea19f", help="reference commit (before the count)")
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=0,
                    help="lease chunk of a test build of this tree (0: the default limits)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tk-nonce-bench-"))
    work.chmod(0o755)
    try:
        trees = {"ref": work / "ref", "new": work / "new"}
        checkout(args.ref, trees["ref"])
        copy_tree(trees["new"])
        build(trees["ref"])
        build(trees["new"], "-DTK_TEST_NONCE_LIMITS" if args.chunk else "")
        if args.chunk:
            os.environ["TK_TEST_NONCE_LIMITS"] = f"{args.chunk}:{1 << 31}:{3 << 30}"
        times: dict[str, list[float]] = {k: [] for k in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                fuse_helpers.HERE, fuse_helpers.SRC = tree / "tests", tree / "src"
                (work / f"{name}{r}").mkdir()
                with fuse_helpers.guard_mount(work / f"{name}{r}", key=bytes(32)) as g:
                    fd = os.open(g.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o600)
                    os.ftruncate(fd, FILE_SIZE)
                    os.close(fd)
                    times[name].append(one_round(g.mnt, args.writes, r))
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:4} median {v:.3f} s for {args.writes} writes "
                  f"({args.writes / v:,.0f} writes/s)  rounds: "
                  + " ".join(f"{t:.3f}" for t in times[k]))
        print(f"new / ref time ratio: {med['new'] / med['ref']:.3f}")
    finally:
        fuse_helpers.sweep_stale_mounts(str(work))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
