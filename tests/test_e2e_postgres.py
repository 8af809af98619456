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

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent_helpers import Daemon, base_config
from pg_helpers import files_at_rest, fuse_mounted, gid, has_user, tar_members_are_taka, uid

PGBIN = Path("/usr/lib/postgresql/15/bin")

TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                       or os.geteuid() != 0, reason="needs root, /dev/fuse, fusermount3"),
    pytest.mark.skipif(not (PGBIN / "postgres").exists() or not shutil.which("pgbench")
                       or not has_user("postgres"),
                       reason="needs postgresql-15, pgbench and the postgres user"),
]

MARKER = "takakrypt-e2e-marker-7f3a9c"
ROWS = [(i, f"{MARKER}-row-{i:04d}-" + "x" * (i % 37)) for i in range(1, 301)]


class Cluster:
    """initdb / postgres / psql / pgbench as the postgres user, socket only."""

    def __init__(self, data: Path, sock: Path) -> None:
        self.data, self.sock = data, sock
        self.server: subprocess.Popen | None = None
        self.env = {"PATH": f"{PGBIN}:/usr/bin:/bin", "LANG": "C", "LC_ALL": "C",
                    "HOME": str(sock), "PGHOST": str(sock), "PGUSER": "postgres",
                    "PGDATABASE": "postgres"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              user="postgres", group="postgres", extra_groups=[],
                              env=self.env, cwd=str(self.sock))

    def initdb(self) -> None:
        r = self.run(str(PGBIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                     "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-instructions")
        assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"

    def start(self) -> None:
        assert self.server is None
        log = open(self.sock / "server.log", "ab")
        self.server = subprocess.Popen(
            [str(PGBIN / "postgres"), "-D", str(self.data), "-c", "listen_addresses=",
             "-c", f"unix_socket_directories={self.sock}", "-c", "fsync=on",
             "-c", "max_wal_size=64MB", "-c", "logging_collector=off"],
            stdout=log, stderr=subprocess.STDOUT, user="postgres", group="postgres",
            extra_groups=[], env=self.env, cwd=str(self.sock))
        log.close()
        # wait until it accepts connections (bounded; not a timed assertion)
        for _ in range(600):
            if self.server.poll() is not None:
                raise AssertionError(f"postgres exited {self.server.returncode}:\n"
                                     f"{self.logtext()}")
            r = self.run("pg_isready", "-q", "-t", "1", timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"postgres did not become ready:\n{self.logtext()}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Fast shutdown (SIGINT) of the postmaster we started; waits for it."""
        p, self.server = self.server, None
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGQUIT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return p.returncode

    def psql(self, sql: str) -> str:
        r = self.run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql, timeout=120)
        assert r.returncode == 0, f"psql {sql!r}: {r.stderr}\n{self.logtext()}"
        return r.stdout

    def logtext(self) -> str:
        try:
            return (self.sock / "server.log").read_text(errors="replace")[-5000:]
        except OSError:
            return ""


def _config(work: Path, gp: Path) -> dict:
    cfg = base_config(work)
    cfg["agent"]["log_level"] = "debug" if os.environ.get("TK_E2E_KEEP") else "info"
    cfg["user_sets"] = {"postgres": {"users": ["postgres"]}}
    cfg["process_sets"] = {
        # initdb writes the configuration files and runs postgres --boot/--single;
        # the server (postmaster and every backend) is /usr/lib/postgresql/15/bin/postgres
        "pg_server": {"executables": [str(PGBIN / "postgres"), str(PGBIN / "initdb")]},
        "backup": {"executables": [TAR]},
    }
    cfg["policies"] = {"pgdata": {"rules": [
        {"user_set": "postgres", "process_set": "pg_server", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"process_set": "backup", "actions": ["read_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "pgdata", "key": "k1"}]
    return cfg


def _pgbench_counts(out: str) -> tuple[int, int]:
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert done, out
    return int(done.group(1)), int(failed.group(1)) if failed else 0


@pytest.fixture
def work():
    # /tmp/pytest-of-root is 0700: the postgres user could not reach a cluster there
    d = Path(tempfile.mkdtemp(prefix="tk-e2e-pg-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if not fuse_mounted(d / "pgdata") and not os.environ.get("TK_E2E_KEEP"):
            shutil.rmtree(d, ignore_errors=True)


def cluster_dirs(work: Path) -> tuple[Path, Path]:
    """The guard point (the cluster's data directory) and the socket directory, both
    the postgres user's, 0700."""
    out = []
    for name in ("pgdata", "sock"):
        d = work / name
        d.mkdir(mode=0o700)
        os.chown(d, uid("postgres"), gid("postgres"))
        out.append(d)
    return out[0], out[1]


def test_postgres_on_guard_point(work):
    gp, sock = cluster_dirs(work)
    cfg = _config(work, gp)
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
        done, failed = _pgbench_counts(r.stdout)
        assert done > 0 and failed == 0, r.stdout
        assert int(pg.psql("SELECT count(*) FROM pgbench_accounts")) == 200000

        pg.psql("CREATE TABLE e2e_rows (id int PRIMARY KEY, v text NOT NULL)")
        values = ",".join(f"({i}, '{v}')" for i, v in ROWS)
        pg.psql(f"INSERT INTO e2e_rows VALUES {values}")
        pg.psql("UPDATE e2e_rows SET v = v || '-upd' WHERE id % 10 = 0")
        pg.psql("DELETE FROM e2e_rows WHERE id > 290")
        pg.psql("CHECKPOINT")
        relpath = pg.psql("SELECT pg_relation_filepath('e2e_rows')").strip()
        assert relpath.startswith("base/"), relpath
        want = [(i, v + ("-upd" if i % 10 == 0 else "")) for i, v in ROWS if i <= 290]
        got = [tuple(line.split("|", 1)) for line in
               pg.psql("SELECT id, v FROM e2e_rows ORDER BY id").splitlines()]
        assert [(int(i), v) for i, v in got] == want

        # restart the server: the rows come back from the encrypted files
        assert pg.stop() == 0, pg.logtext()
        pg.start()
        got = [tuple(line.split("|", 1)) for line in
               pg.psql("SELECT id, v FROM e2e_rows ORDER BY id").splitlines()]
        assert [(int(i), v) for i, v in got] == want
        assert pg.psql("SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) "
                       "FROM pgbench_accounts").strip() == "t"

        # root's cat, outside the policy: EACCES, on a relation file and on PG_VERSION
        for rel in (relpath, "PG_VERSION"):
            c = subprocess.run([CAT, str(gp / rel)], capture_output=True, timeout=60)
            assert c.returncode != 0 and b"Permission denied" in c.stderr, (rel, c)
            assert MARKER.encode() not in c.stdout
        # ... and the postgres user with a program that is not the server: EACCES too
        c = pg.run(CAT, str(gp / "PG_VERSION"))
        assert c.returncode != 0 and "Permission denied" in c.stderr, c
        # ... listing and stat are allowed to everyone (the ls rule)
        assert "PG_VERSION" in os.listdir(gp)
        assert os.stat(gp / relpath).st_size > 0

        # the backup tool while the server runs: ciphertext only
        tar_path = work / "backup.tar"
        t = subprocess.run([TAR, "-C", str(work), "-cf", str(tar_path), "pgdata"],
                           capture_output=True, text=True, timeout=300)
        # 1 = "file changed as we read it" (a live cluster); anything else is an error
        assert t.returncode in (0, 1), t.stderr
        assert "Permission denied" not in t.stderr, t.stderr
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
    events = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
    access = [e for e in events if e.get("kind") == "access"]
    assert any(e["exe"] == CAT and e["decision"] == "deny"
               and e["path"] == str(gp / "PG_VERSION") for e in access)
    tar_ev = [e for e in access if e["exe"] == TAR]
    assert tar_ev and all(e["decision"] == "permit" and e["key"] is None for e in tar_ev)
    pg_denied = [e for e in access if e["decision"] != "permit"
                 and e["exe"].startswith(str(PGBIN))]
    assert not pg_denied, pg_denied[:5]
    assert not [e for e in events if e.get("kind") == "integrity"]

    # at rest: every regular file of the cluster is a TAKA file the keystore decrypts
    marker_seen_in = files_at_rest(gp, work / "keystore.json", work / "master.key",
                                   MARKER.encode())
    # the rows really are in the relation file, encrypted
    assert relpath in marker_seen_in, marker_seen_in
