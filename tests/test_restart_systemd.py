"""Issue 16 under a real systemd (VM, Debian's 6.1 kernel): PostgreSQL keeps running
while the shipped takakryptd unit is restarted three times (`systemctl restart`) and
its main process SIGKILLed three times (as a watchdog ends it; Restart=on-failure
starts the next) under pgbench, its guard point's connection waiting in systemd's file
descriptor store each time (tests/restart_guest.py runs in the guest; pgbench runs back to
back in 30 s runs until the last event is over, each event fired among transactions in
flight).  Shown: 0 failed
transactions, no PANIC, amcheck clean, the same mount throughout; the longest stall is
printed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vmharness import missing, result_of


def _missing() -> list[str]:
    return missing(systemd=True)

pytestmark = [
    pytest.mark.skipif(bool(_missing()), reason="VM tooling absent: " + ", ".join(_missing())),
    pytest.mark.skipif(not Path("/usr/lib/postgresql/15/bin/postgres").exists()
                       or not shutil.which("pgbench"), reason="needs postgresql-15 and pgbench"),
    pytest.mark.slow,
    pytest.mark.vm,
]


# 3 GiB: the cluster lives in the guest's /tmp (tmpfs, half the memory); pgbench
# scale 10 with its WAL needs about 300 MB
SYSTEMD_GUEST = ("restart_guest.py", 2400, "3G")


def test_pgbench_through_restarts_under_systemd(systemd_guest):
    r = result_of(systemd_guest[__name__])
    explain = json.dumps({k: v for k, v in r.items()
                          if k not in ("server_log", "journal", "dmesg")}, indent=1) + \
        "\n" + r.get("server_log", "")[-3000:] + "\n" + r.get("journal", "") + "\n" + \
        r.get("dmesg", "")
    assert "error" not in r, explain
    assert r["start_rc"] == 0 and len(r["dev"]) == 1, explain
    assert r["init_rc"] == 0, explain
    kinds = [e[0] for e in r["events"]]
    assert kinds == ["restart", "kill"] * 3, explain
    assert all(d == r["dev"] for d in r["devs"]), explain  # never replaced nor uncovered
    assert r["under_load"] == [True] * 6, explain  # every event among transactions in flight
    assert r["bench_runs"] >= 2 and r["bench_rc"] == [0] * r["bench_runs"], explain
    assert r["bench_failed"] == [0] * r["bench_runs"], explain  # each run printed 0 failed
    assert r["bench_tx"] > 0, explain
    assert not r["panic"], explain
    assert r["amcheck"] >= 3 and r["accounts"] == 1_000_000, explain
    print(f"\nunder systemd: {kinds}; {r['bench_tx']} transactions in {r['bench_runs']} "
          f"pgbench runs; longest transaction {r['worst_ms']:.1f} ms; "
          f"stall at each event {r['stall_ms']} ms; "
          f"until the new process was active {[e[2] for e in r['events']]} s")
