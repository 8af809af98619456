"""Guest side of tests/test_restart_systemd.py: runs inside a VM whose PID 1 is systemd.

The shipped takakryptd unit (with its --fd-store) serves an in-place guard point under
a deployment's policy (PostgreSQL's server and initdb by path and SHA-256 get
plaintext); PostgreSQL 15 runs on it; pgbench (scale 10, 4 clients, back-to-back runs of
CHUNK seconds until the last event is over) runs through three `systemctl restart`s (SIGTERM: a clean handover through the fd store) and three
watchdog-style SIGKILLs of the main process (systemd's Restart=on-failure starts the
next one, which takes the connection over from the fd store and the dead one's shadow
state; this kernel has no FUSE_NOTIFY_RESEND: the request journal).  What it saw goes
to OUT/result.json; the host side asserts.

usage: python restart_guest.py TREE OUT
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TREE, OUT = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(TREE / "src"))
sys.path.insert(0, str(TREE / "tests"))
os.environ["PYTHONPATH"] = str(TREE / "src")

from agent_helpers import write_config  # noqa: E402
from systemd_unit_guest import UNIT_DIR, guest_main, unit_text  # noqa: E402
from pg_helpers import Cluster, cluster_dirs, policy_config  # noqa: E402

# pgbench runs back to back, CHUNK seconds each, until every event is over: how long
# the events take is not known beforehand (under TCG a killed agent's successor took
# 25-56 s to be active: Restart= waits 2 s, then Python starts), and one long run of a
# guessed length either ends before the last event or idles long after it
CHUNK = int(os.environ.get("TK_RESTART_CHUNK", "30"))
GAP = 7.5  # seconds of load between one new agent being active and the next event
# an event is fired only inside a run that has been going this long and has this much
# left, so that it lands among transactions in flight
LEAD, TAIL = 2.0, 5.0
EVENTS = ["restart", "kill"] * 3


def sh(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def main_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "takakryptd.service").stdout.strip()
               or 0)


class Load(threading.Thread):
    """pgbench runs one after the other until stop(); each one's result is kept."""

    def __init__(self, pg) -> None:
        super().__init__(daemon=True)
        self.pg, self.runs, self.proc, self.began = pg, [], None, 0.0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.is_set():
            with self.lock:
                self.began = time.monotonic()
                self.proc = subprocess.Popen(
                    ["pgbench", "-c", "4", "-j", "2", "-T", str(CHUNK), "-n", "-l",
                     "--log-prefix", str(self.pg.sock / "tx")],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    user="postgres", group="postgres", extra_groups=[], env=self.pg.env,
                    cwd=str(self.pg.sock))
            out, err = self.proc.communicate(timeout=CHUNK + 600)
            self.runs.append((self.proc.returncode, out, err[-3000:]))
            if self.proc.returncode:
                break

    def in_flight(self) -> bool:
        """A run is going, has been for LEAD seconds and has TAIL seconds left."""
        with self.lock:
            age = time.monotonic() - self.began
            return (self.proc is not None and self.proc.poll() is None
                    and LEAD <= age <= CHUNK - TAIL)

    def wait_in_flight(self, limit: float = 120) -> bool:
        t0 = time.monotonic()
        while not self.in_flight():
            if not self.is_alive() or time.monotonic() - t0 > limit:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self.done.set()
        self.join(CHUNK + 660)


def wait_served(old: int, r: dict, gp: Path, t0: float) -> float:
    """Wait until a new takakryptd is active; returns how long it took since t0 (the
    event: `systemctl restart` itself waits for the old one to stop)."""
    while time.monotonic() - t0 < 180:
        pid = main_pid()
        if pid and pid != old and sh("systemctl", "is-active", "takakryptd.service"
                                     ).stdout.strip() == "active":
            break
        time.sleep(0.1)
    r["devs"].append(mount_devs(gp))
    return time.monotonic() - t0


def mount_devs(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[2] for line in f if line.split()[4] == str(path)
                and "fuse.takakrypt" in line.partition(" - ")[2]]


