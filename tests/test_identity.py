"""Process identity that a caller cannot forge (issue 14, items 3, 3a, 3b): names and
argv do not make a database, a rewritten binary does not keep its cached signature, a
binary its caller can rewrite is not trusted, the calling *thread* is identified (also
after the main thread exited), unidentifiable and traced callers get no plaintext."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from takakrypt import config, policy, procinfo
from takakrypt.errors import ConfigError

SLEEP = os.path.realpath(shutil.which("sleep"))
NOBODY = 65534


def _engine(doc, hasher=None):
    return policy.Engine(config.loads(yaml.safe_dump(doc)), hasher=hasher)


def _req(p, uid=None, action="read"):
    uid = p.uid if uid is None else uid
    return policy.Request(uid=uid, gid=uid, groups=(), process=p, path="f", action=action)


def _wait_for(pid, ok):
    """inspect(pid) once ``ok`` holds for it (Popen may return before the exec)."""
    p = procinfo.inspect(pid)
    for _ in range(2000):
        if ok(p):
            return p
        threading.Event().wait(0.005)
        p = procinfo.inspect(pid)
    raise AssertionError(f"process {pid} never reached the expected state: {p}")


@contextlib.contextmanager
def _child(argv, **kw):
    c = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, **kw)
    try:
        yield c
    finally:
        c.kill()
        c.wait()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "takakrypt", *args], capture_output=True,
                          text=True, timeout=60)


# 3: a name or argv[0] is chosen by the caller ----------------------------------------------

def test_exec_a_postgres_is_not_a_postgres_process():
    with _child(["bash", "-c", "exec -a postgres sleep 30"]) as c:
        p = _wait_for(c.pid, lambda p: p.exe == SLEEP and p.cmdline[:1] == ("postgres",))
        assert p.database is None and p.comm == "sleep"
        eng = _engine({"process_sets": {"pg": {"executables": ["/**"],
                                               "databases": ["postgres"]}},
                       "policies": {"p": {"rules": [
                           {"process_set": "pg", "actions": ["all_ops"],
                            "effects": ["permit", "apply_key"]}]}}})
        d = eng.evaluate("p", _req(p), explain=True)
        assert not d.permit and "database type none" in " ".join(d.explanation)


def _with_keys(doc, tmp_path):
    """``doc`` with usable key credentials: `config check` checks what takakryptd needs."""
    from takakrypt.keys import generate_master_key_file, open_keystore

    mk = tmp_path / "master.key"
    if not mk.exists():
        generate_master_key_file(str(mk))
        with open_keystore(str(tmp_path / "ks.json"), master_key_file=str(mk), create=True):
            pass
    return doc | {"keys": {"local": {"path": str(tmp_path / "ks.json"),
                                     "master_key_file": str(mk)}}}


@pytest.mark.parametrize("crit", [{"names": ["postgres"]}, {"databases": ["postgres"]},
                                  {"names": ["postgres"], "databases": ["postgres"]}])
def test_a_name_alone_never_grants(tmp_path, crit):
    doc = {"process_sets": {"pg": crit}, "policies": {"p": {"rules": [
        {"process_set": "pg", "actions": ["all_ops"], "effects": ["permit", "apply_key"]}]}}}
    with pytest.raises(ConfigError, match=r"rules\[0\]\.process_set.*only by"):
        config.loads(yaml.safe_dump(doc))
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_with_keys(doc, tmp_path)))
    r = _cli("config", "check", str(f))
    assert r.returncode == 3 and "which the caller chooses" in r.stderr, r.stderr
    # with an executable it is a filter on top of the path, and accepted
    doc["process_sets"]["pg"]["executables"] = ["/usr/lib/postgresql/*/bin/postgres"]
    f.write_text(yaml.safe_dump(_with_keys(doc, tmp_path)))
    assert _cli("config", "check", "--strict", str(f)).returncode == 0


def test_config_check_warns_on_name_only_exclusions_and_strict_refuses(tmp_path):
    doc = {"process_sets": {"sh": {"names": ["bash"]}}, "policies": {"p": {"rules": [
        {"process_set": "sh", "actions": ["all_ops"], "effects": ["deny"]},
        {"process_set": "!sh", "actions": ["read"], "effects": ["permit"]}]}}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_with_keys(doc, tmp_path)))
    r = _cli("config", "check", str(f))
    assert r.returncode == 0, r.stderr
    warns = [x for x in r.stderr.splitlines() if "WARNING" in x]
    assert len(warns) == 2 and "rules[0]" in warns[0] and "rules[1]" in warns[1], r.stderr
    r = _cli("config", "check", "--strict", str(f))
    assert r.returncode == 3 and "rules[0].process_set" in r.stderr, r.stderr


# 3a: the hash cache ------------------------------------------------------------------------

def _patch_same_size(path):
    """Change one byte of a string in the binary: same size, still runs, other hash."""
    data = bytearray(path.read_bytes())
    at = data.find(b"Usage")
    assert at > 0
    data[at] ^= 0x20
    st = os.stat(path)
    with open(path, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("racy", [None, 0.0], ids=["default", "ctime-key"])
def test_in_place_overwrite_with_restored_mtime_loses_the_signature(tmp_path, racy):
    tool = tmp_path / "md5sum"
    shutil.copy2(shutil.which("md5sum"), tool)
    digest = hashlib.sha256(tool.read_bytes()).hexdigest()
    hasher = procinfo.ExeHasher() if racy is None else procinfo.ExeHasher(racy_ctime=racy)
    eng = _engine({"process_sets": {"signed": {"executables": [str(tmp_path) + "/*"],
                                               "sha256": [digest]}},
                   "policies": {"p": {"rules": [
                       {"process_set": "signed", "actions": ["all_ops"],
                        "effects": ["permit", "apply_key"]}]}}}, hasher)
    with _child([str(tool)]) as c:  # md5sum of stdin: runs until stdin closes
        p = _wait_for(c.pid, lambda p: p.exe == str(tool))
        assert eng.evaluate("p", _req(p)).apply_key
    _patch_same_size(tool)
    with _child([str(tool)]) as c:
        p = _wait_for(c.pid, lambda p: p.exe == str(tool))
        d = eng.evaluate("p", _req(p), explain=True)
        assert not d.permit, "a binary rewritten in place kept its cached signature"
        assert "does not match" in " ".join(d.explanation)


def test_hasher_does_not_cache_a_freshly_changed_binary(tmp_path):
    tool = tmp_path / "true"
    shutil.copy(shutil.which("true"), tool)
    h = procinfo.ExeHasher()  # the copy's ctime is now: within RACY_CTIME
    p = procinfo.Process(pid=0, start_time=1, exe=str(tool), comm="true",
                         exe_id=procinfo.file_identity(str(tool)))
    assert h.sha256(p) == h.sha256(p) == hashlib.sha256(tool.read_bytes()).hexdigest()
    assert h.hashes == 2


def test_hasher_refuses_an_identity_that_changed(tmp_path):
    tool = tmp_path / "true"
    shutil.copy(shutil.which("true"), tool)
    h = procinfo.ExeHasher(racy_ctime=0)
    stale = procinfo.file_identity(str(tool))
    os.chmod(tool, 0o700)  # changes the ctime only
    p = procinfo.Process(pid=0, start_time=1, exe=str(tool), comm="true", exe_id=stale)
    assert h.sha256(p) is None and h.hashes == 0


def _signed_engine(tmp_path, tool):
    digest = hashlib.sha256(tool.read_bytes()).hexdigest()
    return _engine({"process_sets": {"signed": {"executables": [str(tmp_path) + "/**"],
                                                "sha256": [digest]}},
                    "policies": {"p": {"rules": [
                        {"process_set": "signed", "actions": ["all_ops"],
                         "effects": ["permit", "apply_key"]}]}}})


def test_a_binary_its_caller_can_rewrite_is_not_trusted(wtmp):
    tmp_path = wtmp  # other users can reach it
    tool = tmp_path / "bin" / "md5sum"
    tool.parent.mkdir()
    shutil.copy(shutil.which("md5sum"), tool)
    eng = _signed_engine(tmp_path, tool)
    # described (policy check, as the CLI does): read afresh after every change
    def described():
        return procinfo.Process(pid=0, start_time=1, exe=str(tool), comm="md5sum",
                                exe_id=procinfo.file_identity(str(tool)))

    assert eng.evaluate("p", _req(described(), uid=1000)).permit
    os.chmod(tool, 0o757)
    d = eng.evaluate("p", _req(described(), uid=1000), explain=True)
    assert not d.permit and "modified by the caller" in " ".join(d.explanation)
    os.chown(tool, 0, 4242)
    os.chmod(tool, 0o775)  # group-writable: for members of group 4242 only
    assert not eng.evaluate("p", _req(described(), uid=4242)).permit
    assert eng.evaluate("p", _req(described(), uid=1000)).permit
    os.chmod(tool, 0o755)
    # running as its owner
    os.chown(tool, NOBODY, NOBODY)
    with _child([str(tool)], user=NOBODY, group=NOBODY) as c:
        p = _wait_for(c.pid, lambda p: p.exe == str(tool) and p.uid == NOBODY)
        d = eng.evaluate("p", _req(p), explain=True)
        assert not d.permit and "modified by the caller" in " ".join(d.explanation)
    os.chown(tool, 0, 0)  # root's binary, run by nobody: trusted
    with _child([str(tool)], user=NOBODY, group=NOBODY) as c:
        p = _wait_for(c.pid, lambda p: p.exe == str(tool) and p.uid == NOBODY)
        assert eng.evaluate("p", _req(p)).apply_key


# 3b: the calling thread, unidentified and traced callers -----------------------------------

HELPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

static pid_t leader;
static const char *target;

static void *worker(void *arg) {
    (void)arg;
    char link[64], buf[256];
    snprintf(link, sizeof link, "/proc/%d/exe", (int)leader);
    /* wait until the main thread is gone: its exe link then no longer resolves */
    for (int i = 0; i < 100000 && readlink(link, buf, sizeof buf) >= 0; i++) usleep(1000);
    printf("tid %ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    if (!target) {
        pause();
        return NULL;
    }
    int fd = open(target, O_RDONLY);
    if (fd < 0) {
        printf("open: %s\n", strerror(errno));
    } else {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n < 0) printf("read: %s\n", strerror(errno));
        else printf("read: %.*s\n", (int)n, buf);
    }
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t t;
    leader = getpid();
    target = argc > 1 ? argv[1] : NULL;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);  /* the process lives on in its worker */
}
"""


