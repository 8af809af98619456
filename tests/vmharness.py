"""Boot Debian's kernel under QEMU (TCG) with virtme-ng and run a command in it.

The guest sees this machine's root file system (read-only, /tmp its own), so it runs
this tree with this interpreter; directories passed as ``rwdir`` are shared read-write
and carry results back.  Two ways to boot:

- :func:`boot_guests`: systemd as PID 1 (``--systemd``), scripts that each write
  ``OUT/result.json`` (tests/test_systemd_unit.py, test_restart_systemd.py,
  test_pg_debian.py, through the ``systemd_guest`` fixture of tests/conftest.py);
- :func:`run_guest`: virtme-ng's own init (faster: no systemd), any shell command; the
  guest's kernel log is saved as ``OUT/dmesg.txt`` at the end and, with the console
  (``--verbose``: the kernel log as it happens, so a panic is seen even when the command
  never finishes), scanned by :func:`kernel_log_problems` (tests/test_kernel_vm.py).

`make test` installs the kernel, QEMU, busybox and virtme-ng (ci/deps.sh, Makefile);
:func:`missing` names what is absent so callers can skip with that reason.
"""

from __future__ import annotations

import compileall
import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent


def _version_key(path: str) -> list:
    return [(0, int(x), "") if x.isdigit() else (1, 0, x)
            for x in path.replace("-", ".").split(".")]


def kernel(series: str = "") -> str | None:
    """The newest /boot/vmlinuz-SERIES* (Debian's linux-image-amd64 brings one)."""
    found = sorted(glob.glob(f"/boot/vmlinuz-{series}*"), key=_version_key)
    return found[-1] if found else None


def kernel_release(vmlinuz: str) -> str:
    """``6.1.0-57-amd64`` of ``/boot/vmlinuz-6.1.0-57-amd64``."""
    return os.path.basename(vmlinuz).removeprefix("vmlinuz-")


def headers_for(vmlinuz: str) -> str | None:
    """The kbuild directory matching a /boot kernel (linux-headers-RELEASE), or None."""
    rel = kernel_release(vmlinuz)
    for d in (f"/lib/modules/{rel}/build", f"/usr/src/linux-headers-{rel}"):
        if os.path.exists(os.path.join(d, "Makefile")):
            return d
    return None


def vng() -> str | None:
    for cand in (os.environ.get("TAKAKRYPT_VNG"), str(Path(sys.executable).parent / "vng"),
                 shutil.which("vng")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def missing(*, systemd: bool = True, series: str = "") -> list[str]:
    """What this machine lacks to boot a guest ([] when nothing)."""
    out = []
    if os.geteuid() != 0:
        out.append("root")
    if not kernel(series):
        out.append(f"a kernel /boot/vmlinuz-{series}* (Debian: linux-image-amd64)")
    if not shutil.which("qemu-system-x86_64"):
        out.append("qemu-system-x86_64 (Debian: qemu-system-x86)")
    if not shutil.which("busybox"):
        out.append("busybox (Debian: busybox-static)")
    if not vng():
        out.append("vng (PyPI: virtme-ng, next to the interpreter or on PATH)")
    if systemd and not os.path.exists("/lib/systemd/systemd"):
        out.append("systemd")
    return out


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(vng()).parent}:{os.environ.get('PATH', '')}")


def compile_tree() -> None:
    """Write the tree's bytecode before a boot.  The guest runs this interpreter over 9p
    and never writes bytecode itself; where PYTHONDONTWRITEBYTECODE is set (as on the CI
    machines) nothing else writes it either, and every Python process in the guest
    compiled each takakrypt module it imported again: seconds per process under TCG."""
    for d in ("src", "tests"):
        compileall.compile_dir(str(TREE / d), quiet=2, workers=0)


#: seconds a systemd boot takes on top of its scripts (to the getty, and the power-off)
BOOT_SLACK = 300


