"""What a benchmark ran on: CPU, cores, memory, kernel, the file system of the directory,
the takakrypt version and commit, and the versions of the workload programs."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__

#: the source tree this package runs from, if it is one (a checkout, not an install)
SOURCE_TREE = Path(__file__).resolve().parents[3]


def in_source_tree() -> bool:
    return (SOURCE_TREE / "pyproject.toml").is_file() and (SOURCE_TREE / "benchmarks").is_dir()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform says, or 'unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def filesystem_of(path: str) -> dict[str, str]:
    """Mount point, type, source and options of the file system holding ``path``
    (the deepest mount in /proc/self/mountinfo that contains it)."""
    real = os.path.realpath(path)
    best: dict[str, str] = {"mountpoint": "/", "type": "unknown", "source": "", "options": ""}
    best_len = -1
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.rstrip("\n").partition(" - ")
                fields = left.split(" ")
                mp = _unescape(fields[4])
                inside = real == mp or real.startswith(mp.rstrip("/") + "/")
                if inside and len(mp) >= best_len:
                    rf = right.split(" ")
                    best = {"mountpoint": mp, "type": rf[0], "source": rf[1] if len(rf) > 1
                            else "", "options": fields[5]}
                    best_len = len(mp)
    except OSError:
        pass
    return best


def _git_commit() -> str | None:
    if not (SOURCE_TREE / ".git").exists() or not shutil.which("git"):
        return None
    try:
        r = subprocess.run(["git", "-C", str(SOURCE_TREE), "describe", "--always", "--dirty",
                            "--abbrev=12"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]) and not os.path.isabs(cmd[0]):
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out and r.returncode == 0 else None


def info(directory: str, pg_bin: str | None = None) -> dict[str, Any]:
    u = os.uname()
    tools = {"fio": _version(["fio", "--version"]), "tar": _version(["tar", "--version"]),
             "dd": _version(["dd", "--version"])}
    if pg_bin:
        tools["postgres"] = _version([os.path.join(pg_bin, "postgres"), "--version"])
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _mem_total(),
        "kernel": f"{u.sysname} {u.release}",
        "kernel_version": u.version,
        "arch": u.machine,
        "python": platform.python_version(),
        "takakrypt_version": __version__,
        "takakrypt_commit": _git_commit(),
        "directory": os.path.realpath(directory),
        "filesystem": filesystem_of(directory),
        "tools": tools,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str]) -> int:
    """``python -m takakrypt.bench.machine [DIR]``: the machine information as JSON
    (ci/bench.sh --peers keeps it beside its results)."""
    import json

    print(json.dumps(info(argv[0] if argv else "."), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