def run(r: dict) -> None:
    sh("modprobe", "fuse")
    work = Path(tempfile.mkdtemp(prefix="tk-restart-", dir="/tmp"))
    os.chmod(work, 0o755)
    gp, sock = cluster_dirs(work)
    cfg = policy_config(work, gp, sha256=True)
    config = work / "takakrypt.yaml"
    write_config(config, cfg)
    UNIT_DIR.mkdir(parents=True, exist_ok=True)
    tree_unit = (TREE / "packaging" / "takakryptd.service").read_text()
    (UNIT_DIR / "takakryptd.service").write_text(unit_text(tree_unit, config))
    sh("systemctl", "daemon-reload")
    start = sh("systemctl", "start", "takakryptd.service")
    r["start_rc"], r["start_err"] = start.returncode, start.stderr[-2000:]
    dev = mount_devs(gp)
    r["dev"], r["devs"] = dev, []
    pg = Cluster(gp, sock)
    pg.initdb()
    pg.start()
    try:
        init = pg.run("pgbench", "-i", "-s", "10", "-q", timeout=1200)
        r["init_rc"], r["init_err"] = init.returncode, init.stderr[-2000:]
        if init.returncode:
            raise RuntimeError("pgbench -i failed (before any restart)")
        r["events"] = []
        # a client that connects while the server starts gets "FATAL: the database
        # system is starting up": only what the server logs from here on is judged
        log_from = (sock / "server.log").stat().st_size
        load = Load(pg)
        load.start()
        windows: list[tuple[float, float]] = []  # from the event until a new agent is active
        r["under_load"] = []
        try:
            for kind in EVENTS:
                time.sleep(GAP)
                r["under_load"].append(load.wait_in_flight())  # transactions in flight
                old = main_pid()
                at, t0 = time.time(), time.monotonic()
                if kind == "restart":
                    sh("systemctl", "restart", "takakryptd.service", timeout=180)
                else:  # as a watchdog timeout ends: the main process dies, systemd restarts
                    sh("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL",
                       "takakryptd.service")
                took = wait_served(old, r, gp, t0)
                r["events"].append((kind, old, round(took, 2)))
                windows.append((at, at + took))
            time.sleep(GAP)  # load on the last agent too
        finally:
            load.stop()
        r["bench_runs"] = len(load.runs)
        r["bench_rc"] = [rc for rc, _, _ in load.runs]
        r["bench_failed"] = [int(m.group(1)) if (m := re.search(
            r"number of failed transactions: (\d+)", out)) else None
            for _, out, _ in load.runs]
        r["bench_tx"] = sum(int(m.group(1)) for _, out, _ in load.runs if (m := re.search(
            r"number of transactions actually processed: (\d+)", out)))
        r["bench_out"] = load.runs[-1][1] if load.runs else ""
        r["bench_err"] = "".join(err for _, _, err in load.runs)[-3000:]
        # pgbench -l: client tx latency_us script end_s end_us
        txs = [(int(v[2]), int(v[4]) + int(v[5]) / 1e6) for f in sock.glob("tx.*")
               for v in (line.split() for line in f.read_text().splitlines()) if len(v) >= 6]
        r["worst_ms"] = max(lat for lat, _ in txs) / 1000 if txs else None
        # per event: the longest transaction overlapping it, from the event until the
        # new agent was active (the stall it caused)
        r["stall_ms"] = [max([lat / 1000 for lat, end in txs
                              if end - lat / 1e6 <= t1 and end >= t0] or [0.0])
                         for t0, t1 in windows]
        r["server_log"] = (sock / "server.log").read_text(errors="replace")[-6000:]
        text = (sock / "server.log").read_text(errors="replace")
        r["panic"] = bool(re.search(r"\bPANIC\b", text) or
                          re.search(r"\bFATAL\b", text[log_from:]))
        pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
        r["amcheck"] = int(pg.psql(
            "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'btree' AND c.relname LIKE 'pgbench%'"))
        r["accounts"] = int(pg.psql("SELECT count(*) FROM pgbench_accounts"))
    finally:
        log = (sock / "server.log").read_text(errors="replace") if (sock / "server.log").exists() else ""
        r["first_errors"] = [line for line in log.splitlines()
                             if re.search(r"\b(ERROR|PANIC|FATAL)\b", line)][:15]
        r["journal"] = sh("journalctl", "-u", "takakryptd.service", "--no-pager", "-n",
                          "80").stdout[-8000:]
        r["dmesg"] = sh("dmesg").stdout[-3000:]
        pg.stop()
        sh("systemctl", "stop", "takakryptd.service")


if __name__ == "__main__":
    sys.exit(guest_main(run))
