"""Shared by the PostgreSQL end-to-end tests (the FUSE engine's on the host, the kernel
engine's in the VM, and the guest sides of the systemd ones): a cluster run with the
server's own commands (initdb, postgres, psql, pgbench) under a deployment's policy, a
Debian cluster driven with postgresql-common's commands, and what tar and the disk
hold."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
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


def mount_type(path: Path) -> str | None:
    """The file system type of the (topmost) mount at ``path``; None when none is."""
    out = None
    with open("/proc/mounts") as f:
        for line in f:
            if line.split()[1] == str(path):
                out = line.split()[2]
    return out


def postgres_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here (None when they can)."""
    if not (PGBIN / "postgres").exists() or not (PGBIN / "pgbench").exists() \
            or not has_user("postgres"):
        return f"needs postgresql-15 ({PGBIN}: postgres, pgbench) and the postgres user"
    return None


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


# --- a cluster run with the server's own commands, under a deployment's policy -----------

TAR = os.path.realpath(shutil.which("tar") or "/usr/bin/tar")
CAT = os.path.realpath(shutil.which("cat") or "/bin/cat")
MARKER = "takakrypt-e2e-marker-7f3a9c"
ROWS = [(i, f"{MARKER}-row-{i:04d}-" + "x" * (i % 37)) for i in range(1, 301)]
# what e2e_rows holds after write_rows: the updates applied, the deleted rows gone
WANT_ROWS = [(i, v + ("-upd" if i % 10 == 0 else "")) for i, v in ROWS if i <= 290]


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

    def initdb(self, timeout: float = 300) -> None:
        r = self.run(str(PGBIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                     "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-instructions",
                     timeout=timeout)
        assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"

    def start(self, *settings: str, tries: int = 600) -> None:
        """Start the postmaster (``settings``: more "name=value"s) and wait until it
        accepts connections, at most ``tries`` times pg_isready."""
        assert self.server is None
        log = open(self.sock / "server.log", "ab")
        extra = [x for kv in settings for x in ("-c", kv)]
        self.server = subprocess.Popen(
            [str(PGBIN / "postgres"), "-D", str(self.data), "-c", "listen_addresses=",
             "-c", f"unix_socket_directories={self.sock}", "-c", "fsync=on",
             "-c", "max_wal_size=64MB", "-c", "logging_collector=off", *extra],
            stdout=log, stderr=subprocess.STDOUT, user="postgres", group="postgres",
            extra_groups=[], env=self.env, cwd=str(self.sock))
        log.close()
        # wait until it accepts connections (bounded; not a timed assertion)
        for _ in range(tries):
            if self.server.poll() is not None:
                raise AssertionError(f"postgres exited {self.server.returncode}:\n"
                                     f"{self.logtext()}")
            r = self.run("pg_isready", "-q", "-t", "1", timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"postgres did not become ready:\n{self.logtext()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 120) -> int:
        """Fast shutdown (SIGINT) of the postmaster we started; waits for it."""
        p, self.server = self.server, None
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGQUIT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return p.returncode

    def psql(self, sql: str, timeout: float = 120) -> str:
        r = self.run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql, timeout=timeout)
        assert r.returncode == 0, f"psql {sql!r}: {r.stderr}\n{self.logtext()}"
        return r.stdout

    def logtext(self) -> str:
        try:
            return (self.sock / "server.log").read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def write_rows(self) -> str:
        """Table e2e_rows with the marker in every row: inserted, some updated, some
        deleted, checkpointed; returns its relation file (below the data directory)."""
        self.psql("CREATE TABLE e2e_rows (id int PRIMARY KEY, v text NOT NULL)")
        values = ",".join(f"({i}, '{v}')" for i, v in ROWS)
        self.psql(f"INSERT INTO e2e_rows VALUES {values}")
        self.psql("UPDATE e2e_rows SET v = v || '-upd' WHERE id % 10 = 0")
        self.psql("DELETE FROM e2e_rows WHERE id > 290")
        self.psql("CHECKPOINT")
        relpath = self.psql("SELECT pg_relation_filepath('e2e_rows')").strip()
        assert relpath.startswith("base/"), relpath
        return relpath

    def read_rows(self) -> list[tuple[int, str]]:
        return [(int(i), v) for i, v in (line.split("|", 1) for line in
                self.psql("SELECT id, v FROM e2e_rows ORDER BY id").splitlines())]


def pgbench_counts(out: str) -> tuple[int, int]:
    """(transactions processed, failed transactions) from pgbench's summary."""
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert done, out
    return int(done.group(1)), int(failed.group(1)) if failed else 0


def policy_config(work: Path, gp: Path, *, engine: str | None = None,
                  sha256: bool = False) -> dict:
    """A deployment's policy for a cluster on guard point ``gp``: the PostgreSQL server
    and initdb run by the postgres user get plaintext (``sha256``: only binaries with
    today's SHA-256 too), tar the stored bytes (audited), everybody may stat and list,
    everything else is denied (audited).  ``engine``: the guard point's (None: the
    default, FUSE)."""
    cfg = base_config(work)
    cfg["agent"]["log_level"] = "debug" if os.environ.get("TK_E2E_KEEP") else "info"
    cfg["user_sets"] = {"postgres": {"users": ["postgres"]}}
    # initdb writes the configuration files and runs postgres --boot/--single;
    # the server (postmaster and every backend) is /usr/lib/postgresql/15/bin/postgres
    server: dict = {"executables": [str(PGBIN / "postgres"), str(PGBIN / "initdb")]}
    if sha256:
        server["sha256"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest()
                            for p in server["executables"]]
    cfg["process_sets"] = {"pg_server": server, "backup": {"executables": [TAR]}}
    cfg["policies"] = {"pgdata": {"rules": [
        {"user_set": "postgres", "process_set": "pg_server", "actions": ["all_ops"],
         "effects": ["permit", "apply_key"]},
        {"process_set": "backup", "actions": ["read_ops"], "effects": ["permit", "audit"]},
        {"actions": ["getattr", "list"], "effects": ["permit"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]},
    ]}}
    gp_cfg = {"path": str(gp), "policy": "pgdata", "key": "k1"}
    if engine is not None:
        gp_cfg["engine"] = engine
    cfg["guard_points"] = [gp_cfg]
    return cfg


@contextlib.contextmanager
def pg_workdir(prefix: str = "tk-e2e-pg-") -> Iterator[Path]:
    """A 0755 directory in /tmp (/tmp/pytest-of-root is 0700: the postgres user could not
    reach a cluster there), removed afterwards unless a guard point is still mounted on
    its pgdata or TK_E2E_KEEP is set."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if mount_type(d / "pgdata") is None and not os.environ.get("TK_E2E_KEEP"):
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


def outsiders_denied(pg: Cluster, gp: Path, relpath: str) -> None:
    """Root's cat (outside the policy) gets EACCES on a relation file and on PG_VERSION,
    so does the postgres user with a program that is not the server; listing and stat
    are allowed to everyone."""
    for rel in (relpath, "PG_VERSION"):
        c = subprocess.run([CAT, str(gp / rel)], capture_output=True, timeout=60)
        assert c.returncode != 0 and b"Permission denied" in c.stderr, (rel, c)
        assert MARKER.encode() not in c.stdout
    c = pg.run(CAT, str(gp / "PG_VERSION"))
    assert c.returncode != 0 and "Permission denied" in c.stderr, c
    assert "PG_VERSION" in os.listdir(gp)
    assert os.stat(gp / relpath).st_size > 0


def tar_guard_point(work: Path, name: str = "pgdata", live: bool = False) -> Path:
    """The backup tool's archive of ``work/name`` (through the guard point); ``live``:
    the server runs, so tar's "file changed as we read it" (exit 1) is allowed."""
    tar_path = work / "backup.tar"
    t = subprocess.run([TAR, "-C", str(work), "-cf", str(tar_path), name],
                       capture_output=True, text=True, timeout=600)
    assert t.returncode in ((0, 1) if live else (0,)), t.stderr
    assert "Permission denied" not in t.stderr, t.stderr
    return tar_path


def audit_verdicts(work: Path, gp: Path) -> list[dict]:
    """The audit trail's judgement: root's cat denied on PG_VERSION, tar permitted
    without the key, the server itself never denied anything (the policy is enough to
    run PostgreSQL), no integrity failure; returns the access events."""
    events = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
    access = [e for e in events if e.get("kind") == "access"]
    assert any(e["exe"] == CAT and e["decision"] == "deny"
               and e["path"] == str(gp / "PG_VERSION") for e in access), access[-20:]
    tar_ev = [e for e in access if e["exe"] == TAR]
    assert tar_ev and all(e["decision"] == "permit" and e["key"] is None for e in tar_ev)
    pg_denied = [e for e in access if e["decision"] != "permit"
                 and e["exe"].startswith(str(PGBIN))]
    assert not pg_denied, pg_denied[:5]
    assert not [e for e in events if e.get("kind") == "integrity"]
    return access


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
