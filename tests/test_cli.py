"""The `takakrypt` CLI end to end, in subprocesses (exit codes, --json, no tracebacks)."""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from takakrypt import format as fmt
from takakrypt.errors import EXIT_CODES


@pytest.fixture
def env(tmp_path):
    pw = tmp_path / "pass"
    pw.write_text("correct horse battery staple\n")
    e = dict(os.environ)
    e.update(TAKAKRYPT_KEYSTORE=str(tmp_path / "ks" / "keystore.json"),
             TAKAKRYPT_PASSPHRASE_FILE=str(pw))
    e.pop("TAKAKRYPT_PASSPHRASE", None)
    return e


def tk(env, *args, ok=True, stdin=None):
    r = subprocess.run([sys.executable, "-m", "takakrypt", *args], env=env, capture_output=True,
                       stdin=stdin or subprocess.DEVNULL, timeout=120)
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    if ok:
        assert r.returncode == 0, r.stderr.decode()
    return r


def jtk(env, *args):
    return json.loads(tk(env, *args, "--json").stdout)


def _data_key(env, name, version):
    from takakrypt.keys import open_keystore
    with open(env["TAKAKRYPT_PASSPHRASE_FILE"], "rb") as f:
        pw = f.readline().strip()
    with open_keystore(env["TAKAKRYPT_KEYSTORE"], passphrase=pw) as ks:
        return bytes(ks.get(name, version))


