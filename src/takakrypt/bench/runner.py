"""Run the benchmark: targets up, interleaved rounds, statistics, and clean-up on every
way out.

A round runs every workload group on every target, the order of the targets rotated
from round to round, so slow drifts of a shared machine (other load, a warming disk)
fall on every target alike.  Ratios to native are taken within the run: the median of
the guard point's figures against the median of native's, and the spread of the
per-round ratios (round r's guard figure against round r's native figure).

Clean-up (also after Ctrl-C or SIGTERM, which are ignored while it runs): stop what the
workloads left running (PostgreSQL), stop the guard point servers and unmount, remove
the work directory under the user's directory, wipe the key and remove the private
temporary directory.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import SCHEMA, machine
from ..errors import BenchError, UsageError
from ..progress import Bar
from .targets import Guard, KeyFile, Target, kernel_engine, realistic_policy
from .workloads import Context, Group, Rounds, Sizes, all_groups, postgres_bin, rotated

TARGET_LABELS = {"native": "native", "fuse": "fuse (policy)",
                 "fuse-allow-all": "fuse (allow-all)"}


@dataclass
class Options:
    directory: Path
    rounds: int = 5
    sizes: Sizes = field(default_factory=Sizes)
    only: tuple[str, ...] = ()          # workload names; () = all
    allow_all: bool = True              # also measure the allow-all guard point
    cold: bool = True
    threads: int = 4
    progress: bool | None = None        # None: when stderr is a terminal
    quick: bool = False


def check_environment(directory: Path) -> None:
    if os.geteuid() != 0:
        raise BenchError("takakrypt bench mounts guard points: run it as root")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is absent: the FUSE engine cannot run here")
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        raise BenchError("fusermount3 is not installed (apt-get install fuse3)")
    try:
        from .. import _fuse  # noqa: F401
    except ImportError as e:
        raise BenchError(f"the FUSE engine is not built ({e}): make install") from None
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{directory} is not writable")


def summarize(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    q1, _, q3 = (statistics.quantiles(v, n=4, method="inclusive") if len(v) >= 2
                 else (v[0], v[0], v[0]))
    return {"values": values, "median": statistics.median(v), "min": v[0], "max": v[-1],
            "q1": q1, "q3": q3}


def relative(guard: float, native: float, higher_is_better: bool) -> float:
    """Speed relative to native: 1.0 = as fast, 0.5 = half as fast (twice the time)."""
    if guard <= 0 or native <= 0:
        return 0.0
    return guard / native if higher_is_better else native / guard


class Runner:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.private: Path | None = None
        self.work: Path | None = None
        self.key: KeyFile | None = None
        self.guards: list[Guard] = []
        self.groups: list[Group] = []
        self.ctx: Context | None = None
        self.leftovers: list[str] = []

    # ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.o
        directory = Path(os.path.realpath(o.directory))
        check_environment(directory)
        started = dt.datetime.now(dt.timezone.utc)
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            try:
                doc = self._run(directory, started)
            finally:
                self.cleanup()
        finally:
            signal.signal(signal.SIGTERM, old_term)
        if self.leftovers:
            raise BenchError("clean-up incomplete: " + "; ".join(self.leftovers))
        return doc

    def _run(self, directory: Path, started: dt.datetime) -> dict[str, Any]:
        o = self.o
        self.private = Path(tempfile.mkdtemp(prefix="takakrypt-bench-"))
        os.chmod(self.private, 0o711)  # postgres reaches its socket directory; the key
        #                                sits in a 0700 directory below
        self.work = Path(tempfile.mkdtemp(prefix=".takakrypt-bench-", dir=directory))
        os.chmod(self.work, 0o755)  # the postgres user reaches its cluster below it
        self.ctx = ctx = Context(sizes=o.sizes, private=self.private, cold=o.cold,
                                      directory=directory)
        groups = all_groups(o.sizes)
        if o.only:
            groups = [g for g in groups if any(w.name in o.only for w in g.workloads)]
        skipped: dict[str, str] = {}
        for g in groups:
            why = g.unavailable(ctx)
            if why:
                skipped[g.name] = why
            else:
                self.groups.append(g)
        programs: dict[str, str] = {}
        for g in self.groups:
            programs.update(g.programs())
        policy_yaml = realistic_policy(programs)
        self.key = KeyFile(self.private)

        targets = [Target("native", TARGET_LABELS["native"], self.work / "native",
                          self.work / "native")]
        targets[0].path.mkdir()
        guards = [("fuse", "realistic", policy_yaml)]
        if o.allow_all:
            guards.append(("fuse-allow-all", "allow-all", None))
        for name, pol, yaml_text in guards:
            back, mnt = self.work / f"{name}.back", self.work / f"{name}.mnt"
            back.mkdir()
            mnt.mkdir()
            g = Guard(mnt, back, self.key, self.private, yaml_text, o.threads)
            self.guards.append(g)
            g.start()
            targets.append(Target(name, TARGET_LABELS[name], mnt, back, "fuse", pol, g))
        kernel_loaded, kernel_note = kernel_engine()

        steps = o.rounds * len(self.groups) * len(targets)
        bar = Bar(steps, "preparing", unit="steps", enabled=o.progress)
        for g in self.groups:
            bar.label = f"preparing {g.name}"
            bar(0)
            g.prepare(ctx)
        values: dict[str, dict[str, list[float]]] = {}
        rounds = Rounds(ctx)
        for r in range(o.rounds):
            for g in self.groups:
                for t in rotated(targets, r):
                    bar.label = f"round {r + 1}/{o.rounds}: {g.name} on {t.label}"
                    bar(0)
                    got = rounds.run(g, t)
                    for w, v in (got or {}).items():
                        values.setdefault(w, {}).setdefault(t.name, []).append(v)
                    bar(1)
        bar.label = "cleaning up"
        bar(0)
        failures = rounds.failed
        for tn, errs in rounds.teardown(self.groups, targets).items():
            for gn, e in errs.items():
                failures.setdefault(tn, {}).setdefault(gn, e)
        bar.close()
        finished = dt.datetime.now(dt.timezone.utc)
        return self._document(directory, started, finished, targets, all_groups(o.sizes),
                              skipped, values, failures, policy_yaml, kernel_loaded,
                              kernel_note)

    # ---------------------------------------------------------------------------------
    def _document(self, directory: Path, started: dt.datetime, finished: dt.datetime,
                  targets: list[Target], groups: list[Group], skipped: dict[str, str],
                  values: dict[str, dict[str, list[float]]],
                  failures: dict[str, dict[str, str]], policy_yaml: str,
                  kernel_loaded: bool, kernel_note: str) -> dict[str, Any]:
        o = self.o
        tdesc = [t.describe() for t in targets]
        tdesc.append({"name": "kernel", "label": "kernel", "engine": "kernel",
                      "policy": "realistic", "status": "skipped", "reason": kernel_note,
                      "loaded": kernel_loaded})
        workloads = []
        for g in groups:
            for w in g.workloads:
                if o.only and w.name not in o.only:
                    continue
                entry: dict[str, Any] = {"name": w.name, "title": w.title, "unit": w.unit,
                                         "higher_is_better": w.higher_is_better,
                                         "status": "ok", "results": {}, "ratios": {}}
                if g.name in skipped:
                    entry.update(status="skipped", reason=skipped[g.name])
                    workloads.append(entry)
                    continue
                errs = {t: f[g.name] for t, f in failures.items() if g.name in f}
                if errs:
                    entry["errors"] = errs
                for t in targets:
                    vals = values.get(w.name, {}).get(t.name)
                    if vals:
                        entry["results"][t.name] = summarize(vals)
                native = entry["results"].get("native")
                for t in targets[1:]:
                    res = entry["results"].get(t.name)
                    if not (native and res):
                        continue
                    per_round = [relative(gv, nv, w.higher_is_better)
                                 for gv, nv in zip(res["values"], native["values"])]
                    entry["ratios"][t.name] = {
                        "median": relative(res["median"], native["median"],
                                           w.higher_is_better),
                        "min": min(per_round), "max": max(per_round)}
                if errs and len(entry["results"]) < len(targets):
                    entry["status"] = "failed"
                workloads.append(entry)
        return {
            "schema": SCHEMA,
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "seconds": round((finished - started).total_seconds(), 1),
            "settings": {"rounds": o.rounds, "quick": o.quick, "sizes": asdict(o.sizes),
                         "cold_reads": bool(self.ctx and self.ctx.cold),
                         "threads": o.threads, "directory": str(directory),
                         "postgres_bin": postgres_bin()},
            "machine": machine.info(str(directory), postgres_bin()),
            "policy": {"realistic": policy_yaml,
                       "allow_all": "every process gets plaintext (permit, apply_key)"},
            "ratio": "speed relative to native: guard/native for rates, native/guard for "
                     "times; 1.0 = as fast as native, 0.5 = half as fast",
            "targets": tdesc,
            "workloads": workloads,
        }

    # ---------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Undo everything; never raises; Ctrl-C and SIGTERM wait until it is done."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.ctx is not None:
                for g in self.groups:
                    try:
                        g.abort(self.ctx)
                    except Exception as e:  # noqa: BLE001 - keep cleaning up
                        self.leftovers.append(f"{g.name}: {e}")
            for g in self.guards:
                try:
                    g.stop()
                except Exception as e:  # noqa: BLE001
                    self.leftovers.append(f"unmount {g.mountpoint}: {e}")
            if self.work is not None:
                from ..guard import fuse_mounts

                still = fuse_mounts(str(self.work))
                if still:
                    self.leftovers.append("still mounted: " + ", ".join(still))
                else:
                    shutil.rmtree(self.work, ignore_errors=True)
                    if self.work.exists():
                        self.leftovers.append(f"cannot remove {self.work}")
            if self.key is not None:
                self.key.wipe()
            if self.private is not None:
                shutil.rmtree(self.private, ignore_errors=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(opts: Options) -> dict[str, Any]:
    return Runner(opts).run()

