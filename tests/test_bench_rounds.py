"""takakrypt.bench.workloads.Rounds and rotated(): the round loop that `takakrypt bench`
and the VM benchmark (benchmarks/kernel_guest.py) share, with stand-in groups."""

from __future__ import annotations

from pathlib import Path

from takakrypt.bench.targets import Target
from takakrypt.bench.workloads import Context, Group, Rounds, Sizes, WorkloadFailed, rotated


def target(name: str) -> Target:
    return Target(name, name, Path("/nonexistent") / name, Path("/nonexistent") / name,
                  "native", "none")


class Recorder(Group):
    name = "rec"

    def __init__(self, fail_on: str = "", fail_teardown: str = "") -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on, self.fail_teardown = fail_on, fail_teardown

    def setup(self, ctx, t):
        self.calls.append(("setup", t.name))

    def run(self, ctx, t):
        self.calls.append(("run", t.name))
        if t.name == self.fail_on:
            raise WorkloadFailed(f"{t.name} broke")
        return {"w": float(len(self.calls))}

    def teardown(self, ctx, t):
        self.calls.append(("teardown", t.name))
        if t.name == self.fail_teardown:
            raise OSError(5, "teardown broke")


def ctx(tmp_path: Path) -> Context:
    return Context(sizes=Sizes(), private=tmp_path, cold=False, directory=tmp_path)


def test_rotated_moves_every_target_through_every_place():
    ts = [target(n) for n in "abc"]
    orders = [[t.name for t in rotated(ts, r)] for r in range(4)]
    assert orders == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_setup_once_failures_remembered_teardown_of_what_was_set_up(tmp_path):
    g = Recorder(fail_on="b", fail_teardown="c")
    ts = [target(n) for n in "abc"]
    r = Rounds(ctx(tmp_path))
    got = [[r.run(g, t) for t in ts] for _ in range(3)]
    assert all(row[0] and row[2] for row in got)          # a and c give figures each round
    assert [row[1] for row in got] == [None, None, None]  # b failed, then is skipped
    assert g.calls.count(("setup", "a")) == 1 and g.calls.count(("run", "a")) == 3
    assert g.calls.count(("run", "b")) == 1               # not run again after failing
    assert r.failed == {"b": {"rec": "b broke"}}
    errors = r.teardown([g], ts)
    assert ("teardown", "a") in g.calls and ("teardown", "b") in g.calls
    assert errors == {"c": {"rec": "clean-up: [Errno 5] teardown broke"}}