def _compile(tmp_path_factory, name, source):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    d = tmp_path_factory.mktemp("helper")
    os.chmod(d, 0o755)
    (d / f"{name}.c").write_text(source)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / name), str(d / f"{name}.c")],
                   check=True, timeout=120)
    return str(d / name)


@pytest.fixture(scope="module")
def orphan_helper(tmp_path_factory):
    return _compile(tmp_path_factory, "orphan", HELPER_C)


def test_inspect_identifies_a_thread_whose_main_thread_exited(orphan_helper):
    with _child([orphan_helper], text=True) as c:
        line = c.stdout.readline()
        assert line.startswith("tid "), line
        tid = int(line.split()[1])
        assert tid != c.pid
        p = procinfo.inspect(tid)
        assert p.pid == c.pid and p.exe == orphan_helper and p.exe_id is not None
        assert p.tid == tid
        assert p.exe_id[:2] == procinfo.file_identity(orphan_helper)[:2]
        assert p.start_time == procinfo.start_time_of(c.pid)
        # the leader itself has no executable any more: it is not a caller we can name
        assert procinfo.inspect(c.pid).exe == ""
        eng = _engine({"process_sets": {"h": {"executables": [orphan_helper]}},
                       "policies": {"p": {"rules": [
                           {"process_set": "!h", "actions": ["all_ops"],
                            "effects": ["permit", "apply_key"]}]}}})
        assert not eng.evaluate("p", _req(p)).permit
        assert not eng.evaluate("p", _req(procinfo.inspect(c.pid))).permit


