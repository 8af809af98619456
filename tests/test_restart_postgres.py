"""Issue 16: PostgreSQL keeps running while takakryptd is restarted under it.

pgbench (scale 10, 4 clients, 60 s) runs on an in-place guard point served by a real
takakryptd under a deployment's policy (the PostgreSQL server and initdb by path AND
SHA-256 get plaintext, tar the stored bytes, everything else only names and sizes);
meanwhile `takakrypt restart` (takakryptd --upgrade: the new process takes every
connection over from the old one) runs ten times.  Shown: 0 failed transactions, pgbench
exits 0, no PANIC or FATAL in the server log, amcheck finds every pgbench index
consistent, the same mount throughout.  The longest stall a client saw (the largest
transaction latency of the run) is printed -- a figure, never an assertion.

`TK_RESTART_SECONDS` / `TK_RESTARTS` change the run's length and the restart count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_helpers import Daemon
from pg_helpers import Cluster, cluster_dirs, policy_config
from test_e2e_postgres import pytestmark, work  # noqa: F401

SECONDS = int(os.environ.get("TK_RESTART_SECONDS", "60"))
RESTARTS = int(os.environ.get("TK_RESTARTS", "10"))


def _mount_dev(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[2] for line in f if line.split()[4] == str(path)
                and "fuse.takakrypt" in line.partition(" - ")[2]]


def _status_pid(cfg: dict) -> int:
    r = subprocess.run([sys.executable, "-m", "takakrypt", "status", "--json"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=cfg["agent"]["control_socket"]))
    return int(json.loads(r.stdout)["pid"])


def test_pgbench_through_ten_restarts(work):  # noqa: F811 - the fixture
    gp, sock = cluster_dirs(work)
    cfg = policy_config(work, gp, sha256=True)
    pg = Cluster(gp, sock)
    d = Daemon(work, cfg)
    pids: list[int] = []
    try:
        d.wait_for("READY=1")
        dev = _mount_dev(gp)
        assert len(dev) == 1
        pg.initdb()
        pg.start()
        r = pg.run("pgbench", "-i", "-s", "10", "-q", timeout=600)
        assert r.returncode == 0, r.stderr + pg.logtext()
        # a client that connects while the server starts gets "FATAL: the database
        # system is starting up": only what the server logs from here on is judged
        log_from = (sock / "server.log").stat().st_size
        bench = subprocess.Popen(
            ["pgbench", "-c", "4", "-j", "2", "-T", str(SECONDS), "-n", "-l",
             "--log-prefix", str(sock / "tx")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user="postgres",
            group="postgres", extra_groups=[], env=pg.env, cwd=str(sock))
        pids.append(d.proc.pid)
        first = True
        gap = max(1.0, (SECONDS - 8) / RESTARTS)
        for _ in range(RESTARTS):
            time.sleep(gap)
            r = d.cli("restart", check=False, timeout=120)
            assert r.returncode == 0, f"restart: {r.stdout}{r.stderr}\n{d.logtext()[-3000:]}"
            if first:  # the daemon we started exits once its successor serves
                assert d.proc.wait(60) == 0
                first = False
            new = _status_pid(cfg)
            assert new not in pids
            pids.append(new)
            assert _mount_dev(gp) == dev  # the same mount, never replaced nor uncovered
        out, err = bench.communicate(timeout=SECONDS + 300)
        log = pg.logtext()
        assert bench.returncode == 0, f"pgbench: {out}\n{err}\n{log}"
        done = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert done > 0 and (failed is None or int(failed.group(1)) == 0), out
        text = (sock / "server.log").read_text(errors="replace")
        assert not re.search(r"\bPANIC\b", text) and \
            not re.search(r"\bFATAL\b", text[log_from:]), log
        # the longest stall: the largest latency (column 3, us) of any transaction
        worst = max(int(line.split()[2]) for f in sock.glob("tx.*")
                    for line in f.read_text().splitlines() if line.strip())
        print(f"\npgbench: {done} transactions in {SECONDS} s through {RESTARTS} restarts, "
              f"0 failed; longest transaction {worst / 1000:.1f} ms")
        pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
        checked = pg.psql(
            "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'btree' AND c.relname LIKE 'pgbench%'")
        assert int(checked) >= 3  # pgbench_accounts/branches/tellers primary keys
        total = pg.psql("SELECT count(*) FROM pgbench_accounts")
        assert int(total) == 10 * 100000
    finally:
        pg.stop()
        for pid in pids[1:]:  # successors are not our children
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(600):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
        d.stop()


pytestmark = [*pytestmark, pytest.mark.slow]