def boot_guests(runs: list[tuple[Path, Path, float]], memory: str = "1G") -> list[Path]:
    """One boot with systemd as PID 1 for several guest scripts: ``SCRIPT TREE OUT`` of
    each ``(script, out, timeout)`` in turn, each ended after its own timeout (a hung
    one costs its own time, and the next still runs).  Under TCG a boot costs about a
    minute before the first script starts, so the systemd VM tests share one
    (tests/conftest.py, ``systemd_guest``).  Returns the ``out`` directories, in order;
    each gets the boot's console log (:func:`result_of` reads a result)."""
    compile_tree()
    q = shlex.quote
    # the commands go in a file on the shared directory, not on the kernel command line
    # (vng passes --exec there, base64): x86 truncates it at 2,048 bytes, and three
    # scripts with CI's paths made 2,069 -- the guest then never started anything
    first = runs[0][1]
    steps = first / "guest-steps.sh"
    steps.write_text("".join(
        f"date +%s.%N >{q(str(out / 'guest-time'))}; "
        f"timeout -k 10 {int(t)} {q(sys.executable)} {q(str(script))} {q(str(TREE))} "
        f"{q(str(out))} >{q(str(out / 'guest.log'))} 2>&1; "
        f"date +%s.%N >>{q(str(out / 'guest-time'))}\n" for script, out, t in runs))
    guest_cmd = f"sh {q(str(steps))}"
    cmd = [vng(), "--run", kernel(), "--disable-kvm", "--memory", memory, "--systemd",
           *(f"--rwdir={out}" for _, out, _ in runs),
           # The host root carries /.dockerenv: systemd's generators then take the guest
           # for a container and ignore the kernel command line, so no getty is made for
           # ttyS0, which is where vng's --exec runs (its override of serial-getty@).
           # `container=` (empty) tells PID 1 it is in none, and PID 1 itself reads
           # systemd.unit=, which boots straight to that getty: sysinit and basic.target
           # (journald, udevd, /dev/log), nothing of this machine's multi-user.target.
           "--append", "container=",
           "--append", "systemd.unit=serial-getty@ttyS0.service",
           "--exec", guest_cmd]
    with open(first / "console.log", "wb") as log:
        for attempt in (1, 2):
            for _, out, _ in runs:
                (out / "guest.log").unlink(missing_ok=True)
            if _boot_once(cmd, first, log, sum(t for _, _, t in runs) + BOOT_SLACK):
                break
            log.write(f"\n[host] boot {attempt}: no script started within {START_LIMIT} s "
                      f"(the guest idle before systemd's first output); booting again\n"
                      .encode())
    for _, out, _ in runs[1:]:
        shutil.copy(first / "console.log", out / "console.log")
    return [out for _, out, _ in runs]


#: seconds a systemd boot may take to start the first script (about 1 minute); a guest
#: whose command never starts sits idle, QEMU's vCPUs halted (a truncated kernel command
#: line did that once), and is not waited for an hour
START_LIMIT = 300


def _boot_once(cmd: list[str], first: Path, log, timeout: float) -> bool:
    """Run one boot; False when it never started the first script (killed after
    START_LIMIT: a boot that hangs is retried once, not waited for an hour)."""
    proc = _start_vm(cmd, cwd=first, stdout=log)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            age = time.monotonic() - t0
            if age > START_LIMIT and not (first / "guest.log").exists():
                return False
            if age > timeout:
                log.write(b"\n[host] the VM did not finish in time\n")
                return True
            time.sleep(1)
        return True
    finally:
        _end_vm(proc)


_BUILD_LOCK = threading.Lock()


def build_module(kdir: Path, kbuild: str) -> subprocess.CompletedProcess:
    """``make -C KDIR KDIR=KBUILD``, one at a time: the kernel suite and the systemd boot
    build the same tree from two threads (tests/conftest.py), and two Kbuild runs in one
    directory race for its objects.  The second finds everything up to date."""
    with _BUILD_LOCK:
        return subprocess.run(["make", "-C", str(kdir), f"KDIR={kbuild}"],
                              capture_output=True, text=True, timeout=900)


#: the VMs running now (several at once under TAKAKRYPT_VM_EARLY=1: tests/conftest.py
#: then starts the kernel suite's boot and the systemd boot together, each in a thread)
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def _start_vm(cmd: list[str], cwd: Path, stdout) -> subprocess.Popen:
    """vng in a session of its own (QEMU and its helpers are killed as a group)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.STDOUT, cwd=cwd, env=_env(),
                            start_new_session=True)
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    return proc


def _end_vm(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with _RUNNING_LOCK:
        _RUNNING.discard(proc)


def kill_running_vms() -> None:
    """Kill every VM still running (a test session that ends early)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        _end_vm(proc)


