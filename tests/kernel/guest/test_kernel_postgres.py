"""PostgreSQL 15 on a kernel guard point: takakryptd mounts takakryptfs in place over the
cluster's data directory (``engine: kernel``) under the same deployment's policy as the
FUSE engine's test on the host (tests/test_e2e_postgres.py, the shared code is
tests/pg_helpers.py): the server and initdb run by the postgres user, by path AND
SHA-256, get plaintext; tar gets the stored bytes; everybody may stat and list;
everything else is denied.

initdb makes the cluster on the guard point, pgbench loads (scale 1); the key is
rotated and a live rekey of the whole cluster (docs/kernel.md, "Live rekey") runs while
pgbench runs a fixed number of transactions (0 errors; the rekey ends with every file
rekeyed, none failed), rows carrying a marker are written, pg_amcheck (heap, every
index, parent checks) finds nothing, root's cat and the postgres user's cat get EACCES.
With the server stopped, tar archives the directory through the guard point: every
regular file is TAKA bytes, the marker nowhere.  takakryptd stops (the mount goes): every
file at rest is a TAKA file the keystore decrypts, on the new key version only (the
header's oldest version raised), the marker in the relation's plaintext only.  A new takakryptd mounts it again and the restarted server reads the
rows back from the stored bytes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_helpers import Daemon
from pg_helpers import (MARKER, WANT_ROWS, Cluster, audit_verdicts, cluster_dirs,
                        files_at_rest, mount_type, outsiders_denied, pg_workdir,
                        pgbench_counts, policy_config, postgres_missing,
                        tar_guard_point, tar_members_are_taka)

pytestmark = pytest.mark.skipif(postgres_missing() is not None,
                                reason=str(postgres_missing()))

TRANSACTIONS = 500   # per client, 2 clients


def _agent(work: Path, cfg: dict) -> Daemon:
    """takakryptd with a start-up allowance for TCG (imports over 9p are slow)."""
    d = Daemon(work, cfg)
    d.notify.settimeout(240)
    try:
        d.wait_for("READY=1", timeout=400)
    except BaseException:
        d.stop(timeout=120)
        raise
    return d


def _rotate(work: Path) -> int:
    r = subprocess.run([sys.executable, "-m", "takakrypt", "keys", "rotate", "k1",
                        "--keystore", str(work / "keystore.json"), "--master-key-file",
                        str(work / "master.key"), "--json"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, TAKAKRYPT_CONTROL_SOCKET=str(
                           work / "run" / "control.sock")))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["current_version"]


def _files_on_older_versions(gp: Path, version: int) -> list[str]:
    """Files (at rest, unmounted) whose header allows a block older than ``version``."""
    from takakrypt import format as fmt

    old = []
    for root, _dirs, files in os.walk(gp):
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                raw = p.read_bytes()[:fmt.HEADER_SIZE]
                if raw and fmt.parse_header(raw).oldest_version < version:
                    old.append(str(p.relative_to(gp)))
    return old


def _mount_options(path: Path) -> dict[str, str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split(" ")[4] == str(path):
            opts = right.split(" ")[2]
    return dict(x.partition("=")[::2] for x in opts.split(","))


def _explain(e: AssertionError, work: Path, d: Daemon | None) -> AssertionError:
    audit = work / "audit.jsonl"
    tail = audit.read_text()[-3000:] if audit.exists() else ""
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout[-3000:]
    log = d.logtext()[-3000:] if d else ""
    return AssertionError(f"{e}\n--- takakryptd log (tail) ---\n{log}"
                          f"\n--- audit (tail) ---\n{tail}\n--- dmesg (tail) ---\n{dmesg}")


@contextlib.contextmanager
def _served(work: Path, cfg: dict, pg: Cluster, gp: Path) -> Iterator[Daemon]:
    """takakryptd serving the cluster's guard point; at the end the server (if still
    up) and takakryptd are stopped and the mount must be gone.  A failed assertion
    inside carries the takakryptd log, the audit and the kernel log."""
    d = None
    try:
        d = _agent(work, cfg)
        assert mount_type(gp) == "takakryptfs"
        yield d
    except AssertionError as e:
        raise _explain(e, work, d) from e
    finally:
        pg.stop(signal.SIGQUIT)
        if d is not None:
            d.stop(timeout=120)
    assert mount_type(gp) is None


def test_postgres_on_kernel_guard_point():
    t0 = time.monotonic()
    laps: list[str] = []

    def lap(what: str) -> None:
        laps.append(f"{what} {time.monotonic() - t0:.0f}s")

    with pg_workdir("tk-kpg-") as work:
        gp, sock = cluster_dirs(work)
        cfg = policy_config(work, gp, engine="kernel", sha256=True)
        pg = Cluster(gp, sock)
        relpath = ""
        with _served(work, cfg, pg, gp) as d:
            lap("agent")
            opts = _mount_options(gp)
            assert opts["key"] == "k1" and opts.get("decide", "agent") == "agent", opts
            pg.initdb(timeout=900)
            lap("initdb")
            pg.start(tries=3000)
            lap("start")

            r = pg.run("pgbench", "-i", "-s", "1", "-q", timeout=600)
            assert r.returncode == 0, r.stderr + pg.logtext()
            lap("pgbench -i")
            new = _rotate(work)
            # the live rekey of the cluster (in takakryptd's thread), under pgbench; 2 MB/s
            # so that it lasts through most of the run under TCG
            st = d.jcli("rekey", "start", str(gp), "--rate", "2")
            assert st["state"] == "running" and st["target_version"] == new, st
            r = pg.run("pgbench", "-t", str(TRANSACTIONS), "-c", "2", "-j", "2", "-n",
                       timeout=900)
            during = d.jcli("rekey", "status", str(gp))
            assert r.returncode == 0, r.stdout + r.stderr + pg.logtext()
            assert pgbench_counts(r.stdout) == (2 * TRANSACTIONS, 0), r.stdout
            lap("pgbench during the rekey")
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and d.jcli(
                    "rekey", "status", str(gp))["state"] == "running":
                time.sleep(2)
            st = d.jcli("rekey", "status", str(gp))
            assert st["state"] == "done" and st["files_failed"] == 0, st
            assert st["files_rekeyed"] > 100, st
            print(f"\nrekey: {during['files_done']} files done when pgbench ended, "
                  f"{st['files_rekeyed']} rekeyed in all")
            lap("rekey done")
            assert int(pg.psql("SELECT count(*) FROM pgbench_accounts")) == 100000
            assert int(pg.psql("SELECT count(*) FROM pgbench_history")) == 2 * TRANSACTIONS
            assert pg.psql("SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) "
                           "FROM pgbench_accounts").strip() == "t"

            relpath = pg.write_rows()
            assert pg.read_rows() == WANT_ROWS

            # pg_amcheck: every heap and btree of the database, with the heap's tuples
            # found in each index and the parent/child invariants; corruption is
            # reported on stdout (exit 2)
            pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
            r = pg.run("pg_amcheck", "-d", "postgres", "--heapallindexed", "--parent-check",
                       "--rootdescend", "-v", timeout=600)
            assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
            for rel in ('btree index "postgres.public.pgbench_accounts_pkey"',
                        'heap table "postgres.public.pgbench_accounts"',
                        'heap table "postgres.public.e2e_rows"',
                        'btree index "postgres.public.e2e_rows_pkey"'):
                assert f"checking {rel}" in r.stderr, r.stderr[-3000:]
            lap("pg_amcheck")

            # root's cat and the postgres user's cat: EACCES; ls and stat: allowed
            outsiders_denied(pg, gp, relpath)

            assert pg.stop() == 0, pg.logtext()
            lap("stop")
            # the backup tool, through the guard point: the stored bytes only
            tar_path = tar_guard_point(work)
            names = tar_members_are_taka(tar_path, MARKER.encode())
            assert f"pgdata/{relpath}" in names and "pgdata/PG_VERSION" in names
            lap("tar")
        lap("agent stopped")

        audit_verdicts(work, gp)
        # at rest: every regular file of the cluster is a TAKA file the keystore
        # decrypts; the rows are in the relation file, encrypted
        marker_seen_in = files_at_rest(gp, work / "keystore.json", work / "master.key",
                                       MARKER.encode())
        assert relpath in marker_seen_in, marker_seen_in
        old = _files_on_older_versions(gp, new)
        assert not old, old[:10]
        lap("at rest")

        # a new takakryptd mounts it again; the restarted server reads the rows back
        # from the stored bytes (no page of the first mount survived its unmount)
        with _served(work, cfg, pg, gp):
            pg.start(tries=3000)
            assert pg.read_rows() == WANT_ROWS
            assert int(pg.psql("SELECT count(*) FROM pgbench_accounts")) == 100000
            assert pg.stop() == 0, pg.logtext()
        lap("second life")
    print("\n" + ", ".join(laps))