def test_a_caller_without_executable_is_denied_whatever_the_policy():
    eng = _engine({"policies": {"p": {"rules": [
        {"actions": ["all_ops"], "effects": ["permit", "apply_key"]}]}}})
    kthreadd = procinfo.inspect(2)
    assert kthreadd.exe == "" and kthreadd.exe_id is None
    d = eng.evaluate("p", _req(kthreadd), explain=True)
    assert not d.permit and d.cache_ttl == 0 and "cannot be identified" in d.explanation[0]
    learn = _engine({"policies": {"p": {"learn_mode": True, "rules": [
        {"actions": ["read"], "effects": ["deny"]}]}}})
    assert not learn.evaluate("p", _req(kthreadd)).permit


TRACED = ("import ctypes, sys, time; ctypes.CDLL(None).ptrace(0, 0, 0, 0); "
          "print('traced', flush=True); time.sleep(30)")


def test_a_traced_caller_gets_no_plaintext():
    eng = _engine({"policies": {"p": {"rules": [
        {"actions": ["read"], "effects": ["permit", "apply_key"]},
        {"actions": ["getattr"], "effects": ["permit"]}]}}})
    with _child([sys.executable, "-c", TRACED], text=True) as c:  # PTRACE_TRACEME: we trace
        assert c.stdout.readline().strip() == "traced"
        p = procinfo.inspect(c.pid)
        d = eng.evaluate("p", _req(p), explain=True)
        assert not d.permit and "traced by pid" in d.explanation[0]
        assert p.tracer == os.getpid()
        assert eng.evaluate("p", _req(p, action="getattr")).permit  # no plaintext in it
    with _child([SLEEP, "30"]) as c:
        p = _wait_for(c.pid, lambda p: p.exe == SLEEP)
        assert p.tracer == 0 and eng.evaluate("p", _req(p)).apply_key


