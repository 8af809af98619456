"""Benchmark takakryptfs against native ext4 and the FUSE guard point, in one VM.

usage: python benchmarks/kernel_vm.py [--quick] [--rounds N] [--warmup N] [--json OUT]
                                      [--ko PATH] [--only W1,W2] [--keep DIR]
       make bench-kernel

Builds kernel/takakryptfs.ko against the headers of /boot's newest 6.1 kernel (or takes
--ko), boots that kernel once under QEMU (TCG, no KVM) with virtme-ng (2 CPUs, 2 GiB),
and runs benchmarks/kernel_guest.py there: ext4 on a brd RAM disk as the lower file
system, and the targets native / takakryptfs (realistic policy: decisions by takakryptd,
cached in the module) / FUSE guard point (realistic policy) / FUSE guard point
(allow-all) measured interleaved in rounds (order rotated), each with
`takakrypt bench`'s workloads sized for TCG: dd write (fsync) and cold read, untar of a
generated tree, ls -lR cold, rm -rf, fio 4 KiB random read/write.  Also the kernel's
gcm(aes) throughput through AF_ALG, to say how much of the sequential figures is the
(emulated) cipher, and the module's decision cache: cached open+read+close of one file
by one process against native, and the cache's hits and misses during an untar and an
ls -lR of the tree (the module's STATUS counters).

Prints a table: per workload and target the median and min-max over the rounds, the
ratio to native measured in the same run (median, and min-max of the per-round ratios)
and the issue's target (untar, ls -lR, rm -rf <= 1.5x native time; sequential read and
write >= 0.5x native throughput).  The disk is RAM and the CPU emulated: the ratios
say what each layer costs in CPU, the absolute figures say nothing about real machines.

--json OUT writes every raw sample, the settings and the machine (guest kernel, CPU
flags, QEMU version, gcm(aes) drivers).  Exit status: 0 done (whether the targets are
met or not), 1 the run failed (no result, a failed workload, or a kernel log problem:
panic, oops, BUG, WARNING, lockdep), 2 usage or missing tools.  Run as root; one VM at a
time on a shared machine.  Duration (2026-12-06, the machine otherwise idle): a full run
of 3 rounds took 10 minutes, most of it the FUSE guard points' tree workloads (25 s a
round under the realistic policy); the default 5 rounds about 15.  --only
seq-write,seq-read,untar,ls-lR,rm-rf skips fio; --targets kernel measures native and
takakryptfs only (3 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
sys.path.insert(0, str(TREE / "tests"))
sys.path.insert(0, str(HERE))

import kernel_guest as kg  # noqa: E402
import vmharness as vm  # noqa: E402


def qemu_version() -> str:
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                           text=True, timeout=30)
        return r.stdout.splitlines()[0].strip() if r.stdout else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def build_module(kdir: Path, kbuild: str) -> Path:
    r = subprocess.run(["make", "-C", str(kdir), f"KDIR={kbuild}"], capture_output=True,
                       text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"kernel_vm: make -C {kdir} KDIR={kbuild} failed:\n"
                         f"{r.stderr[-3000:]}")
    return kdir / "takakryptfs.ko"


def vm_module(prog: str) -> Path | None:
    """takakryptfs built for the VM's 6.1 kernel (whose headers must be installed), or
    None after saying on stderr what this machine lacks to boot it (exit 2 then)."""
    missing = vm.missing(systemd=False, series="6.1.")
    vmlinuz = vm.kernel("6.1.")
    kbuild = vm.headers_for(vmlinuz) if vmlinuz else None
    if missing or not kbuild:
        print(f"{prog}: cannot boot a VM here: missing "
              + ", ".join(missing or ["linux-headers for " + str(vmlinuz)]), file=sys.stderr)
        return None
    return build_module(TREE / "kernel", kbuild)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kernel_vm.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        usage=__doc__.split("\n\n")[1].removeprefix("usage: ") if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="smaller: 32 MiB, a 300-file tree, no fio")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (at least 3; default 5)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured rounds first (default 1: TCG translates code on first "
                         "use; the first round ran several times slower)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the raw results here")
    ap.add_argument("--ko", type=Path, help="a built takakryptfs.ko (default: build kernel/)")
    ap.add_argument("--only", default="", help="only these workloads (comma-separated)")
    ap.add_argument("--targets", default="",
                    help="only these targets (comma-separated; native is always measured): "
                         + ", ".join(kg.TARGETS))
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="the VM's output directory (default: a temporary one, kept)")
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds before the VM is given up (default: 900 quick, 2400 full)")
    a = ap.parse_args(argv)
    if a.rounds < 3:
        ap.error("--rounds must be at least 3 (medians of interleaved rounds)")
    missing = vm.missing(systemd=False, series="6.1.")
    vmlinuz = vm.kernel("6.1.")
    kbuild = vm.headers_for(vmlinuz) if vmlinuz else None
    if vmlinuz and not kbuild and not a.ko:
        missing.append(f"linux-headers-{vm.kernel_release(vmlinuz)}")
    if missing:
        print("kernel_vm: cannot boot a VM here: missing " + ", ".join(missing),
              file=sys.stderr)
        return 2
    ko = a.ko.resolve() if a.ko else build_module(TREE / "kernel", kbuild)
    out = a.keep or Path(tempfile.mkdtemp(prefix="kbench-"))
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    (out / "result.json").unlink(missing_ok=True)
    qemu = qemu_version()
    cmd = (f"{sys.executable} {HERE / 'kernel_guest.py'} {out} --rounds {a.rounds} --warmup {a.warmup}"
           + (" --quick" if a.quick else "") + (f" --only {a.only}" if a.only else "")
           + (f" --targets {a.targets}" if a.targets else ""))
    print(f"kernel_vm: booting {vm.kernel_release(vmlinuz)} under TCG ({qemu}); "
          f"guest output: {out / 'guest.log'}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    run = vm.run_guest(out, cmd, timeout=a.timeout or (900 if a.quick else 2400),
                       memory="2G", cpus=2, env={
                           "TAKAKRYPT_KO": str(ko), "PYTHONDONTWRITEBYTECODE": "1",
                           "TAKAKRYPT_QEMU_VERSION": qemu,
                           "PYTHONPATH": f"{TREE / 'src'}:{TREE / 'tests'}",
                           "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:"
                                   "/sbin:/bin"})
    wall = time.monotonic() - t0
    res = out / "result.json"
    if not res.exists():
        print(f"kernel_vm: the guest wrote no result ({wall:.0f} s)\n{run.tail()}",
              file=sys.stderr)
        return 1
    doc = json.loads(res.read_text())
    doc["host"] = {"vm_seconds": wall, "vmlinuz": vmlinuz, "module": str(ko),
                   "kernel_log_problems": run.problems, "output_dir": str(out)}
    errs = kg.validate(doc)
    print(f"takakryptfs benchmark in a VM: guest {doc['machine']['kernel']} under "
          f"{doc['machine']['accelerator']}, {qemu}; {doc['rounds']} rounds "
          f"interleaved, order rotated; lower: {doc['machine']['lower']}.\n"
          f"Ratios measure CPU cost of each layer on an emulated CPU, not device speed.\n"
          f"kernel = takakryptfs deciding by takakryptd under the realistic policy; fuse = "
          f"takakryptd's FUSE guard point under the same policy; fuse-allow-all = the FUSE "
          f"guard point, allow-all.\n")
    print(kg.table(doc))
    print(f"\nVM wall time {wall:.0f} s (guest {doc.get('guest_seconds', 0):.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1))
        print(f"raw samples: {a.json}")
    bad = 0
    if not doc.get("complete"):
        print(f"INCOMPLETE: the guest did not finish (exit status {run.rc}); the table holds "
              "the rounds it completed\n" + run.tail(1500), file=sys.stderr)
        bad = 1
    elif run.rc != 0:
        print(f"the guest command exited with {run.rc}\n" + run.tail(1500), file=sys.stderr)
        bad = 1
    if errs:
        print("result document invalid: " + "; ".join(errs), file=sys.stderr)
        bad = 1
    if doc["failures"]:
        print("failed workloads: " + json.dumps(doc["failures"]), file=sys.stderr)
        bad = 1
    if run.problems:
        print("the guest kernel reported:\n" + "\n".join(run.problems[:40]), file=sys.stderr)
        bad = 1
    return bad


if __name__ == "__main__":
    sys.exit(main())
