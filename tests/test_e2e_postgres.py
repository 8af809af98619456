"""End to end: PostgreSQL 15 on an in-place guard point served by a real takakryptd.

Policy: only the PostgreSQL binaries run by the ``postgres`` user (initdb, which writes
the configuration files, and the server itself, which initdb also runs in bootstrap
and single-user mode) get plaintext; tar gets the stored TAKA bytes; everybody may
stat and list; everything else (root's cat included) is denied.

The cluster is created on the guard point, the server listens on a Unix socket only,
pgbench loads and runs, known rows are written and read back with psql, survive a
server restart, and nothing outside the server ever sees plaintext: root's cat gets
EACCES, the tar archive holds TAKA files without the marker, and at rest every regular
file of the cluster is a valid TAKA file that the keystore decrypts.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from agent_helpers import Daemon
from pg_helpers import (MARKER, WANT_ROWS, Cluster, audit_verdicts, cluster_dirs,
                        files_at_rest, fuse_mounted, outsiders_denied, pg_workdir,
                        pgbench_counts, policy_config, postgres_missing,
                        tar_guard_point, tar_members_are_taka)

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                       or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3"),
    pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing())),
]


@pytest.fixture
def work():
    with pg_workdir() as d:
        yield d


def test_postgres_on_guard_point(work):
    gp, sock = cluster_dirs(work)
    cfg = policy_config(work, gp)
    pg = Cluster(gp, sock)
    d = Daemon(work, cfg)
    relpath = ""
    try:
        d.wait_for("READY=1")
        assert fuse_mounted(gp)
        pg.initdb()
        pg.start()

        r = pg.run("pgbench", "-i", "-s", "2", "-q")
        assert r.returncode == 0, r.stderr + pg.logtext()
        r = pg.run("pgbench", "-T", "10", "-c", "2", "-j", "2", "-n")
        assert r.returncode == 0, r.stdout + r.stderr + pg.logtext()
        done, failed = pgbench_counts(r.stdout)
        assert done > 0 and failed == 0, r.stdout
        assert int(pg.psql("SELECT count(*) FROM pgbench_accounts")) == 200000

        relpath = pg.write_rows()
        assert pg.read_rows() == WANT_ROWS

        # restart the server: the rows come back from the encrypted files
        assert pg.stop() == 0, pg.logtext()
        pg.start()
        assert pg.read_rows() == WANT_ROWS
        assert pg.psql("SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) "
                       "FROM pgbench_accounts").strip() == "t"

        # root's cat and the postgres user's cat: EACCES; ls and stat: allowed
        outsiders_denied(pg, gp, relpath)

        # the backup tool while the server runs: ciphertext only
        tar_path = tar_guard_point(work, live=True)
        names = tar_members_are_taka(tar_path, MARKER.encode())
        assert f"pgdata/{relpath}" in names and "pgdata/PG_VERSION" in names

        assert pg.stop() == 0, pg.logtext()
    except AssertionError as e:
        # keep what explains a failure: the agent's log and the last audit events
        audit = work / "audit.jsonl"
        tail = audit.read_text()[-3000:] if audit.exists() else ""
        raise AssertionError(f"{e}\n--- takakryptd log (tail) ---\n{d.logtext()[-3000:]}"
                             f"\n--- audit (tail) ---\n{tail}") from e
    finally:
        pg.stop(signal.SIGQUIT)
        d.stop()
    assert not fuse_mounted(gp)

    # the audit trail: root's cat denied, tar permitted without the key, and the server
    # itself never denied anything (the policy is enough to run PostgreSQL)
    audit_verdicts(work, gp)

    # at rest: every regular file of the cluster is a TAKA file the keystore decrypts
    marker_seen_in = files_at_rest(gp, work / "keystore.json", work / "master.key",
                                   MARKER.encode())
    # the rows really are in the relation file, encrypted
    assert relpath in marker_seen_in, marker_seen_in
