"""Live rekey under load: PostgreSQL 15 runs pgbench (scale 10, 4 clients) on an
in-place guard point served by a real takakryptd while the guard point is rekeyed to
the key's new version at the default rate limit.

Shown: pgbench reports 0 failed transactions and exits 0; the rekey finishes while
pgbench still runs, with every file rekeyed or already current and none failed;
pg_amcheck (heap, every index, parent checks) finds nothing; the balances add up; and
with takakryptd stopped every regular file at rest is a TAKA file naming the new key
version (`takakrypt inspect --json`) that the keystore decrypts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from agent_helpers import Daemon, until
from pg_helpers import (Cluster, cluster_dirs, pg_workdir, pgbench_counts, policy_config,
                        postgres_missing)

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                       or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3"),
    pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing())),
]


@pytest.fixture
def work():
    with pg_workdir("tk-rekey-pg-") as d:
        yield d


def _tk(work, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "takakrypt", *args], capture_output=True,
                          text=True, timeout=120)


def test_live_rekey_under_pgbench(work):
    gp, sock = cluster_dirs(work)
    cfg = policy_config(work, gp, sha256=True)
    ks = ["--keystore", str(work / "keystore.json"), "--master-key-file",
          str(work / "master.key")]
    pg = Cluster(gp, sock)
    d = Daemon(work, cfg)
    bench = None
    try:
        d.wait_for("READY=1")
        pg.initdb()
        pg.start()
        r = pg.run("pgbench", "-i", "-s", "10", "-q", timeout=900)
        assert r.returncode == 0, r.stderr + pg.logtext()
        pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
        r = _tk(work, "keys", "rotate", "k1", *ks, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["current_version"] == 2

        bench = subprocess.Popen(
            ["pgbench", "-c", "4", "-j", "2", "-T", "60", "-P", "1", "-n"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user="postgres",
            group="postgres", extra_groups=[], env=pg.env, cwd=str(sock))
        time.sleep(5)
        assert bench.poll() is None
        st = d.jcli("rekey", "start", str(gp))
        assert st["state"] == "running" and st["target_version"] == 2
        st = until(lambda: (s := d.jcli("rekey", "status", str(gp)))["state"] != "running"
                   and s, 600, 0.5)
        assert st and st["state"] == "done", st
        rekey_done_while_running = bench.poll() is None
        out, err = bench.communicate(timeout=600)
        assert bench.returncode == 0, out + err + pg.logtext()
        done, failed = pgbench_counts(out)
        assert done > 0 and failed == 0, out
        assert rekey_done_while_running, "pgbench ended before the rekey: no overlap shown"
        assert st["files_failed"] == 0 and st["busy"] == 0, st
        assert st["files_rekeyed"] > 0
        assert st["files_rekeyed"] + st["files_current"] + st["files_skipped"] == \
            st["files_done"]

        r = pg.run("pg_amcheck", "-d", "postgres", "--heapallindexed", "--parent-check",
                   "--rootdescend", timeout=900)
        assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
        assert pg.psql("SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) "
                       "FROM pgbench_accounts").strip() == "t"
        assert int(pg.psql("SELECT count(*) FROM pgbench_accounts")) == 1_000_000
        use = d.jcli("keys", "versions", "k1", "--usage", str(gp), *ks)
        by_version = {v["version"]: v["files"] for v in use["versions"]}
        assert by_version.get(1, 0) == 0 and by_version[2] > 0, use
        assert pg.stop() == 0, pg.logtext()
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        if pg.server is not None and pg.server.poll() is None:
            pg.stop()
        d.stop()
    # at rest, takakryptd stopped: every regular file names version 2 and decrypts
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(gp) for f in fs
             if not f.startswith(".takakrypt-")]
    assert len(files) > 100
    from takakrypt import format as fmt

    for path in files:  # every header, in process (fast) ...
        with open(path, "rb") as f:
            h = fmt.parse_header(f.read(fmt.HEADER_SIZE))
        assert (h.key_id, h.key_version) == ("k1", 2), path
    for path in files[::max(1, len(files) // 12)]:  # ... and the CLI's view, verified
        r = _tk(work, "inspect", "--json", "--verify", *ks, path)
        assert r.returncode == 0, (path, r.stderr)
        info = json.loads(r.stdout)
        assert info["key_id"] == "k1" and info["key_version"] == 2, (path, info)
