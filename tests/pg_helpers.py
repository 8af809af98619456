"""Shared by the PostgreSQL end-to-end tests (and the guest side of the systemd one):
a Debian cluster driven with postgresql-common's commands, and what tar and the disk
hold."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from agent_helpers import base_config, free_port
from takakrypt.cryptofile import TakaFile
from takakrypt.keys import open_keystore

SHIPPED = Path(__file__).parents[1] / "packaging" / "postgresql-debian.yaml"
PGBIN = Path("/usr/lib/postgresql/15/bin")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def fuse_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2].startswith("fuse")
                   for line in f)


def tar_members_are_taka(tar_path: Path, marker: bytes) -> list[str]:
    """Every regular file in the archive is stored TAKA bytes, the marker is nowhere;
    returns the member names."""
    nreg = 0
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            if not m.isreg():
                continue
            nreg += 1
            data = tf.extractfile(m).read()
            assert data[:4] == b"TAKA", (m.name, data[:16])
            assert len(data) >= 128, m.name
        names = tf.getnames()
    assert nreg > 100, nreg
    assert marker not in tar_path.read_bytes()
    return names


def files_at_rest(gp: Path, keystore: Path, master_key: Path, marker: bytes) -> list[str]:
    """Every regular file below ``gp`` (unmounted) is a TAKA file the keystore
    decrypts, with no marker in its stored bytes; returns the files whose plaintext
    holds the marker."""
    seen_in, count = [], 0
    with open_keystore(str(keystore), master_key_file=str(master_key)) as ks:
        for root, _dirs, files in os.walk(gp):
            for name in files:
                p = Path(root) / name
                if not p.is_file() or p.is_symlink():
                    continue
                raw = p.read_bytes()
                assert raw[:4] == b"TAKA", p
                assert marker not in raw, f"plaintext marker at rest in {p}"
                with TakaFile.open(p, ks.get) as f:
                    plain = f.read(0, f.size)
                assert len(plain) == f.size
                if marker in plain:
                    seen_in.append(str(p.relative_to(gp)))
                count += 1
        with TakaFile.open(gp / "PG_VERSION", ks.get) as f:
            assert f.read(0, 100) == b"15\n"
    assert count > 100, count
    return seen_in


def shipped_config(work: Path, gp: Path, path: Path = SHIPPED) -> dict:
    """The shipped file's sets and policies, verbatim; the agent's sockets, keys, audit
    and the guard point's path and key are this test's."""
    shipped = yaml.safe_load(path.read_text())
    cfg = base_config(work)
    for section in ("user_sets", "process_sets", "resource_sets", "policies"):
        cfg[section] = shipped[section]
    gp_cfg = dict(shipped["guard_points"][0], path=str(gp), key="k1")
    cfg["guard_points"] = [gp_cfg]
    cfg["agent"]["log_level"] = "info"
    return cfg


class DebianCluster:
    """One cluster made and driven with postgresql-common's commands."""

    def __init__(self, work: Path, data: Path, sock: Path) -> None:
        self.name = "tk" + secrets.token_hex(4)
        self.port = free_port()
        self.work, self.data, self.sock = work, data, sock
        self.log = work / "postgresql.log"
        self.created = False

    def root(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, errors="replace",
                              timeout=timeout,
                              env=ENV, cwd="/")

    def pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, errors="replace",
                              timeout=timeout,
                              user="postgres", group="postgres", extra_groups=[],
                              env=dict(ENV, HOME=str(self.sock)), cwd=str(self.sock))

    def create(self) -> None:
        r = self.root("pg_createcluster", "15", self.name, "-d", str(self.data),
                      "-s", str(self.sock), "-l", str(self.log), "-p", str(self.port),
                      "--start-conf=manual", "--locale=C.UTF-8", "-o", "fsync=on")
        self.created = r.returncode == 0 or self.created
        assert r.returncode == 0, f"pg_createcluster: {r.stdout}\n{r.stderr}"
        # the Unix socket only: no TCP port shared with anything else on the machine
        conf_d = Path("/etc/postgresql/15", self.name, "conf.d")
        (conf_d / "takakrypt-test.conf").write_text("listen_addresses = ''\n")

    def ctl(self, action: str, *opts: str) -> subprocess.CompletedProcess:
        # exactly what postgresql@.service runs (as root; pg_ctlcluster drops to postgres)
        return self.root("pg_ctlcluster", "--skip-systemctl-redirect", *opts, "15",
                         self.name, action)

    def psql(self, sql: str) -> str:
        r = self.pg(str(PGBIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                    "-h", str(self.sock), "-p", str(self.port), "-U", "postgres",
                    "-d", "postgres", "-c", sql)
        assert r.returncode == 0, f"psql {sql!r}: {r.stderr}\n{self.logtext()}"
        return r.stdout

    def lsclusters(self) -> str:
        r = self.root("pg_lsclusters", "--no-header")
        assert r.returncode == 0, r.stderr
        return next((line for line in r.stdout.splitlines()
                     if line.split()[:2] == ["15", self.name]), "")

    @property
    def pid_file(self) -> Path:
        # external_pid_file, set by pg_ctlcluster (outside the guard point)
        return Path(f"/var/run/postgresql/15-{self.name}.pid")

    def running(self) -> bool:
        return self.pid_file.exists()

    def kill(self, sig: int = signal.SIGQUIT) -> None:
        """Signal the postmaster pg_ctlcluster started and wait until it and its
        children are gone.  SIGQUIT (immediate shutdown) is the last resort when
        pg_ctlcluster cannot stop the server."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            procs = [pid, *_children(pid)]
            os.kill(pid, sig)
        except (OSError, ValueError, IndexError):
            return
        for _ in range(600):   # bounded wait, not a timed assertion
            if not any(_alive(p) for p in procs):
                break
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def crash(self) -> None:
        """SIGKILL the postmaster (power loss, OOM killer): its lock file stays."""
        self.kill(signal.SIGKILL)

    def drop(self) -> None:
        """Remove the (unmounted) data directory, then the cluster: pg_dropcluster
        would read the TAKA bytes of postgresql.auto.conf and refuse."""
        if self.created:
            shutil.rmtree(self.data, ignore_errors=True)
            r = self.root("pg_dropcluster", "--stop", "15", self.name)
            assert r.returncode == 0, f"pg_dropcluster: {r.stdout}\n{r.stderr}"

    def logtext(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def xform(self, work: Path) -> None:
        """Encrypt the (stopped, unguarded) data directory in place under key k1."""
        r = subprocess.run([sys.executable, "-m", "takakrypt", "xform", str(self.data),
                            "--key", "k1", "-q", "--keystore", str(work / "keystore.json"),
                            "--master-key-file", str(work / "master.key")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (self.data / "PG_VERSION").read_bytes()[:4] == b"TAKA"


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _alive(pid: int) -> bool:
    # a zombie counts: PostgreSQL's own check (kill(pid, 0)) takes it for a live server
    return os.path.exists(f"/proc/{pid}")


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == pid]