# 3b through the agent and a real guard point --------------------------------------------

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs root, /dev/fuse, fusermount3")


@needs_fuse
@pytest.mark.parametrize("shape", ["negated-set", "deny-rule"])
def test_worker_of_an_exited_main_thread_is_denied_by_the_guard_point(tmp_path, orphan_helper,
                                                                       shape):
    from agent_helpers import base_config, running

    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir()
    cfg["process_sets"] = {"orphan": {"executables": [orphan_helper]}}
    rules = {"negated-set": [
        {"process_set": "!orphan", "actions": ["all_ops"], "effects": ["permit", "apply_key"]}],
        "deny-rule": [
        {"process_set": "orphan", "actions": ["all_ops"], "effects": ["deny", "audit"]},
        {"actions": ["all_ops"], "effects": ["permit", "apply_key", "audit"]}]}[shape]
    cfg["policies"] = {"gp": {"rules": rules}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "gp", "key": "k1"}]
    with running(tmp_path, cfg):
        (gp / "memo.txt").write_text("BOARD-MEMO-CONFIDENTIAL\n")
        assert (gp / "memo.txt").read_text() == "BOARD-MEMO-CONFIDENTIAL\n"
        r = subprocess.run([orphan_helper, str(gp / "memo.txt")], capture_output=True,
                           text=True, timeout=60)
        assert r.stdout.startswith("tid "), r
        assert "open: Permission denied" in r.stdout, r.stdout
        assert "BOARD-MEMO" not in r.stdout


def test_agent_denies_a_caller_running_another_executable(tmp_path):
    from agent_helpers import base_config, write_config

    from takakrypt.agent.daemon import Agent

    cfg = base_config(tmp_path)
    cfg["policies"] = {"p": {"rules": [
        {"actions": ["all_ops"], "effects": ["permit", "apply_key"]}]}}
    write_config(tmp_path / "c.yaml", cfg)
    agent = Agent(str(tmp_path / "c.yaml"))
    me = procinfo.inspect(threading.get_native_id())
    assert me.exe_id is not None
    ok = agent.decide("p", 0, 0, me.tid, "f", "read", exe=me.exe_id[:2])
    assert ok.permit and ok.apply_key
    d = agent.decide("p", 0, 0, me.tid, "f", "read", exe=(me.exe_id[0], me.exe_id[1] + 1))
    assert not d.permit and d.cache_ttl == 0
    # a process-free policy does not make an unidentifiable caller acceptable
    d = agent.decide("p", 0, 0, 2, "f", "read")  # kthreadd: no executable
    assert not d.permit and d.cache_ttl == 0


