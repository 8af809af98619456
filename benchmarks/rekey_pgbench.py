#!/usr/bin/env python3
"""What a live rekey costs a database: pgbench TPS during a rekey as a ratio to TPS
without it, in the same pgbench run, and the rekey rate reached.

PostgreSQL 15 on an in-place guard point served by a real takakryptd (FUSE on this
machine; with ``--engine kernel``, takakryptfs in a VM booted as benchmarks/kernel_vm.py
does, Debian's 6.1 kernel under TCG: the module seals blocks again in place,
docs/kernel.md "Live rekey"), under the policy a deployment writes (the server's executables by path and SHA-256 for the
postgres user, tar gets ciphertext, everything else denied).  pgbench -i -s SCALE, the
key rotated, then one pgbench run (-c 4 -j 2, -P 1) of which:

  before   LEAD seconds without a rekey (the first 3 s are warm-up, not counted)
  during   `takakrypt rekey start` at the rate given (default: the guard point's
           default rekey_rate) until the run is done
  after    TAIL seconds without a rekey

The reference TPS is the mean of the per-second TPS before and after; the ratio is the
mean during / that reference.  Nothing is asserted: this prints, and saves
benchmarks/results/rekey-pgbench-<time>.json.

  usage: benchmarks/rekey_pgbench.py [--engine fuse|kernel] [--vm] [--scale N]
                                     [--rate MB/S] [--lead S] [--tail S] [--json]
                                                                             (as root)
  BENCH_ROOT   where to work (default /var/tmp)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from agent_helpers import Daemon, until  # noqa: E402
from pg_helpers import Cluster, cluster_dirs, policy_config  # noqa: E402

PROGRESS = re.compile(r"progress: ([\d.]+) s, ([\d.]+) tps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--rate", type=float, default=None, help="MB/s (default: the config's)")
    ap.add_argument("--lead", type=float, default=20.0)
    ap.add_argument("--tail", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--engine", choices=("fuse", "kernel"), default="fuse",
                    help="the guard point's engine (kernel: in a VM; default fuse)")
    ap.add_argument("--vm", action="store_true",
                    help="run in the VM even with --engine fuse (the same emulated CPU as "
                    "the kernel engine's run, for a like-for-like ratio)")
    ap.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if (a.engine == "kernel" or a.vm) and a.guest is None:
        return _in_vm(a)
    if a.guest is not None and a.engine == "kernel":
        subprocess.run(["insmod", os.environ["TAKAKRYPT_KO"]], check=True)
    work = Path(tempfile.mkdtemp(prefix="tk-rekey-bench-", dir=os.environ.get("BENCH_ROOT",
                                                                               "/var/tmp")))
    os.chmod(work, 0o755)
    gp, sock = cluster_dirs(work)
    cfg = policy_config(work, gp, sha256=True,
                        engine="kernel" if a.engine == "kernel" else None)
    ks = ["--keystore", str(work / "keystore.json"), "--master-key-file",
          str(work / "master.key")]
    pg = Cluster(gp, sock)
    d = Daemon(work, cfg)
    bench = None
    try:
        slow = a.guest is not None  # TCG: everything takes minutes
        d.wait_for("READY=1", timeout=400 if slow else 30)
        if slow:
            pg.initdb(timeout=900)
            pg.start(tries=3000)
        else:
            pg.initdb()
            pg.start()
        r = pg.run("pgbench", "-i", "-s", str(a.scale), "-q", timeout=1800)
        if r.returncode:
            raise SystemExit(f"pgbench -i failed: {r.stderr}")
        subprocess.run([sys.executable, "-m", "takakrypt", "keys", "rotate", "k1", *ks],
                       check=True, capture_output=True, timeout=120)
        bench = subprocess.Popen(
            ["pgbench", "-c", "4", "-j", "2", "-T", "3600", "-P", "1", "-n"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user="postgres",
            group="postgres", extra_groups=[], env=pg.env, cwd=str(sock))
        t0 = time.monotonic()
        time.sleep(a.lead)
        start = time.monotonic() - t0
        args = ["rekey", "start", str(gp)] + (["--rate", str(a.rate)] if a.rate is not None
                                              else [])
        st = d.jcli(*args)
        st = until(lambda: (s := d.jcli("rekey", "status", str(gp)))["state"] != "running"
                   and s, 3600, 0.25)
        end = time.monotonic() - t0
        time.sleep(a.tail)
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=120)
        samples = [(float(m.group(1)), float(m.group(2))) for m in PROGRESS.finditer(err)]
        failed = sum(int(x) for x in re.findall(r", (\d+) failed", err))
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
        if pg.server is not None and pg.server.poll() is None:
            pg.stop()
        d.stop()
    before = [t for s, t in samples if 3 <= s <= start]
    during = [t for s, t in samples if start + 1 <= s <= end]
    after = [t for s, t in samples if end + 1 <= s]
    ref = before + after
    mean = (lambda xs: sum(xs) / len(xs) if xs else float("nan"))
    out = {
        "scale": a.scale, "rate_limit_mb_s": st["rate"] / 1e6 if st else None,
        "rekey_seconds": round(end - start, 2), "state": st["state"] if st else None,
        "files_rekeyed": st["files_rekeyed"], "files_failed": st["files_failed"],
        "bytes_rekeyed": st["bytes_rekeyed"],
        "rekey_mb_s": round(st["bytes_rekeyed"] / 1e6 / max(end - start, 1e-9), 2),
        "tps_before": round(mean(before), 1), "tps_after": round(mean(after), 1),
        "tps_during": round(mean(during), 1), "tps_reference": round(mean(ref), 1),
        "ratio_during": round(mean(during) / mean(ref), 3) if ref and during else None,
        "samples_during": len(during), "pgbench_failed_in_progress": failed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": a.engine + (" (VM, TCG)" if a.guest is not None else ""),
    }
    res = (a.guest / "result.json" if a.guest is not None else HERE / "results" /
           f"rekey-pgbench-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    res.write_text(json.dumps(out | {"samples": samples, "window": [start, end]}, indent=1))
    _print(out, res, a.json)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(out: dict, res: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(out, indent=1))
    else:
        print(f"pgbench scale {out['scale']}, -c 4 -j 2, in-place guard point, engine "
              f"{out['engine']}, deployment policy")
        print(f"rekey: {out['files_rekeyed']} files, {out['bytes_rekeyed'] / 1e6:.1f} MB in "
              f"{out['rekey_seconds']} s = {out['rekey_mb_s']} MB/s (limit "
              f"{out['rate_limit_mb_s'] or 'none'} MB/s), {out['files_failed']} failed")
        print(f"TPS before {out['tps_before']}, during {out['tps_during']}, after "
              f"{out['tps_after']}: during/reference = {out['ratio_during']}x (target >= 0.7x)")
        print(f"results: {res}")


def _in_vm(a: argparse.Namespace) -> int:
    """Boot the VM, run this script in it with ``--guest``, print its result."""
    sys.path.insert(0, str(HERE))
    import tempfile

    import vmharness as vm
    from kernel_vm import vm_module

    ko = vm_module("rekey_pgbench")
    if ko is None:
        return 2
    out = Path(tempfile.mkdtemp(prefix="rekey-pgbench-vm-"))
    out.chmod(0o755)
    args = f"--engine {a.engine} --scale {a.scale} --lead {a.lead} --tail {a.tail}" + (
        f" --rate {a.rate}" if a.rate is not None else "")
    run = vm.run_guest(out, f"{sys.executable} {Path(__file__).resolve()} --guest {out} {args}",
                       timeout=5400, memory="2G",
                       env={"TAKAKRYPT_KO": str(ko), "BENCH_ROOT": "/tmp",
                            "PYTHONPATH": f"{HERE.parent / 'src'}:{HERE.parent / 'tests'}",
                            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"})
    result = out / "result.json"
    if run.rc != 0 or not result.exists() or run.problems:
        print(f"rekey_pgbench: the run in the VM failed\n{run.tail()}\n"
              + "\n".join(run.problems), file=sys.stderr)
        return 1
    data = json.loads(result.read_text())
    res = HERE / "results" / f"rekey-pgbench-{a.engine}-vm-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    res.write_text(json.dumps(data, indent=1))
    _print({k: v for k, v in data.items() if k not in ("samples", "window")}, res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
