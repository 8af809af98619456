"""PostgreSQL 15 run as Debian runs it, on a guard point, under the shipped policy.

packaging/postgresql-debian.yaml (docs/policy.md, worked example 1) must let Debian's
tooling work: ``pg_ctlcluster`` (perl, started as root like the ``postgresql@`` unit
does, then as ``postgres``) reads the server's lock file ``postmaster.pid`` and
``postgresql.auto.conf``; ``pg_ctl`` reads ``postmaster.pid`` and ``postmaster.opts``;
the server does everything else.  Nothing else gets plaintext: root's ``cat`` and perl
under its own name are denied, tar gets the stored TAKA bytes.

A dedicated cluster is made with ``pg_createcluster`` (its data directory in a scratch
directory, its socket in another, no TCP), encrypted in place with ``takakrypt xform``
(as an operator converts an existing cluster), served as an in-place guard point by a
real takakryptd, and started, queried, restarted and stopped with the commands of
Debian's unit (``pg_ctlcluster --skip-systemctl-redirect``).  The cluster is dropped
at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from agent_helpers import Daemon
from pg_helpers import (ENV, PGBIN, SHIPPED, DebianCluster, files_at_rest, fuse_mounted, gid,
                        has_user, shipped_config, tar_members_are_taka, uid)

ROOT = Path(__file__).parents[1]
TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")
PERL = "/usr/bin/perl"
DEBIAN_TOOLS = ("pg_createcluster", "pg_ctlcluster", "pg_lsclusters", "pg_dropcluster")

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs root, /dev/fuse, fusermount3")
needs_debian_pg = pytest.mark.skipif(
    not (PGBIN / "postgres").exists() or not (PGBIN / "pg_ctl").exists()
    or not all(shutil.which(t) for t in DEBIAN_TOOLS) or not os.path.exists(PERL)
    or not has_user("postgres"),
    reason="needs Debian's postgresql-15 and postgresql-common (pg_createcluster, "
           "pg_ctlcluster) and the postgres user")

MARKER = "takakrypt-pgdeb-marker-51c2e8"
ROWS = [(i, f"{MARKER}-{i:03d}") for i in range(1, 101)]


def test_shipped_policy_passes_strict_config_check(tmp_path):
    gp = tmp_path / "data"
    gp.mkdir()
    cfg = shipped_config(tmp_path, gp)
    path = tmp_path / "takakrypt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "takakrypt", "config", "check", "--strict",
                        str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr
    # the file as shipped differs only in what names this machine (keystore, paths)
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert shipped["guard_points"][0]["path"] == "/var/lib/postgresql/15/main"


@pytest.fixture
def work():
    # /tmp/pytest-of-root is 0700: the postgres user could not reach a cluster there
    d = Path(tempfile.mkdtemp(prefix="tk-pgdeb-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if not fuse_mounted(d / "data"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cluster(work):
    """A cluster to create; dropped afterwards (the test stops takakryptd first)."""
    gp, sock = work / "data", work / "sock"
    for d in (gp, sock):
        d.mkdir(mode=0o700)
        os.chown(d, uid("postgres"), gid("postgres"))
    pg = DebianCluster(work, gp, sock)
    try:
        yield pg
    finally:
        if pg.running():
            pg.kill()
        if not fuse_mounted(gp):
            pg.drop()


def _rows(pg: DebianCluster) -> list[tuple[int, str]]:
    return [(int(i), v) for i, v in (line.split("|", 1) for line in
            pg.psql("SELECT id, v FROM tk_rows ORDER BY id").splitlines())]


def _denied(r: subprocess.CompletedProcess) -> bool:
    return r.returncode != 0 and "Permission denied" in r.stderr and MARKER not in r.stdout


@needs_fuse
@needs_debian_pg
def test_pg_ctlcluster_under_shipped_policy(work, cluster):
    pg, gp, sock = cluster, cluster.data, cluster.sock
    daemon = None
    probe_pid, relpath = -1, ""
    try:
        pg.create()
        # an existing cluster is encrypted in place before it becomes a guard point
        cfg = shipped_config(work, gp)   # creates the keystore with key k1
        pg.xform(work)
        daemon = Daemon(work, cfg)
        daemon.wait_for("READY=1")
        assert fuse_mounted(gp)

        r = pg.ctl("start")
        assert r.returncode == 0, f"start: {r.stdout}\n{r.stderr}\n{pg.logtext()}"
        r = pg.ctl("status")
        assert r.returncode == 0 and "server is running" in r.stdout, r.stdout + r.stderr
        assert "online" in pg.lsclusters()

        pg.psql("CREATE TABLE tk_rows (id int PRIMARY KEY, v text NOT NULL)")
        pg.psql("INSERT INTO tk_rows VALUES " + ",".join(f"({i}, '{v}')" for i, v in ROWS))
        pg.psql("CHECKPOINT")
        assert _rows(pg) == ROWS
        relpath = pg.psql("SELECT pg_relation_filepath('tk_rows')").strip()
        assert relpath.startswith("base/"), relpath

        # what Debian's tools may read stays closed to every other program: root's cat
        for rel in (relpath, "postmaster.pid", "postgresql.auto.conf", "PG_VERSION"):
            assert _denied(pg.root(CAT, str(gp / rel))), rel
        # ... and perl itself, as postgres, when it is not running pg_ctlcluster
        probe = subprocess.Popen(
            [PERL, "-e", 'open(my $f, "<", $ARGV[0]) or die "$!\\n"; print <$f>',
             str(gp / "postmaster.pid")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, user="postgres", group="postgres", extra_groups=[], env=ENV,
            cwd=str(sock))
        probe_pid = probe.pid
        out, err = probe.communicate(timeout=60)
        assert probe.returncode != 0 and "Permission denied" in err and not out, (out, err)
        # ... and pg_ctl, run by postgres, only for the lock file and the saved options
        r = pg.pg(str(PGBIN / "pg_ctl"), "-D", str(gp), "status")
        assert r.returncode == 0 and "server is running" in r.stdout, r.stdout + r.stderr
        # listing and stat stay open to everyone (ls, pg_ctl's stat of PG_VERSION)
        assert "postmaster.pid" in os.listdir(gp) and os.stat(gp / relpath).st_size > 0

        # the backup tool while the server runs: the stored bytes only
        tar_path = work / "backup.tar"
        t = pg.root(TAR, "-C", str(work), "-cf", str(tar_path), "data")
        assert t.returncode in (0, 1), t.stderr   # 1: "file changed as we read it"
        assert "Permission denied" not in t.stderr, t.stderr
        names = tar_members_are_taka(tar_path, MARKER.encode())
        assert f"data/{relpath}" in names and "data/postmaster.pid" in names

        # restart (stop + start) and stop, as the unit does: the rows come back
        r = pg.ctl("restart")
        assert r.returncode == 0, f"restart: {r.stdout}\n{r.stderr}\n{pg.logtext()}"
        assert _rows(pg) == ROWS

        # a crash leaves a stale postmaster.pid; the unit's start still works: the
        # server replaces the stale file itself (pg_ctlcluster's own unlink is denied)
        pg.crash()
        assert (gp / "postmaster.pid").exists()
        r = pg.ctl("start")
        assert r.returncode == 0, f"start after crash: {r.stdout}\n{r.stderr}\n{pg.logtext()}"
        assert _rows(pg) == ROWS

        r = pg.ctl("stop", "-m", "fast")
        assert r.returncode == 0, f"stop: {r.stdout}\n{r.stderr}\n{pg.logtext()}"
        assert not pg.running()
        r = pg.ctl("status")
        assert r.returncode == 3 and "no server running" in r.stdout, r.stdout + r.stderr
        assert "down" in pg.lsclusters()
    except AssertionError as e:
        audit = work / "audit.jsonl"
        tail = audit.read_text()[-3000:] if audit.exists() else ""
        log = daemon.logtext()[-3000:] if daemon else ""
        raise AssertionError(f"{e}\n--- takakryptd log (tail) ---\n{log}"
                             f"\n--- audit (tail) ---\n{tail}") from e
    finally:
        if pg.running() and pg.ctl("stop", "-m", "immediate").returncode != 0:
            pg.kill()
        if daemon:
            daemon.stop()
    assert not fuse_mounted(gp)
    _check_audit_and_disk(work, gp, relpath, probe_pid)


def _check_audit_and_disk(work: Path, gp: Path, relpath: str, probe_pid: int) -> None:
    # the audit trail: Debian's tools and the server were never denied; the probes were
    events = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
    access = [e for e in events if e.get("kind") == "access"]
    tools = (str(PGBIN / "postgres"), str(PGBIN / "pg_ctl"), PERL)
    denied = [e for e in access if e["decision"] != "permit" and e["exe"] in tools
              and e["pid"] != probe_pid]
    # ... except pg_ctlcluster removing the stale lock file after the crash
    stale = [e for e in denied if e["exe"] == PERL and e["operation"] == "delete"
             and e["path"] == str(gp / "postmaster.pid")]
    assert stale and [e for e in denied if e not in stale] == [], denied[:5]
    assert any(e["exe"] == PERL and e["pid"] == probe_pid and e["decision"] == "deny"
               for e in access)
    assert any(e["exe"] == CAT and e["decision"] == "deny"
               and e["path"] == str(gp / "postmaster.pid") for e in access)
    tar_ev = [e for e in access if e["exe"] == TAR]
    assert tar_ev and all(e["decision"] == "permit" and e["key"] is None for e in tar_ev)

    # at rest (unmounted): every file is TAKA, the rows are in the relation file
    seen_in = files_at_rest(gp, work / "keystore.json", work / "master.key", MARKER.encode())
    assert relpath in seen_in, seen_in


def test_docs_show_the_shipped_policy():
    """docs/policy.md, worked example 1, is the shipped file's policy part."""
    text = (ROOT / "docs" / "policy.md").read_text()
    section = text.split("### 1. ", 1)[1].split("\n### 2. ", 1)[0]
    block = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    shipped = yaml.safe_load(SHIPPED.read_text())
    for key in ("user_sets", "process_sets", "resource_sets", "policies", "guard_points"):
        assert block[key] == shipped[key], key