def test_keys_lifecycle(env, tmp_path):
    info = jtk(env, "keys", "create", "db")
    assert info["name"] == "db" and info["current_version"] == 1
    assert os.stat(env["TAKAKRYPT_KEYSTORE"]).st_mode & 0o777 == 0o600
    jtk(env, "keys", "create", "share")
    names = [k["name"] for k in jtk(env, "keys", "list")]
    assert names == ["db", "share"]
    rot = jtk(env, "keys", "rotate", "db")
    assert rot["current_version"] == 2
    assert [v["version"] for v in jtk(env, "keys", "show", "db")["versions"]] == [1, 2]
    r = tk(env, "keys", "create", "db", ok=False)
    assert r.returncode == 6 and b"exists" in r.stderr
    r = tk(env, "keys", "show", "nope", ok=False)
    assert r.returncode == 6 and b"nope" in r.stderr
    # no key material in anything the CLI printed
    k1 = _data_key(env, "db", 1)
    for args in (("keys", "list"), ("keys", "show", "db"), ("keys", "list", "--json")):
        out = tk(env, *args).stdout
        assert k1.hex().encode() not in out and k1 not in out


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 5 * 1024 * 1024 + 3])
def test_encrypt_decrypt_round_trip(env, tmp_path, size):
    tk(env, "keys", "create", "k")
    src = tmp_path / "in"
    src.write_bytes(os.urandom(size))
    tk(env, "encrypt", "--key", "k", str(src), str(tmp_path / "enc"))
    enc = (tmp_path / "enc").read_bytes()
    assert enc[:4] == b"TAKA"
    assert len(enc) == fmt.stored_size(size)
    assert os.stat(tmp_path / "enc").st_mode & 0o777 == 0o600
    tk(env, "decrypt", str(tmp_path / "enc"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    info = jtk(env, "inspect", str(tmp_path / "enc"))
    assert info["plaintext_size"] == size and info["layout"] == "ok"
    assert info["key_id"] == "k" and info["key_version"] == 1


def test_encrypt_from_stdin_decrypt_to_stdout(env, tmp_path):
    tk(env, "keys", "create", "k")
    data = os.urandom(100000)
    (tmp_path / "in").write_bytes(data)
    with open(tmp_path / "in", "rb") as f:
        tk(env, "encrypt", "--key", "k", "-", str(tmp_path / "enc"), stdin=f)
    r = tk(env, "decrypt", str(tmp_path / "enc"), "-")
    assert r.stdout == data


def test_refuses_to_overwrite_without_force(env, tmp_path):
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(b"x")
    (tmp_path / "enc").write_bytes(b"keep")
    r = tk(env, "encrypt", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"), ok=False)
    assert r.returncode == 2 and (tmp_path / "enc").read_bytes() == b"keep"
    tk(env, "encrypt", "--force", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    assert (tmp_path / "enc").read_bytes()[:4] == b"TAKA"


def test_tamper_names_block_and_leaves_no_output(env, tmp_path):
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(os.urandom(10 * 4096))
    tk(env, "encrypt", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    blob = bytearray((tmp_path / "enc").read_bytes())
    blob[fmt.HEADER_SIZE + 7 * (4096 + 28) + 100] ^= 1
    (tmp_path / "enc").write_bytes(blob)
    r = tk(env, "decrypt", str(tmp_path / "enc"), str(tmp_path / "out"), ok=False)
    assert r.returncode == 5
    assert b"block 7" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if "takakrypt-tmp" in p]
    r = tk(env, "inspect", "--verify", "--json", str(tmp_path / "enc"), ok=False)
    assert r.returncode == 5 and json.loads(r.stdout)["error"] == "integrity"


def test_wrong_passphrase(env, tmp_path):
    tk(env, "keys", "create", "k")
    (tmp_path / "wrong").write_text("nope\n")
    r = tk(env, "keys", "list", "--passphrase-file", str(tmp_path / "wrong"), ok=False)
    assert r.returncode == 7
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_key_version(env, tmp_path):
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(b"hello")
    tk(env, "encrypt", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    # a second keystore where "k" exists only at version 1 but a different key
    other = dict(env, TAKAKRYPT_KEYSTORE=str(tmp_path / "other.json"))
    tk(other, "keys", "create", "k")
    tk(other, "keys", "rotate", "k")
    tk(env, "keys", "rotate", "k")
    tk(env, "keys", "rotate", "k")
    tk(env, "encrypt", "--force", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    r = tk(other, "decrypt", str(tmp_path / "enc"), str(tmp_path / "out"), ok=False)
    assert r.returncode == 6 and b"version 3" in r.stderr


def test_not_a_taka_file(env, tmp_path):
    tk(env, "keys", "create", "k")
    (tmp_path / "plain").write_bytes(b"just text\n" * 50)
    for cmd in (("inspect",), ("decrypt",)):
        args = [*cmd, str(tmp_path / "plain")] + ([str(tmp_path / "o")] if cmd[0] == "decrypt" else [])
        r = tk(env, *args, ok=False)
        assert r.returncode == 4 and b"not a TAKA file" in r.stderr


def test_missing_keystore_and_passphrase(env, tmp_path):
    r = tk(env, "keys", "list", ok=False)
    assert r.returncode == 2 and b"no keystore" in r.stderr
    e = dict(env)
    del e["TAKAKRYPT_PASSPHRASE_FILE"]
    r = tk(e, "keys", "create", "k", ok=False)
    assert r.returncode == 2 and b"passphrase" in r.stderr


def test_master_key_file_mode(env, tmp_path):
    from takakrypt.keys import generate_master_key_file
    mk = tmp_path / "master.key"
    generate_master_key_file(str(mk))
    e = dict(env)
    del e["TAKAKRYPT_PASSPHRASE_FILE"]
    e["TAKAKRYPT_KEYSTORE"] = str(tmp_path / "mk.json")
    tk(e, "keys", "create", "k", "--master-key-file", str(mk))
    assert jtk(e, "keys", "list", "--master-key-file", str(mk))[0]["name"] == "k"


def test_help_documents_exit_codes():
    r = subprocess.run([sys.executable, "-m", "takakrypt", "--help"], capture_output=True,
                       text=True, check=True)
    for code, text in EXIT_CODES.items():
        assert f"{code}" in r.stdout and text in r.stdout
    for sub in ("encrypt", "decrypt", "inspect", "keys"):
        r = subprocess.run([sys.executable, "-m", "takakrypt", sub, "--help"],
                           capture_output=True, text=True, check=True)
        assert "usage:" in r.stdout


def _stderr_on_tty(env, *args):
    """Run the CLI with a pty as stderr; all it drew there."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "takakrypt", *args], env=env,
                         stderr=slave, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            c = os.read(master, 4096)
        except OSError:
            break
        if not c:
            break
        chunks.append(c)
    assert p.wait(60) == 0
    os.close(master)
    return b"".join(chunks)


def test_progress_bar_on_tty(env, tmp_path):
    """On a TTY the encrypt command draws a progress bar (pty-backed stderr)."""
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(os.urandom(64 * 1024 * 1024))
    out = _stderr_on_tty(env, "encrypt", "--key", "k", str(tmp_path / "in"),
                         str(tmp_path / "enc"))
    assert b"encrypt [" in out and b"100.0%" in out


def test_decrypt_progress_shows_percent_and_eta(env, tmp_path):
    """decrypt knows the size from the header: percent and ETA, as encrypt."""
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(os.urandom(64 * 1024 * 1024))
    tk(env, "encrypt", "--key", "k", "-q", str(tmp_path / "in"), str(tmp_path / "enc"))
    out = _stderr_on_tty(env, "decrypt", str(tmp_path / "enc"), str(tmp_path / "out"))
    assert b"decrypt [" in out and b"100.0%" in out and b"ETA" in out


def test_policy_check_exe_must_be_a_file(env, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policies: {p: {rules: [{effects: [permit]}]}}\n")
    base = ["policy", "check", "--config", str(cfg), "--user", "root", "--policy", "p",
            "--path", "x", "--op", "read", "--exe"]
    r = tk(env, *base, os.path.dirname(sys.executable), ok=False)
    assert r.returncode == 2 and b"not a regular file" in r.stderr, r.stderr
    assert tk(env, *base, sys.executable).returncode == 0


@pytest.mark.parametrize("pw, ok", [("x", False), ("seven77", False), ("ééééééé", False),
                                    ("eight888", True), ("éééééééé", True)])
def test_new_keystore_passphrase_has_a_minimum_length(env, tmp_path, pw, ok):
    e = dict(env, TAKAKRYPT_PASSPHRASE=pw, TAKAKRYPT_KEYSTORE=str(tmp_path / "new.json"))
    e.pop("TAKAKRYPT_PASSPHRASE_FILE")
    r = tk(e, "keys", "create", "k", ok=ok)
    if not ok:
        assert r.returncode == 2 and b"at least 8 characters" in r.stderr, r.stderr
        assert not (tmp_path / "new.json").exists()


def _scratch_null(tmp_path):
    """A device node like /dev/null (char 1,3), in a scratch directory."""
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(node, 0o666)
    return node


def _same_node(path, before):
    st = os.lstat(path)
    return (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_rdev, st.st_ino) == \
        (stat.S_IFMT(before.st_mode), before.st_mode & 0o7777, before.st_rdev, before.st_ino)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_force_output_into_a_device_node_writes_it_never_replaces_it(env, tmp_path):
    # `decrypt --force IN /dev/null` used to rename a temporary file over the node: the
    # device became a regular 0600 file holding the plaintext
    tk(env, "keys", "create", "k")
    (tmp_path / "in").write_bytes(os.urandom(9000))
    tk(env, "encrypt", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    node = _scratch_null(tmp_path)
    before = os.lstat(node)
    tk(env, "decrypt", "--force", str(tmp_path / "enc"), str(node))
    assert _same_node(node, before)
    tk(env, "encrypt", "--force", "--key", "k", str(tmp_path / "in"), str(node))
    assert _same_node(node, before)
    # a symlink to the node (as /dev/stdout is one) is followed, not replaced either
    (tmp_path / "link").symlink_to(node)
    tk(env, "decrypt", "--force", str(tmp_path / "enc"), str(tmp_path / "link"))
    assert os.path.islink(tmp_path / "link") and _same_node(node, before)
    assert not [p for p in os.listdir(tmp_path) if "takakrypt-tmp" in p]


def test_force_output_into_a_fifo_streams_through_it(env, tmp_path):
    tk(env, "keys", "create", "k")
    data = os.urandom(300000)
    (tmp_path / "in").write_bytes(data)
    tk(env, "encrypt", "--key", "k", str(tmp_path / "in"), str(tmp_path / "enc"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o640)
    before = os.lstat(fifo)
    # the FIFO's own inode, even if the path is replaced
    node = f"/proc/self/fd/{os.open(fifo, os.O_PATH | os.O_CLOEXEC)}"
    got = []
    reader = threading.Thread(target=lambda: got.append(Path(node).read_bytes()))
    reader.start()
    try:
        tk(env, "decrypt", "--force", str(tmp_path / "enc"), str(fifo))
    finally:
        if reader.is_alive():  # nothing opened the FIFO to write: end the reader's wait
            os.close(os.open(node, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert got == [data] and _same_node(fifo, before)
    # encrypt seeks back to write its header: a FIFO is refused, and left alone
    r = tk(env, "encrypt", "--force", "--key", "k", str(tmp_path / "in"), str(fifo), ok=False)
    assert r.returncode == 2 and b"cannot seek" in r.stderr
    assert _same_node(fifo, before)
    # /dev/stdout: a symlink to the caller's stdout (a pipe here)
    (tmp_path / "stdout").symlink_to("/proc/self/fd/1")
    r = tk(env, "decrypt", "--force", str(tmp_path / "enc"), str(tmp_path / "stdout"))
    assert r.stdout == data and os.path.islink(tmp_path / "stdout")  # and no summary
