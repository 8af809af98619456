"""Guest side of tests/test_pg_debian.py::test_postgresql_unit_under_systemd.

Runs inside a VM whose PID 1 is systemd (booted as tests/test_systemd_unit.py boots
it).  Makes a cluster with pg_createcluster, encrypts it in place, serves it with a
takakryptd under packaging/postgresql-debian.yaml, and drives it with Debian's own
unit: ``systemctl start|stop postgresql@15-NAME``.  What it saw goes to OUT/result.json;
the host side asserts.

usage: python pg_debian_guest.py TREE OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TREE, OUT = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(TREE / "src"))
sys.path.insert(0, str(TREE / "tests"))
# this tree's takakrypt for the children too (xform, takakryptd)
os.environ["PYTHONPATH"] = str(TREE / "src")

from agent_helpers import Daemon  # noqa: E402
from pg_helpers import ENV, DebianCluster, gid, shipped_config, uid  # noqa: E402
from systemd_unit_guest import guest_main  # noqa: E402

MARKER = "takakrypt-pgdeb-unit-marker"


def sh(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=ENV)


def run(r: dict) -> None:
    sh("modprobe", "fuse")
    work = Path(tempfile.mkdtemp(prefix="tk-pgdeb-", dir="/tmp"))
    os.chmod(work, 0o755)
    gp, sock = work / "data", work / "sock"
    for d in (gp, sock):
        d.mkdir(mode=0o700)
        os.chown(d, uid("postgres"), gid("postgres"))
    pg = DebianCluster(work, gp, sock)
    pg.create()
    cfg = shipped_config(work, gp)
    pg.xform(work)
    daemon = Daemon(work, cfg)
    try:
        daemon.wait_for("READY=1", timeout=300)
        unit = f"postgresql@15-{pg.name}.service"
        r["unit"] = unit
        start = sh("systemctl", "start", unit)
        r["start_rc"], r["start_err"] = start.returncode, start.stderr[-2000:]
        r["active"] = sh("systemctl", "is-active", unit).stdout.strip()
        r["main_pid"] = int(sh("systemctl", "show", "-P", "MainPID", unit).stdout.strip() or 0)
        r["main_exe"] = os.path.realpath(f"/proc/{r['main_pid']}/exe") if r["main_pid"] else ""
        try:
            pg.psql("CREATE TABLE tk_unit (v text)")
            pg.psql(f"INSERT INTO tk_unit VALUES ('{MARKER}')")
            r["rows"] = pg.psql("SELECT v FROM tk_unit").split()
        except AssertionError as e:
            r["psql_error"] = str(e)[-2000:]
        st = pg.ctl("status")
        r["status_rc"], r["status_out"] = st.returncode, st.stdout[-1000:]
        r["lsclusters"] = pg.lsclusters()
        cat = sh("cat", str(gp / "postmaster.pid"))
        r["cat_rc"], r["cat_err"] = cat.returncode, cat.stderr.strip()
        stop = sh("systemctl", "stop", unit)
        r["stop_rc"], r["stop_err"] = stop.returncode, stop.stderr[-2000:]
        r["active_after_stop"] = sh("systemctl", "is-active", unit).stdout.strip()
        r["server_left"] = pg.running()
        r["journal"] = sh("journalctl", "--no-pager", "-n", "60", "-u", unit).stdout[-5000:]
        r["pg_log"] = pg.logtext()
    finally:
        if pg.running():
            pg.kill()
        daemon.stop()
    events = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
    r["denied"] = [{k: e[k] for k in ("exe", "user", "path", "operation")}
                   for e in events if e.get("kind") == "access" and e["decision"] != "permit"]


if __name__ == "__main__":
    sys.exit(guest_main(run))
