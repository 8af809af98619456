#!/usr/bin/env python3
"""What TAKA version 2 (a key version per block, docs/file-format.md "Version 2") costs
against version 1, measured in one run, rounds alternating; ratios printed (v2 / v1,
throughput: above 1 is faster).

1. the native batch cipher, 64 KiB (16 blocks) per call, encrypt and decrypt, on each
   engine: a 96-bit tag and the version in the AAD and after the tag;
2. `TakaFile` reading a 64 MiB file: v1; v2 with one version; v2 whose blocks alternate
   between two versions (the worst case: the batch restarts at every block) and v2 in
   runs of 64 blocks per version (a file partly rewritten after a rotation);
3. a FUSE guard point (`python -m takakrypt.guard --format 1|2`, tmpfs backing, the
   same allow-all policy on both: this compares formats, not policies) writing and
   reading a 256 MiB file with dd (fsync; cold read after dropping the caches); and
   a cold read of a 64 MiB v2 file whose blocks alternate between two versions against
   one of a single version (both made by the reference writer).

  usage: benchmarks/format_v2.py [--rounds N] [--json OUT]     (part 3 needs root, FUSE)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from takakrypt import format as fmt  # noqa: E402
from takakrypt._aesgcm import BlockCipher, engines  # noqa: E402
from takakrypt.cryptofile import TakaFile  # noqa: E402

MiB = 1 << 20
SECRET = os.urandom(32)


def vkey(_name: str, version: int) -> bytearray:
    return bytearray(hashlib.sha256(SECRET + version.to_bytes(4, "little")).digest())


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def cipher_rounds(rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    buf = os.urandom(64 * 1024)
    aad = os.urandom(96)
    calls = 4000
    for engine in engines():
        for r in range(rounds):
            for ver in ((None, 7) if r % 2 == 0 else (7, None)):
                c = BlockCipher(bytes(32), engine=engine, block_version=ver)
                sealed = bytearray(len(buf) + 16 * fmt.OVERHEAD)
                plain = bytearray(len(buf))
                c.encrypt_into(buf, sealed, aad, 0)
                name = "v1" if ver is None else "v2"
                t = timed(lambda: c.encrypt_into(buf, sealed, aad, 0), calls)
                out.setdefault(f"cipher-encrypt-{engine}-{name}", []).append(
                    calls * len(buf) / t / 1e9)
                t = timed(lambda: c.decrypt_into(sealed, plain, aad, 0), calls)
                out.setdefault(f"cipher-decrypt-{engine}-{name}", []).append(
                    calls * len(buf) / t / 1e9)
    return out


def make_file(path: Path, size: int, layout: str) -> None:
    data = os.urandom(size)
    fv = 1 if layout == "v1" else 2
    with TakaFile.create(str(path), "k", 1, vkey("k", 1), format_version=fv) as f:
        f.write(0, data)
    if layout in ("v2-alternating", "v2-runs64"):
        step = 1 if layout == "v2-alternating" else 64
        with TakaFile.open(str(path), vkey, writable=True, write_version=2) as f:
            for b in range(step, size // 4096, 2 * step):
                f.write(b * 4096, data[b * 4096:(b + step) * 4096])


def takafile_rounds(rounds: int, tmp: Path) -> dict[str, list[float]]:
    size = 64 * MiB
    layouts = ["v1", "v2", "v2-alternating", "v2-runs64"]
    for lay in layouts:
        make_file(tmp / lay, size, lay)
    out: dict[str, list[float]] = {}
    for r in range(rounds):
        for lay in layouts[r % len(layouts):] + layouts[:r % len(layouts)]:
            with TakaFile.open(str(tmp / lay), vkey) as f:
                t = time.perf_counter()
                for off in range(0, size, 4 * MiB):
                    f.read(off, 4 * MiB)
                dt = time.perf_counter() - t
            out.setdefault(f"takafile-read-{lay}", []).append(size / dt / 1e9)
    return out


def dd(args: list[str]) -> None:
    subprocess.run(["dd", *args, "status=none"], check=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fuse_rounds(rounds: int, tmp: Path) -> dict[str, list[float]]:
    from fuse_helpers import fuse_skip_reason, unmount_path

    why = fuse_skip_reason()
    if why:
        print(f"part 3 skipped: {why}", file=sys.stderr)
        return {}
    keyfile = tmp / "key"
    keybytes = os.urandom(32)
    keyfile.write_bytes(keybytes)
    keyfile.chmod(0o600)
    procs, mnts = {}, {}
    out: dict[str, list[float]] = {}
    size_mb = 256
    try:
        for fv in (1, 2):
            back, mnt = tmp / f"back{fv}", tmp / f"mnt{fv}"
            back.mkdir()
            mnt.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tkbench", str(back)],
                           check=True)
            procs[fv] = subprocess.Popen(
                [sys.executable, "-m", "takakrypt.guard", "--mountpoint", str(mnt),
                 "--backing", str(back), "--key-file", str(keyfile), "--allow-all",
                 "--format", str(fv)], cwd=ROOT / "src", stdout=subprocess.DEVNULL)
            mnts[fv] = mnt
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(os.path.ismount(m) for m in
                                                      mnts.values()):
            time.sleep(0.1)
        # two 64 MiB v2 files made by the reference writer: one version, and versions
        # alternating block by block (the server's key file serves every version)
        data = os.urandom(64 * MiB)
        for name, step in (("one", 0), ("alternating", 1)):
            p = tmp / "back2" / name
            with TakaFile.create(str(p), "guard", 1, bytearray(keybytes),
                                 format_version=2) as f:
                f.write(0, data)
            if step:
                with TakaFile.open(str(p), lambda n, v: bytearray(keybytes), writable=True,
                                   write_version=2) as f:
                    for b in range(1, len(data) // 4096, 2):
                        f.write(b * 4096, data[b * 4096:(b + 1) * 4096])
        for r in range(rounds):
            for fv in ((1, 2) if r % 2 == 0 else (2, 1)):
                f = mnts[fv] / "big"
                t = time.perf_counter()
                dd(["if=/dev/zero", f"of={f}", "bs=1M", f"count={size_mb}", "conv=fsync"])
                out.setdefault(f"fuse-write-v{fv}", []).append(
                    size_mb / (time.perf_counter() - t))
                drop_caches()
                t = time.perf_counter()
                dd([f"if={f}", "of=/dev/null", "bs=1M"])
                out.setdefault(f"fuse-read-v{fv}", []).append(
                    size_mb / (time.perf_counter() - t))
            for name in (("one", "alternating") if r % 2 == 0 else ("alternating", "one")):
                drop_caches()
                t = time.perf_counter()
                dd([f"if={mnts[2] / name}", "of=/dev/null", "bs=1M"])
                out.setdefault(f"fuse-read-mixed-{name}", []).append(
                    64 / (time.perf_counter() - t))
        print("fuse: formats checked:",
              {fv: fmt.parse_header((tmp / f"back{fv}" / "big").read_bytes()[:128]).version
               for fv in (1, 2)}, file=sys.stderr)
    finally:
        for fv, p in procs.items():
            unmount_path(str(mnts[fv]))
            p.wait(30)
            subprocess.run(["umount", str(tmp / f"back{fv}")], check=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", help="write the samples here")
    ap.add_argument("--no-fuse", action="store_true", help="skip part 3")
    a = ap.parse_args()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tkv2-", dir="/var/tmp") as d:
        tmp = Path(d)
        for name, part in (("cipher", lambda: cipher_rounds(a.rounds)),
                           ("takafile", lambda: takafile_rounds(a.rounds, tmp)),
                           ("fuse", lambda: {} if a.no_fuse else fuse_rounds(a.rounds, tmp))):
            t = time.monotonic()
            samples |= part()
            print(f"part {name}: {time.monotonic() - t:.0f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{'measure':40} {'median':>10}  unit")
    for k, v in sorted(med.items()):
        unit = "MB/s" if k.startswith("fuse") else "GB/s"
        print(f"{k:40} {v:10.3f}  {unit}")
    print("\nratios, same run (throughput v2 / v1):")
    pairs = [(k, k.replace("-v2", "-v1")) for k in med if k.endswith("-v2")]
    pairs += [(f"takafile-read-{lay}", "takafile-read-v1")
              for lay in ("v2-alternating", "v2-runs64")]
    pairs += [("fuse-read-mixed-alternating", "fuse-read-mixed-one")]
    for a2, a1 in pairs:
        if a2 in med and a1 in med:
            print(f"  {a2:40} {med[a2] / med[a1]:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"samples": samples, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
