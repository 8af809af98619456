"""The kernel benchmark inside the VM (issue 18, "Benchmark"); started by
benchmarks/kernel_vm.py, which boots Debian's 6.1 kernel under QEMU (TCG):

    python benchmarks/kernel_guest.py OUT [--quick] [--rounds N]

The lower file system is ext4 on a brd RAM disk: no device time, so the ratios measure
the CPU cost of each layer, which is all an emulated CPU can say anything about.  The
targets, measured interleaved (every round runs every workload group on every target,
the order of the targets rotated from round to round):

* ``native``: a directory of that ext4, the reference;
* ``kernel``: takakryptfs over another directory of it, deciding by takakryptd
  (``decide=agent``) under guard point ``fuse``'s realistic policy (gp 1: the same
  rules, the paths relative to each mount); the data key and every decision the
  module's cache does not hold come from takakryptd over generic netlink;
* ``fuse``: a FUSE guard point of takakryptd (``backing:`` a third directory) under the
  realistic policy of ``takakrypt bench`` (each workload program by path and SHA-256
  gets plaintext, everything else is denied);
* ``fuse-allow-all``: the same engine under an allow-all policy.

The workloads are ``takakrypt bench``'s groups (src/takakrypt/bench/workloads.py: the
workloads of ../shared/bench/peers.sh), sized for TCG.  Beside them: the kernel's
``gcm(aes)`` throughput through AF_ALG (the driver the kernel picked, whether the guest
CPU has AES-NI), to say how much of the encrypted targets' sequential time is the
cipher's.  Writes OUT/result.json (:func:`validate` names its schema).

The pure functions (statistics, ratios, the table) are imported by the host script and
by tests/test_bench_kernel_vm.py; nothing runs at import.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = "takakrypt-kernel-vm-bench/1"

#: the kernel target's mount options: decisions by takakryptd under gp 1's policy
KERNEL_MOUNT = "key=k1,gp=1,decide=agent"

#: target name -> (label, engine, policy); native first: the reference
TARGETS: dict[str, tuple[str, str, str]] = {
    "native": ("native ext4", "native", "none"),
    "kernel": ("takakryptfs (kernel)", "kernel", "realistic (programs by path+SHA-256)"),
    "fuse": ("FUSE guard point (policy)", "fuse", "realistic (programs by path+SHA-256)"),
    "fuse-allow-all": ("FUSE guard point (allow-all)", "fuse", "allow-all"),
}

#: workload -> (unit, higher_is_better); the order of the table
WORKLOADS: dict[str, tuple[str, bool]] = {
    "seq-write": ("MiB/s", True), "seq-read": ("MiB/s", True),
    "untar": ("s", False), "ls-lR": ("s", False), "rm-rf": ("s", False),
    "fio-randread": ("IOPS", True), "fio-randwrite": ("IOPS", True),
}

#: the issue's targets, as ratios to native in the same run: (kind, bound).
#: "time": target time / native time <= bound; "throughput": target / native >= bound
ISSUE_TARGETS: dict[str, tuple[str, float]] = {
    "untar": ("time", 1.5), "ls-lR": ("time", 1.5), "rm-rf": ("time", 1.5),
    "seq-read": ("throughput", 0.5), "seq-write": ("throughput", 0.5),
}


# --- pure functions (host and guest) ------------------------------------------------------
def summarize(values: list[float]) -> dict[str, Any]:
    """median, min, max of the samples (kept as measured, in round order)."""
    if not values:
        raise ValueError("no samples")
    return {"values": list(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def ratio(target: float, native: float, higher_is_better: bool) -> float | None:
    """The issue's ratio to native: for a throughput, target/native (>= 0.5 wanted); for
    a time, target/native too (<= 1.5 wanted): both read "how many natives"."""
    if native <= 0 or target <= 0:
        return None
    return target / native


def ratios(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """workload -> target -> {median, min, max, per_round}: the ratio of the target's
    median to native's median, and the spread of the per-round ratios (round r's figure
    against native's round r figure: the rounds are interleaved, so a slow patch of the
    machine falls on both)."""
    out: dict[str, dict[str, Any]] = {}
    for w, by_target in samples.items():
        nat = by_target.get("native")
        if not nat:
            continue
        hib = WORKLOADS.get(w, ("", True))[1]
        for t, vals in by_target.items():
            if t == "native" or not vals:
                continue
            med = ratio(statistics.median(vals), statistics.median(nat), hib)
            per = [r for r in (ratio(a, b, hib) for a, b in zip(vals, nat)) if r is not None]
            out.setdefault(w, {})[t] = {"median": med, "min": min(per) if per else None,
                                        "max": max(per) if per else None, "per_round": per}
    return out


def meets(workload: str, r: float | None) -> bool | None:
    """Whether a ratio meets the issue's target (None: no target for this workload)."""
    if workload not in ISSUE_TARGETS or r is None:
        return None
    kind, bound = ISSUE_TARGETS[workload]
    return r <= bound if kind == "time" else r >= bound