def _signed_tool_config(tmp_path, tool):
    """takakryptd's configuration: plaintext for ``tool`` as it is now (sha256) and for
    this Python (the test writes the file), EACCES for everything else."""
    from agent_helpers import base_config

    cfg = base_config(tmp_path)
    gp = tmp_path / "guarded"
    gp.mkdir()
    cfg["process_sets"] = {
        "signed": {"executables": [str(tool)],
                   "sha256": [hashlib.sha256(tool.read_bytes()).hexdigest()]},
        "writer": {"executables": [os.path.realpath(sys.executable)]}}
    cfg["policies"] = {"gp": {"rules": [
        {"process_set": "signed", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"process_set": "writer", "actions": ["all_ops"], "effects": ["permit", "apply_key"]},
        {"actions": ["all_ops"], "effects": ["deny", "audit"]}]}}
    cfg["guard_points"] = [{"path": str(gp), "policy": "gp", "key": "k1"}]
    return cfg, gp


@needs_fuse
def test_a_signed_tool_rewritten_in_place_is_denied_by_the_guard_point(tmp_path):
    from agent_helpers import running

    tool = tmp_path / "bin" / "cat"
    tool.parent.mkdir()
    shutil.copy2(os.path.realpath(shutil.which("cat")), tool)
    cfg, gp = _signed_tool_config(tmp_path, tool)
    with running(tmp_path, cfg):
        (gp / "memo.txt").write_text("TOP-SECRET\n")
        r = subprocess.run([str(tool), str(gp / "memo.txt")], capture_output=True, timeout=60)
        assert r.stdout == b"TOP-SECRET\n", r
        _patch_same_size(tool)
        r = subprocess.run([str(tool), str(gp / "memo.txt")], capture_output=True, timeout=60)
        assert r.returncode != 0 and b"Permission denied" in r.stderr, r
        assert b"TOP-SECRET" not in r.stdout


CHAIN_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {  /* print FILE's first line (or the error), exec the rest */
    char buf[128] = {0};
    FILE *f = fopen(argv[1], "r");
    if (!f) printf("MARKER-ORIGINAL open: %s\n", strerror(errno));
    else if (!fgets(buf, sizeof buf, f)) printf("MARKER-ORIGINAL read: %s\n", strerror(errno));
    else printf("MARKER-ORIGINAL %s", buf);
    fflush(stdout);
    if (argc > 2) execv(argv[2], argv + 2);
    return 0;
}
"""


@needs_fuse
def test_the_same_process_exec_ing_a_rewritten_binary_loses_its_cached_permit(
        tmp_path, tmp_path_factory):
    # the decision caches (the engine's and the agent's) key on pid, start time and the
    # executable: an exec keeps pid and start time, an in-place rewrite keeps device and
    # inode.  Root is the caller here: it may rewrite the binary (a sha256 set trusts
    # no binary a non-root caller can rewrite).
    from agent_helpers import running

    tool = tmp_path / "tool"
    shutil.copy2(_compile(tmp_path_factory, "chain", CHAIN_C), tool)
    cfg, gp = _signed_tool_config(tmp_path, tool)
    memo = str(gp / "memo.txt")
    rewrite = (f"{os.path.realpath(sys.executable)} -c \"import os; p = {str(tool)!r}; "
               "st = os.stat(p); d = open(p, 'rb').read().replace(b'MARKER-ORIGINAL', "
               "b'MARKER-REWRITTE'); open(p, 'r+b').write(d); "
               "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))\"")
    with running(tmp_path, cfg):
        (gp / "memo.txt").write_text("TOP-SECRET\n")
        # one pid: tool reads, execs sh, which rewrites tool in place and execs it again
        r = subprocess.run([str(tool), memo, "/bin/sh", "-c", f"{rewrite} && exec {tool} {memo}"],
                           capture_output=True, text=True, timeout=60)
        first, second = r.stdout.splitlines()
        assert first == "MARKER-ORIGINAL TOP-SECRET", r
        assert second == "MARKER-REWRITTE open: Permission denied", r