def _vm_missing() -> list[str]:
    from vmharness import missing
    return missing(systemd=True)


SYSTEMD_GUEST = ("pg_debian_guest.py", 1200, "1G")


@pytest.mark.slow
@pytest.mark.vm
@needs_debian_pg
@pytest.mark.skipif(bool(_vm_missing()), reason="VM tooling absent: " + ", ".join(_vm_missing()))
def test_postgresql_unit_under_systemd(systemd_guest):
    """``systemctl start|stop postgresql@15-NAME`` (Debian's unit, under systemd as PID 1
    in a VM) on a guard point under the shipped policy (guest: pg_debian_guest.py)."""
    from vmharness import result_of
    r = result_of(systemd_guest[__name__])
    assert "error" not in r, r["error"]
    why = json.dumps({k: v for k, v in r.items() if k not in ("journal", "pg_log")},
                     indent=1) + "\n" + r.get("journal", "") + "\n" + r.get("pg_log", "")
    assert r["start_rc"] == 0 and r["active"] == "active", why
    assert r["main_exe"] == str(PGBIN / "postgres"), why   # PIDFile= found the postmaster
    assert r["rows"] == ["takakrypt-pgdeb-unit-marker"], why
    assert r["status_rc"] == 0 and "server is running" in r["status_out"], why
    assert "online" in r["lsclusters"], why
    assert r["cat_rc"] != 0 and "Permission denied" in r["cat_err"], why
    assert r["stop_rc"] == 0 and r["active_after_stop"] == "inactive", why
    assert not r["server_left"], why
    # nothing of Debian's tooling or the server was denied; cat was
    assert [d["exe"] for d in r["denied"]] == [CAT], why