def target_text(workload: str) -> str:
    if workload not in ISSUE_TARGETS:
        return "-"
    kind, bound = ISSUE_TARGETS[workload]
    return f"<= {bound:g}x" if kind == "time" else f">= {bound:g}x"


def cipher_share(workload_mibps: float, cipher_mibps: float) -> float | None:
    """The fraction of a sequential workload's time the cipher alone needs: moving B
    bytes at W MiB/s takes B/W; encrypting them at C MiB/s takes B/C; share = W/C."""
    if workload_mibps <= 0 or cipher_mibps <= 0:
        return None
    return workload_mibps / cipher_mibps


def cipher_bound(native_mibps: float, cipher_mibps: float) -> float | None:
    """The best throughput ratio a layer can reach when it only adds the cipher's time to
    native's, serially: 1 / (1 + native/cipher)."""
    if native_mibps <= 0 or cipher_mibps <= 0:
        return None
    return 1.0 / (1.0 + native_mibps / cipher_mibps)


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v:.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table(doc: dict[str, Any]) -> str:
    """The results as text: one row per (workload, target) with median, min-max, the
    ratio to native (median, and min-max of the per-round ratios) and the issue's target;
    then the cipher's figures."""
    samples = doc["samples"]
    rat = ratios(samples)
    rows = [("workload", "target", "median", "min-max", "unit", "x native", "per-round",
             "issue target", "meets")]
    for w, (unit, _) in WORKLOADS.items():
        if w not in samples:
            continue
        for t in TARGETS:
            vals = samples[w].get(t)
            if not vals:
                err = doc.get("failures", {}).get(t, {}).get(w)
                if err:
                    rows.append((w, t, "failed", err[:60], "", "", "", "", ""))
                continue
            s = summarize(vals)
            r = rat.get(w, {}).get(t)
            m = meets(w, r["median"]) if r and t != "native" else None
            rows.append((w, t, _fmt(s["median"], unit),
                         f"{_fmt(s['min'], unit)}-{_fmt(s['max'], unit)}", unit,
                         "1.00" if t == "native" else (_fmt(r["median"]) if r else "-"),
                         "" if t == "native" or not r or r["min"] is None
                         else f"{r['min']:.2f}-{r['max']:.2f}",
                         "" if t == "native" else target_text(w),
                         "" if m is None else ("yes" if m else "NO")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = ["\n".join(lines)]
    c = doc.get("cipher") or {}
    if c.get("bulk_mibps"):
        out.append("")
        out.append(f"gcm(aes) in the guest kernel: driver {c.get('driver') or '?'}; guest CPU "
                   f"AES-NI: {'yes' if doc.get('machine', {}).get('aes_ni') else 'no'}")
        for k, label in (("bulk_mibps", f"{c.get('bulk_block', 0) // 1024} KiB requests"),
                         ("block_mibps", "4 KiB requests (a stored block's, plus one "
                                         "AF_ALG round trip each)")):
            if c.get(k):
                out.append(f"  encrypt {c[k]['encrypt']:.1f} MiB/s, decrypt "
                           f"{c[k]['decrypt']:.1f} MiB/s  ({label})")
        for w, op in (("seq-write", "encrypt"), ("seq-read", "decrypt")):
            nat = samples.get(w, {}).get("native")
            if not nat:
                continue
            cmib = c["bulk_mibps"][op]
            b = cipher_bound(statistics.median(nat), cmib)
            parts = [f"  {w}: native {statistics.median(nat):.1f} MiB/s; a layer that only "
                     f"adds the {op} time reaches at most {b:.2f}x native" if b else ""]
            for t in ("kernel", "fuse", "fuse-allow-all"):
                vals = samples.get(w, {}).get(t)
                if vals:
                    sh = cipher_share(statistics.median(vals), cmib)
                    parts.append(f"    {t}: the cipher alone is {sh * 100:.0f} % of its time"
                                 + ("" if t == "kernel" else " (a proxy: the FUSE engine "
                                    "runs its own AES in user space)"))
            out.append("\n".join(p for p in parts if p))
    d = doc.get("decisions")
    if d:
        med = d["median_opens_per_s"]
        out.append("")
        out.append(f"decision cache (kernel, realistic policy): open+read+close of a 4 KiB "
                   f"file, {d['opens']} by one process: native {med['native']:.0f}/s, "
                   f"kernel {med['kernel']:.0f}/s = {d['x_native']:.2f}x native")
        for what in ("untar", "ls_lR"):
            c = d[what]
            ratio = "-" if c["hit_ratio"] is None else f"{c['hit_ratio'] * 100:.1f} %"
            out.append(f"  {what.replace('_', ' -')}: {c['hits']} hits, {c['misses']} misses "
                       f"(hit ratio {ratio}), {c['agent_requests']} requests to the agent")
    return "\n".join(out)


def validate(doc: dict[str, Any]) -> list[str]:
    """What is wrong with a result document ([] when nothing): the schema the host
    script and --json consumers rely on."""
    errs = []
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema is {doc.get('schema')!r}, not {SCHEMA!r}")
    for key, typ in (("machine", dict), ("settings", dict), ("targets", dict),
                     ("samples", dict), ("failures", dict), ("cipher", dict),
                     ("rounds", int)):
        if not isinstance(doc.get(key), typ):
            errs.append(f"{key} missing or not a {typ.__name__}")
    if errs:
        return errs
    for w, by_t in doc["samples"].items():
        if w not in WORKLOADS:
            errs.append(f"samples: unknown workload {w!r}")
            continue
        for t, vals in by_t.items():
            if t not in TARGETS:
                errs.append(f"samples.{w}: unknown target {t!r}")
            elif not (isinstance(vals, list) and all(isinstance(v, (int, float)) and v > 0
                                                      for v in vals)):
                errs.append(f"samples.{w}.{t}: not a list of positive numbers")
            elif len(vals) > doc["rounds"]:
                errs.append(f"samples.{w}.{t}: {len(vals)} samples for {doc['rounds']} rounds")
    if not isinstance(doc.get("complete"), bool):
        errs.append("complete missing or not a bool")
    for k in ("kernel", "cpu_flags", "aes_ni"):
        if k not in doc["machine"]:
            errs.append(f"machine.{k} missing")
    return errs


# --- guest side ---------------------------------------------------------------------------
def _sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gcm_drivers() -> list[dict[str, Any]]:
    """/proc/crypto's gcm(aes) implementations, highest priority (the one used) first."""
    out, cur = [], {}
    with open("/proc/crypto") as f:
        for line in f.read().split("\n") + [""]:
            if not line.strip():
                if cur.get("name") == "gcm(aes)":
                    out.append({"driver": cur.get("driver"), "module": cur.get("module"),
                                "priority": int(cur.get("priority", 0)),
                                "selftest": cur.get("selftest")})
                cur = {}
                continue
            k, _, v = line.partition(":")
            cur[k.strip()] = v.strip()
    return sorted(out, key=lambda d: -d["priority"])


def machine_info() -> dict[str, Any]:
    flags: list[str] = []
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
            elif line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {"kernel": platform.release(), "kernel_version": platform.version(),
            "cpu_model": model, "cpus": os.cpu_count(), "memory_bytes": mem,
            "cpu_flags": flags, "aes_ni": "aes" in flags, "pclmulqdq": "pclmulqdq" in flags,
            "qemu": os.environ.get("TAKAKRYPT_QEMU_VERSION", "unknown"),
            "accelerator": "TCG (emulated CPU, no KVM)",
            "lower": "ext4 on a brd RAM disk (/dev/ram0): no device time"}


# AF_ALG: the kernel's gcm(aes), as takakryptfs calls it (one request per 4 KiB block)
SOL_ALG = 279
BULK = 64 * 1024


def afalg_gcm(block: int, seconds: float, aad_len: int = 72) -> dict[str, float]:
    """MiB/s of the kernel's gcm(aes) (256-bit key, 16-byte tag) encrypting and
    decrypting ``block``-byte requests through an AF_ALG socket for ``seconds`` each."""
    import signal

    def hung(*_):
        raise TimeoutError(f"AF_ALG gcm(aes) with {block}-byte requests did not answer")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(int(2 * seconds) + 30)
    try:
        return _afalg_gcm(block, seconds, aad_len)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _afalg_gcm(block: int, seconds: float, aad_len: int) -> dict[str, float]:
    # one sendmsg must fit the socket's send buffer (about 200 KiB): af_alg_sendmsg waits
    # for room that only a recv after it would make
    key = os.urandom(32)
    alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    try:
        alg.bind(("aead", "gcm(aes)"))
        alg.setsockopt(SOL_ALG, socket.ALG_SET_KEY, key)
        alg.setsockopt(SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
        op, _ = alg.accept()
        try:
            aad, plain, iv = os.urandom(aad_len), os.urandom(block), os.urandom(12)
            out: dict[str, float] = {}
            op.sendmsg_afalg([aad + plain], op=socket.ALG_OP_ENCRYPT, iv=iv, assoclen=aad_len)
            sealed = op.recv(aad_len + block + 16)
            for name, msg, want, mode in (
                    ("encrypt", aad + plain, aad_len + block + 16, socket.ALG_OP_ENCRYPT),
                    ("decrypt", sealed, aad_len + block, socket.ALG_OP_DECRYPT)):
                n, t0 = 0, time.perf_counter()
                while True:
                    op.sendmsg_afalg([msg], op=mode, iv=iv, assoclen=aad_len)
                    got = op.recv(want)
                    n += 1
                    el = time.perf_counter() - t0
                    if el >= seconds:
                        break
                if name == "decrypt" and got[aad_len:] != plain:
                    raise RuntimeError("AF_ALG gcm(aes) decrypt gave other bytes")
                out[name] = n * block / el / (1 << 20)
            return out
        finally:
            op.close()
    finally:
        alg.close()


_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str, dst: str, fstype: str, opts: str) -> None:
    if _libc.mount(src.encode(), dst.encode(), fstype.encode(), 0, opts.encode()):
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} -o {opts} {src} {dst}: {os.strerror(e)}")


def _umount(path: str) -> None:
    if _libc.umount2(path.encode(), 0):
        e = ctypes.get_errno()
        raise OSError(e, f"umount {path}: {os.strerror(e)}")


# ---- the module's decision cache (issue 19) --------------------------------------------

def module_status() -> dict[str, int]:
    """The module's counters: a STATUS_REQUEST from this process (any CAP_NET_ADMIN
    sender may ask; docs/protocol.md), decoded by the protocol's codec."""

    from takakrypt import protocol as P
    from takakrypt.agent import genl as G

    s = G.open_socket()
    try:
        s.settimeout(5)
        fid = G.resolve_family(s)
        if fid is None:
            raise RuntimeError("takakryptfs is not loaded")
        s.send(G.build(fid, G.CMD_MSG, P.encode(P.request(P.StatusRequest(), 9)), seq=9))
        while True:
            for raw in G.split(s.recv(65536)):
                f = G.parse(raw, fid)
                if f.kind == "msg" and f.taka:
                    st = P.decode(f.taka).payload
                    return {k: getattr(st, k) for k in st.__struct_fields__}
                if f.kind == "error" and f.error:
                    raise OSError(-f.error, "STATUS_REQUEST")
    except socket.timeout:
        raise RuntimeError("the module did not answer STATUS_REQUEST") from None
    finally:
        s.close()


#: opens of one 4 KiB file by one process (a permitted program): the decision is asked
#: once, the other opens hit the module's cache
OPENS = 2000
_OPEN_LOOP = ("import sys, time\np = sys.argv[1]\nn = int(sys.argv[2])\n"
              "t0 = time.perf_counter()\nfor _ in range(n):\n    with open(p, 'rb') as f:\n"
              "        f.read()\nprint(time.perf_counter() - t0)")


def decision_bench(native: Path, kernel: Path, tar: Path, rounds: int) -> dict[str, Any]:
    """Cached open+read+close per second on the kernel mount (realistic policy) and on
    native, interleaved in the same run; the cache's hits and misses over one untar of
    the tree and one `ls -lR` of it."""
    py = os.path.realpath(sys.executable)
    data = os.urandom(4096)
    for d in (native, kernel):
        with open(d / "open.bin", "wb") as f:     # this process: python, permitted
            f.write(data)
    os.sync()
    per: dict[str, list[float]] = {"native": [], "kernel": []}
    for r in range(rounds):
        for name, d in (("native", native), ("kernel", kernel))[:: 1 if r % 2 == 0 else -1]:
            out = subprocess.run([py, "-S", "-c", _OPEN_LOOP, str(d / "open.bin"), str(OPENS)],
                                 capture_output=True, text=True, check=True)
            per[name].append(OPENS / float(out.stdout))
    s0 = module_status()
    subprocess.run(["tar", "-C", str(kernel), "-xf", str(tar)], check=True)
    os.sync()
    s1 = module_status()
    subprocess.run(["ls", "-lR", str(kernel / "tree")], check=True, capture_output=True)
    s2 = module_status()
    subprocess.run(["rm", "-rf", str(kernel / "tree")], check=True)
    for d in (native, kernel):
        (d / "open.bin").unlink()

    def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, Any]:
        hits, misses = b["cache_hits"] - a["cache_hits"], b["cache_misses"] - a["cache_misses"]
        return {"hits": hits, "misses": misses, "agent_requests":
                b["requests_sent"] - a["requests_sent"],
                "hit_ratio": hits / (hits + misses) if hits + misses else None}

    med = {k: statistics.median(v) for k, v in per.items()}
    return {"opens": OPENS, "opens_per_s": per, "median_opens_per_s": med,
            "x_native": med["kernel"] / med["native"] if med["native"] else None,
            "untar": delta(s0, s1), "ls_lR": delta(s1, s2), "status_after": s2}