def result_of(out: Path) -> dict:
    """What a guest script wrote to OUT/result.json; fails naming the console's and the
    script's output when it wrote none (it hung, crashed, or the boot failed)."""
    result = out / "result.json"
    assert result.exists(), ("the guest wrote no result; console tail:\n"
                             + _read(out / "console.log")[-4000:]
                             + "\nguest log:\n"
                             + (_read(out / "guest.log") or "<none>")[-8000:])
    return json.loads(result.read_text())


class GuestRun:
    """What :func:`run_guest` left: the command's exit status (None: it never reported
    one), its output, the kernel log and the problems found in it."""

    def __init__(self, out: Path, rc: int | None) -> None:
        self.out, self.rc = out, rc
        self.output = _read(out / "guest.log")
        self.console = _read(out / "console.log")
        self.dmesg = _read(out / "dmesg.txt")
        # the console holds the kernel log up to a panic; dmesg.txt all of it when the
        # guest got to the end: scan both, report each line once
        seen: dict[str, None] = {}
        for line in kernel_log_problems(self.dmesg) + kernel_log_problems(self.console):
            seen.setdefault(line)
        self.problems = list(seen)

    def tail(self, n: int = 4000) -> str:
        return (f"guest exit status {self.rc}\n--- guest output (tail) ---\n"
                f"{self.output[-n:]}\n--- console (tail) ---\n{self.console[-n:]}")


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def run_guest(out: Path, command: str, *, timeout: float = 900, memory: str = "2G",
              cpus: int = 2, series: str = "6.1.", env: dict[str, str] | None = None,
              cwd: Path | None = None) -> GuestRun:
    """Boot the newest /boot/vmlinuz-SERIES* (default 6.1.*) with virtme-ng's init (no systemd), run the
    shell ``command`` as root with ENV exported, then save the kernel log.  ``out`` is
    shared read-write; the command's output goes to OUT/guest.log, its exit status to
    OUT/rc."""
    out.mkdir(parents=True, exist_ok=True)
    compile_tree()
    for stale in ("rc", "dmesg.txt", "guest.log"):
        (out / stale).unlink(missing_ok=True)
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    q = shlex.quote
    script = (f"cd {q(str(cwd or out))}; "
              f"env {exports} sh -c {q(command)} >{q(str(out / 'guest.log'))} 2>&1; "
              f"echo $? >{q(str(out / 'rc'))}; "
              f"dmesg >{q(str(out / 'dmesg.txt'))} 2>&1")
    cmd = [vng(), "--run", kernel(series), "--disable-kvm", "--memory", memory,
           "--cpus", str(cpus), "--verbose", f"--rwdir={out}", "--exec", script]
    with open(out / "console.log", "wb") as log:
        proc = _start_vm(cmd, cwd=out, stdout=log)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n[host] the VM did not finish within {timeout:g} s\n".encode())
        finally:
            _end_vm(proc)
    rc_file = out / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.exists() and \
        rc_file.read_text().strip().isdigit() else None
    return GuestRun(out, rc)


# --- the guest's kernel log -------------------------------------------------------------
# Messages that mean the kernel misbehaved, whatever the tests said.  Matched against
# each line after its "[ seconds]" stamp (dmesg, console) and "<level>" prefix.
_PROBLEMS = [re.compile(p) for p in (
    r"Kernel panic",
    r"^BUG[: ]",                       # BUG: ..., and SLUB's "BUG cache (...): Objects remaining"
    r"kernel BUG at",
    r"Oops",
    r"^WARNING:",
    r"general protection fault",
    r"KASAN",
    r"UBSAN",
    r"possible circular locking",
    r"possible recursive locking",
    r"inconsistent lock state",
    r"^INFO: ",                        # lockdep, hung tasks, RCU stalls
    r"rcu_sched self-detected stall|rcu: INFO",
    r"kmemleak",
    r"Slab cache still has objects",
    r"Busy inodes after unmount",      # an inode reference outlived its super block
    r"Call Trace:",
)]
_STAMP = re.compile(r"^(<\d+>)?\s*\[\s*\d+\.\d+\]\s?")


def kernel_log_problems(text: str) -> list[str]:
    """The lines of a kernel log (dmesg or console) that report a panic, oops, BUG,
    WARNING, lockdep, KASAN/UBSAN, kmemleak or a stack dump; [] for a clean log."""
    found = []
    for line in text.splitlines():
        msg = _STAMP.sub("", line, count=1).strip()
        if any(p.search(msg) for p in _PROBLEMS):
            found.append(line.strip())
    return found
