"""Where an untar's time goes on takakryptfs: tar's own calls against the final sync.

usage: python benchmarks/untar_split_vm.py [--rounds N] [--files N] [--keep DIR]

Boots /boot's newest 6.1 kernel once under QEMU (TCG) as benchmarks/kernel_vm.py does,
with takakryptfs built from kernel/ and takakryptd serving its key, ext4 on a brd RAM
disk below every target.  Each round untars the same generated tree (`takakrypt bench`'s
tree, 2,000 files by default) into native ext4, into a takakryptfs mount with
`decide=none` (no policy: the data path alone) and into one with `decide=agent` under
the realistic policy of benchmarks/kernel_vm.py (tar, rm and this python by path and
SHA-256 get plaintext, the rest is denied: every access a decision of takakryptd or of
the module's cache), timing `tar -x` and the `sync` after it apart, then removes it
(order rotated per round, caches dropped in between).  Prints the medians and each
target's extra time per file over native: what tar's system calls cost through the
module (and its decisions), and what write-back (the block seal, the header tag, the
lower write) costs.  Exit status 0 done, 1 the run failed, 2 missing tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
sys.path[:0] = [str(TREE / "src"), str(TREE / "tests"), str(HERE)]


def guest(out: Path, rounds: int, files: int) -> None:
    import kernel_guest as kg
    from agent_helpers import Daemon, base_config
    from takakrypt.bench.workloads import make_tree_tar

    kg._sh("insmod", os.environ["TAKAKRYPT_KO"])
    base = Path("/tmp/untar-split")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    ext = base / "ext"
    ext.mkdir()
    kg._sh("modprobe", "brd", "rd_nr=1", f"rd_size={768 * 1024}")
    kg._sh("mkfs.ext4", "-q", "-F", "/dev/ram0")
    kg._sh("mount", "/dev/ram0", str(ext))
    native, lower, mnt = ext / "native", ext / "klower", base / "kmnt"
    plower, pmnt = ext / "plower", base / "pmnt"
    fback, fmnt = ext / "fuse.back", base / "fmnt"
    for d in (native, lower, mnt, plower, pmnt, fback, fmnt):
        d.mkdir()
    cfg = base_config(base)
    cfg["agent"]["log_level"] = "warning"
    cfg.pop("audit", None)
    # gp 1 names the key both kernel mounts ask takakryptd for, and the policy the
    # decide=agent one is decided by (kernel_vm.py's realistic policy)
    kg.use_realistic_policy(cfg, {n: shutil.which(n) or f"/usr/bin/{n}" for n in ("tar", "rm")}
                            | {"python": os.path.realpath(sys.executable)})
    cfg["guard_points"] = [{"path": str(fmnt), "backing": str(fback), "policy": "bench",
                            "key": "k1"}]
    tar = base / "tree.tar"
    make_tree_tar(tar, files)
    agent = Daemon(base, cfg)
    agent.notify.settimeout(600)
    times: dict[str, dict[str, list[float]]] = {
        t: {"tar": [], "sync": []} for t in ("native", "kernel", "kernel-policy")}
    try:
        agent.wait_for("READY=1", timeout=600)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "agent registered" not in kg._sh("dmesg"):
            time.sleep(0.2)
        kg._mount(str(lower), str(mnt), "takakryptfs", "key=k1,gp=1,decide=none")
        kg._mount(str(plower), str(pmnt), "takakryptfs", kg.KERNEL_MOUNT)
        targets = [("native", native), ("kernel", mnt), ("kernel-policy", pmnt)]
        for r in range(rounds + 1):            # round 0 warms TCG's translation up
            k = r % len(targets)
            for name, d in targets[k:] + targets[:k]:
                t0 = time.monotonic()
                subprocess.run(["tar", "-C", str(d), "-xf", str(tar)], check=True)
                t1 = time.monotonic()
                os.sync()
                t2 = time.monotonic()
                subprocess.run(["rm", "-rf", str(d / "tree")], check=True)
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                if r:
                    times[name]["tar"].append(t1 - t0)
                    times[name]["sync"].append(t2 - t1)
                print(f"round {r}{' (warm-up)' if not r else ''} {name}: tar {t1 - t0:.2f} s, "
                      f"sync {t2 - t1:.2f} s", flush=True)
        kg._umount(str(mnt))
        kg._umount(str(pmnt))
    finally:
        agent.stop()
        kg._sh("umount", str(ext), check=False)
    (out / "result.json").write_text(json.dumps({"files": files, "rounds": rounds,
                                                 "times": times}, indent=1))


def report(doc: dict) -> str:
    med = {t: {p: statistics.median(v) for p, v in ps.items()}
           for t, ps in doc["times"].items()}
    n = doc["files"]
    lines = [f"untar of {n} files, medians of {doc['rounds']} rounds (TCG, RAM disk):",
             f"{'target':13s} {'tar (s)':>8s} {'sync (s)':>9s} {'total':>7s} {'x native':>9s}"]
    nat = med["native"]["tar"] + med["native"]["sync"]
    for t, m in med.items():
        tot = m["tar"] + m["sync"]
        lines.append(f"{t:13s} {m['tar']:8.2f} {m['sync']:9.2f} {tot:7.2f} {tot / nat:8.2f}x")
    nv = med["native"]
    for t in med:
        if t != "native":
            k = med[t]
            lines.append(f"{t} over native per file: tar {(k['tar'] - nv['tar']) / n * 1e3:.2f} "
                         f"ms, sync (write-back) {(k['sync'] - nv['sync']) / n * 1e3:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="untar_split_vm.py", description=__doc__.split("\n\n")[2])
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (default 6)")
    ap.add_argument("--files", type=int, default=2000, help="files in the tree (default 2000)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="the VM's output directory")
    ap.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.guest:
        guest(a.guest, a.rounds, a.files)
        return 0
    import tempfile

    import vmharness as vm
    from kernel_vm import vm_module

    ko = vm_module("untar_split_vm")
    if ko is None:
        return 2
    out = a.keep or Path(tempfile.mkdtemp(prefix="untar-split-"))
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    (out / "result.json").unlink(missing_ok=True)
    run = vm.run_guest(out, f"{sys.executable} {Path(__file__).resolve()} --guest {out} "
                       f"--rounds {a.rounds} --files {a.files}", timeout=1800, memory="2G",
                       env={"TAKAKRYPT_KO": str(ko),
                            "PYTHONPATH": f"{TREE / 'src'}:{TREE / 'tests'}",
                            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"})
    result = out / "result.json"
    if run.rc != 0 or not result.exists() or run.problems:
        print(f"untar_split_vm: the run failed\n{run.tail()}\n" + "\n".join(run.problems),
              file=sys.stderr)
        return 1
    print(report(json.loads(result.read_text())))
    print(f"raw samples: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