def use_realistic_policy(cfg: dict[str, Any], programs: dict[str, str]) -> str:
    """Policy ``bench`` (the programs by path and SHA-256 get plaintext, the rest is
    denied) and its process sets into takakryptd's configuration cfg, as its only
    policy; returns the policy's YAML (recorded with the results)."""
    import yaml
    from takakrypt.bench.targets import realistic_policy

    policy_yaml = realistic_policy(programs)
    pol = yaml.safe_load(policy_yaml)
    cfg["process_sets"] = pol["process_sets"]
    cfg["policies"] = {"bench": pol["policies"]["bench"]}
    return policy_yaml


def sizes_for(quick: bool):
    """The workloads' sizes under TCG, and whether fio runs.  What sets them: the FUSE
    targets' small-file workloads cost 40-60 ms of emulated time a file (every file is
    a handful of FUSE round trips, once warm), so the tree has 2000 entries (300 quick)
    to keep a full run near 15 minutes; native does a round of it in a few seconds."""
    from takakrypt.bench.workloads import Sizes

    if quick:
        return Sizes(seq_mib=32, files=300, fio_mib=8, fio_seconds=1), False
    return Sizes(seq_mib=64, files=2000, fio_mib=8, fio_seconds=2), True


def run(out: Path, quick: bool, rounds: int, warmup: int,
        only: tuple[str, ...], chosen: tuple[str, ...] = ()) -> dict[str, Any]:
    from agent_helpers import Daemon, base_config
    from takakrypt.bench.targets import Target
    from takakrypt.bench.workloads import Context, Fio, Rounds, Sequential, Tree, rotated

    t_start = time.monotonic()
    info = machine_info()
    drivers = gcm_drivers()
    ko = os.environ["TAKAKRYPT_KO"]
    _sh("insmod", ko)
    info["gcm_drivers"] = gcm_drivers() or drivers  # insmod loads gcm if it is a module
    log(f"guest {info['kernel']}, {info['cpus']} CPUs, AES-NI {info['aes_ni']}, "
        f"gcm(aes) drivers {[d['driver'] for d in info['gcm_drivers']]}")

    base = Path("/tmp/kbench")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    ext = base / "ext"
    if not os.path.exists("/dev/ram0"):
        _sh("modprobe", "brd", "rd_nr=1", f"rd_size={768 * 1024}")
    _sh("mkfs.ext4", "-q", "-F", "/dev/ram0")
    ext.mkdir()
    _sh("mount", "/dev/ram0", str(ext))
    dirs = {"native": ext / "native", "kernel": ext / "klower", "fuse": ext / "fuse.back",
            "fuse-allow-all": ext / "fuse-aa.back"}
    for d in dirs.values():
        d.mkdir()
    mnts = {"native": dirs["native"], "kernel": base / "kmnt", "fuse": base / "fmnt",
            "fuse-allow-all": base / "fmnt-aa"}
    for t in ("kernel", "fuse", "fuse-allow-all"):
        mnts[t].mkdir()
    private = base / "private"
    private.mkdir(mode=0o711)

    secs = 1.0 if quick else 2.0
    # measured in every round, after its workloads (code translated, the machine in the
    # state the workloads saw), the median reported: a single measurement at the start
    # varied from 11 to 23 MiB/s between boots
    cipher: dict[str, Any] = {
        "driver": (info["gcm_drivers"] or [{}])[0].get("driver"), "key_bits": 256,
        "aad_bytes": 72, "method": "AF_ALG aead gcm(aes), one thread, one request per "
        "block, once per measured round (median); bulk requests amortize the system call",
        "bulk_block": BULK, "bulk_rounds": [], "bulk_mibps": None, "block_mibps": None}

    sizes, with_fio = sizes_for(quick)
    groups = [Sequential(sizes), Tree(sizes)]
    fio = Fio(sizes)
    ctx = Context(sizes=sizes, private=private, cold=True, directory=ext)
    skipped = {}
    why = fio.unavailable(ctx) or (None if with_fio else "not in a quick run")
    if why:
        skipped["fio"] = why
    else:
        groups.append(fio)
    if only:
        groups = [g for g in groups if any(w.name in only for w in g.workloads)]
    programs: dict[str, str] = {}
    for g in groups:
        programs.update(g.programs())
    programs["python"] = os.path.realpath(sys.executable)   # the decision benchmark's loop
    cfg = base_config(base)
    cfg["agent"]["log_level"] = "warning"   # no per-request log lines in the measured path
    cfg.pop("audit", None)
    policy_yaml = use_realistic_policy(cfg, programs)
    cfg["policies"]["allow"] = {"rules": [
        {"actions": ["all_ops"], "effects": ["permit", "apply_key"]}]}
    # ids are 1-based positions: the kernel mount decides by gp 1's policy (realistic)
    cfg["guard_points"] = [
        {"path": str(mnts["fuse"]), "backing": str(dirs["fuse"]), "policy": "bench",
         "key": "k1"},
        {"path": str(mnts["fuse-allow-all"]), "backing": str(dirs["fuse-allow-all"]),
         "policy": "allow", "key": "k1"}]
    log("starting takakryptd")
    agent = Daemon(base, cfg)
    agent.notify.settimeout(600)
    kmounted = False
    doc: dict[str, Any] = {}
    decisions: dict[str, Any] | None = None
    try:
        for g in groups:        # while takakryptd starts (a minute or more under TCG)
            g.prepare(ctx)
        agent.wait_for("READY=1", timeout=600)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "agent registered" not in _sh("dmesg"):
            time.sleep(0.2)
        _mount(str(dirs["kernel"]), str(mnts["kernel"]), "takakryptfs", KERNEL_MOUNT)
        kmounted = True
        log(f"targets up after {time.monotonic() - t_start:.0f} s")
        targets = [Target(n, TARGETS[n][0], mnts[n], dirs[n], TARGETS[n][1], TARGETS[n][2])
                   for n in TARGETS if n == "native" or not chosen or n in chosen]
        samples: dict[str, dict[str, list[float]]] = {}
        warm: dict[str, dict[str, list[float]]] = {}
        runner = Rounds(ctx)
        failures = runner.failed     # target -> group and its workloads -> error
        orders: list[list[str]] = []

        def document(complete: bool) -> dict[str, Any]:
            return {
                "schema": SCHEMA, "complete": complete, "machine": info, "rounds": rounds,
                "warmup_rounds": warmup,
                "settings": {"quick": quick, "seq_mib": sizes.seq_mib, "files": sizes.files,
                             "tree_entries": next((g.entries for g in groups
                                                   if isinstance(g, Tree)), None),
                             "fio_mib": sizes.fio_mib, "fio_seconds": sizes.fio_seconds,
                             "fio_jobs": 2, "orders": orders, "skipped": skipped,
                             "kernel_mount": KERNEL_MOUNT, "policy_yaml": policy_yaml},
                "targets": {t.name: {"label": TARGETS[t.name][0], "engine": TARGETS[t.name][1],
                                     "policy": TARGETS[t.name][2]} for t in targets},
                "samples": samples, "warmup_samples": warm, "failures": failures,
                "cipher": cipher, "guest_seconds": time.monotonic() - t_start}

        # warm-up rounds first (TCG translates code on first use: a first round ran
        # several times slower, FUSE untar up to 10x), recorded apart, not in the figures
        for r in range(warmup + rounds):
            measured = r >= warmup
            name = f"round {r - warmup + 1}" if measured else f"warm-up {r + 1}"
            order = rotated(targets, r)
            if measured:
                orders.append([t.name for t in order])
            for g in groups:
                for t in order:
                    if g.name in failures.get(t.name, {}):
                        continue
                    t0 = time.monotonic()
                    got = runner.run(g, t)
                    if got is None:
                        e = failures[t.name][g.name]
                        for w in g.workloads:
                            failures[t.name][w.name] = e
                        log(f"{name} {g.name} on {t.name}: FAILED {e}")
                        continue
                    for w, v in got.items():
                        (samples if measured else warm).setdefault(w, {}).setdefault(
                            t.name, []).append(v)
                    log(f"{name} {g.name} on {t.name}: "
                        + ", ".join(f"{w} {v:.2f}" for w, v in got.items())
                        + f" ({time.monotonic() - t0:.0f} s)")
            if measured:
                cipher["bulk_rounds"].append(afalg_gcm(BULK, secs))
                cipher["bulk_mibps"] = {op: statistics.median(c[op] for c in cipher["bulk_rounds"])
                                        for op in ("encrypt", "decrypt")}
                log(f"{name} cipher: {cipher['bulk_rounds'][-1]} MiB/s ({BULK} B requests)")
            # what is measured so far survives a VM that is given up later
            (out / "result.json").write_text(json.dumps(document(False), indent=1))
        cipher["block_mibps"] = afalg_gcm(4096, secs)
        runner.teardown(groups, targets)
        tree = next((g for g in groups if isinstance(g, Tree)), None)
        if tree is not None and tree.tar is not None and any(t.name == "kernel"
                                                             for t in targets):
            log("decision cache: cached opens, and hits during an untar and ls -lR")
            decisions = decision_bench(dirs["native"], mnts["kernel"], tree.tar, rounds)
            log(f"decision cache: {decisions['median_opens_per_s']} opens/s, untar "
                f"{decisions['untar']}, ls -lR {decisions['ls_lR']}")
        doc = document(True)
        if decisions is not None:
            doc["decisions"] = decisions
    finally:
        if kmounted:
            with contextlib.suppress(OSError):
                _umount(str(mnts["kernel"]))
        agent.stop()
        _sh("umount", str(ext), check=False)
        shutil.copy(base / "takakryptd.log", out / "takakryptd.log")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--targets", default="", help="comma-separated targets (native always)")
    a = ap.parse_args(argv)
    only = tuple(w for w in a.only.split(",") if w)
    chosen = tuple(t for t in a.targets.split(",") if t)
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}: choose from {list(TARGETS)}")
    doc = run(a.out, a.quick, a.rounds, a.warmup, only, chosen)
    errs = validate(doc)
    if errs:
        log("result document invalid: " + "; ".join(errs))
    (a.out / "result.json").write_text(json.dumps(doc, indent=1))
    print(table(doc), flush=True)
    return 0 if not errs else 1


if __name__ == "__main__":
    sys.exit(main())
