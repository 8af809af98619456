"""takakrypt xform (and encrypt) must not destroy what they cannot give back: Takakrypt's
own files below DIR, hard-linked files, TAKA files under another key, a journal after a
failure, plaintext temporaries; and their --json output is one document.  All through
the CLI in subprocesses, on real files."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from takakrypt import xform
from takakrypt.cryptofile import TakaFile
from takakrypt.keys import generate_master_key_file, open_keystore


@pytest.fixture
def env(tmp_path):
    """A keystore (keys "data" and "other") outside the trees transformed."""
    mk = tmp_path / "mk"
    generate_master_key_file(str(mk))
    ks = tmp_path / "ks.json"
    with open_keystore(str(ks), master_key_file=str(mk), create=True) as k:
        k.create("data")
        k.create("other")
    e = dict(os.environ, TAKAKRYPT_KEYSTORE=str(ks), TAKAKRYPT_MASTER_KEY_FILE=str(mk),
             HOME=str(tmp_path / "nohome"))
    for v in ("TAKAKRYPT_PASSPHRASE", "TAKAKRYPT_PASSPHRASE_FILE", "XDG_DATA_HOME"):
        e.pop(v, None)
    return e


def tk(env, *args, stdin=None):
    r = subprocess.run([sys.executable, "-m", "takakrypt", *args], env=env, capture_output=True,
                       text=True, timeout=120, input=stdin)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def keys(env):
    return open_keystore(env["TAKAKRYPT_KEYSTORE"],
                         master_key_file=env["TAKAKRYPT_MASTER_KEY_FILE"])


def plain_tree(root, n=3):
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"f{i}"
        p.write_bytes(os.urandom(5000 + i))
        out[p] = p.read_bytes()
    return out


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def immutable(path):
    """chattr +i: renaming over the file fails with EPERM (a real failing rename)."""
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# 1. Takakrypt's own files ------------------------------------------------------------------

def test_keystore_in_a_home_like_dir_is_refused(tmp_path, env):
    home = tmp_path / "home"
    files = plain_tree(home)
    ksdir = home / ".local" / "share" / "takakrypt"
    ksdir.mkdir(parents=True)
    ks = ksdir / "keystore.json"
    os.rename(env["TAKAKRYPT_KEYSTORE"], ks)
    e = dict(env, TAKAKRYPT_KEYSTORE=str(ks))
    before = snapshot(home)
    r = tk(e, "xform", str(home), "--key", "data", "-q")
    assert r.returncode == 2, r.stderr
    assert str(ks) in r.stderr and "keystore" in r.stderr and "Nothing was converted" in r.stderr
    assert snapshot(home) == before and ks.read_bytes()[:4] != b"TAKA"
    assert all(p.read_bytes() == d for p, d in files.items())


def test_a_default_keystore_location_inside_dir_is_refused(tmp_path, env):
    """The keystore in use is elsewhere, but ~/.local/share/takakrypt/keystore.json (the
    default of a non-root user) lies in DIR: another user's keys, refused too."""
    home = tmp_path / "home"
    plain_tree(home)
    ks = home / ".local" / "share" / "takakrypt" / "keystore.json"
    ks.parent.mkdir(parents=True)
    ks.write_bytes(open(env["TAKAKRYPT_KEYSTORE"], "rb").read())
    r = tk(dict(env, HOME=str(home)), "xform", str(home), "--key", "data", "-q")
    assert r.returncode == 2 and str(ks) in r.stderr


def test_master_key_file_inside_dir_is_refused(tmp_path, env):
    d = tmp_path / "d"
    plain_tree(d)
    mk = d / "keys" / "master.key"
    mk.parent.mkdir()
    os.rename(env["TAKAKRYPT_MASTER_KEY_FILE"], mk)
    before = snapshot(d)
    r = tk(dict(env, TAKAKRYPT_MASTER_KEY_FILE=str(mk)), "xform", str(d), "--key", "data",
           "-q", "--json")
    assert r.returncode == 2
    assert str(mk) in r.stderr and "master key file" in r.stderr
    assert json.loads(r.stdout)["exit_code"] == 2
    assert snapshot(d) == before


def test_hard_link_to_the_master_key_inside_dir_is_refused(tmp_path, env):
    d = tmp_path / "d"
    plain_tree(d)
    os.link(env["TAKAKRYPT_MASTER_KEY_FILE"], d / "innocent-name")
    r = tk(env, "xform", str(d), "--key", "data", "-q")
    assert r.returncode == 2 and "innocent-name" in r.stderr and "master key" in r.stderr
    assert (d / "f0").read_bytes()[:4] != b"TAKA"


def test_files_named_by_an_agent_config_are_refused(tmp_path, env):
    d = tmp_path / "d"
    plain_tree(d)
    (d / "log").mkdir()
    (d / "log" / "audit.json.1").write_text("{}\n")  # a rotated audit file
    cfg = tmp_path / "takakrypt.yaml"
    cfg.write_text(f"version: 1\naudit:\n  sinks:\n    - type: file\n"
                   f"      path: {d}/log/audit.json\n")
    r = tk(env, "xform", str(d), "--key", "data", "-q", "--config", str(cfg))
    assert r.returncode == 2 and "audit.json.1" in r.stderr and "audit file" in r.stderr
    # the configuration itself
    r = tk(env, "xform", str(tmp_path), "--key", "data", "-q", "--config", str(cfg))
    assert r.returncode == 2 and str(cfg) in r.stderr
    # a directory inside the agent's run directory
    run = tmp_path / "run"
    plain_tree(run / "sub")
    cfg.write_text(f"version: 1\nagent:\n  control_socket: {run}/control.sock\n")
    r = tk(env, "xform", str(run / "sub"), "--key", "data", "-q", "--config", str(cfg))
    assert r.returncode == 2 and "run directory" in r.stderr
    assert (run / "sub" / "f0").read_bytes()[:4] != b"TAKA"


# 3. hard links -----------------------------------------------------------------------------

def test_hard_links_inside_dir_all_end_on_the_one_encrypted_file(tmp_path, env):
    d = tmp_path / "d"
    files = plain_tree(d)
    (d / "sub").mkdir()
    os.link(d / "f0", d / "sub" / "link-a")
    os.link(d / "f0", d / "link-b")
    os.chmod(d / "f0", 0o640)
    r = tk(env, "xform", str(d), "--key", "data", "-q", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["converted"] == 3 and out["linked"] == 2 and not out["skipped"]
    names = [d / "f0", d / "sub" / "link-a", d / "link-b"]
    st = [os.lstat(p) for p in names]
    assert len({s.st_ino for s in st}) == 1 and st[0].st_nlink == 3
    assert st[0].st_mode & 0o777 == 0o640
    with keys(env) as ks, TakaFile.open(d / "sub" / "link-a", ks.get) as f:
        assert f.read(0, 1 << 20) == files[d / "f0"]
    assert not list(d.rglob("*takakrypt-xform*"))
    r = tk(env, "xform", str(d), "--decrypt", "-q")
    assert r.returncode == 0, r.stderr
    assert len({os.lstat(p).st_ino for p in names}) == 1
    assert (d / "link-b").read_bytes() == files[d / "f0"]


def test_hard_link_outside_dir_fails_naming_the_plaintext_files(tmp_path, env):
    d = tmp_path / "d"
    files = plain_tree(d)
    os.link(d / "f1", tmp_path / "outside")
    os.link(d / "f1", d / "f1-again")
    r = tk(env, "xform", str(d), "--key", "data", "-q")
    assert r.returncode == 14
    assert "f1-again" in r.stderr and "f1:" in r.stderr and "outside" in r.stderr
    assert (d / "f1").read_bytes() == files[d / "f1"]  # not split: left as it was
    assert os.lstat(d / "f1").st_nlink == 3
    assert (d / "f0").read_bytes()[:4] == b"TAKA"  # the others were converted
    assert not (d / xform.JOURNAL).exists()


def test_crash_between_encrypting_and_relinking_is_finished_by_the_rerun(tmp_path, env):
    d = tmp_path / "d"
    files = plain_tree(d)
    os.link(d / "f2", d / "z-link")
    code = (f"import os, signal, sys\nsys.argv = ['takakrypt', 'xform', {str(d)!r}, "
            "'--key', 'data', '-q']\nfrom takakrypt import cli, xform\n"
            "xform._relink = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)\n"
            "cli.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert r.returncode == -9
    assert (d / "f2").read_bytes()[:4] == b"TAKA" and (d / "z-link").read_bytes()[:4] != b"TAKA"
    r = tk(env, "xform", str(d), "--key", "data", "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"] is True
    assert os.lstat(d / "f2").st_ino == os.lstat(d / "z-link").st_ino
    with keys(env) as ks, TakaFile.open(d / "z-link", ks.get) as f:
        assert f.read(0, 1 << 20) == files[d / "f2"]


def test_crash_after_the_rename_restores_the_mode_on_rerun(tmp_path, env):
    """The converted copy is 0600 until renamed; a crash right after the rename leaves it
    so, and the rerun gives it the original's mode."""
    d = tmp_path / "d"
    plain_tree(d, n=1)
    os.chmod(d / "f0", 0o644)
    code = (f"import os, signal, sys\nfrom takakrypt import cli\n"
            "os.fchmod = lambda fd, mode: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"cli.main(['xform', {str(d)!r}, '--key', 'data', '-q'])\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert r.returncode == -9
    assert (d / "f0").read_bytes()[:4] == b"TAKA" and os.stat(d / "f0").st_mode & 0o777 == 0o600
    r = tk(env, "xform", str(d), "--key", "data", "-q")
    assert r.returncode == 0, r.stderr
    assert os.stat(d / "f0").st_mode & 0o777 == 0o644


# 4. TAKA input under another key -----------------------------------------------------------

def test_xform_refuses_a_tree_encrypted_under_another_key(tmp_path, env):
    d = tmp_path / "d"
    files = plain_tree(d)
    assert tk(env, "xform", str(d), "--key", "data", "-q").returncode == 0
    (d / "new").write_bytes(b"fresh plaintext")
    before = snapshot(d)
    r = tk(env, "xform", str(d), "--key", "other", "-q")
    assert r.returncode == 2 and "f0 (key data v1)" in r.stderr
    assert "--allow-taka-input" in r.stderr and snapshot(d) == before
    # the same key: files already done are skipped, the new one converted
    r = tk(env, "xform", str(d), "--key", "data", "-q", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["already"] == len(files)
    # asked for explicitly: nested
    r = tk(env, "xform", str(d), "--key", "other", "-q", "--allow-taka-input", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["converted"] == len(files) + 1
    with keys(env) as ks, TakaFile.open(d / "f0", ks.get) as f:
        assert f.read(0, 4) == b"TAKA"


def test_encrypt_refuses_a_taka_input(tmp_path, env):
    (tmp_path / "p").write_bytes(b"x" * 10000)
    assert tk(env, "encrypt", "--key", "data", str(tmp_path / "p"), str(tmp_path / "c"),
              "-q").returncode == 0
    r = tk(env, "encrypt", "--key", "other", str(tmp_path / "c"), str(tmp_path / "cc"), "-q")
    assert r.returncode == 2 and str(tmp_path / "c") in r.stderr and "key data v1" in r.stderr
    assert not (tmp_path / "cc").exists()
    assert not list(tmp_path.glob("*takakrypt-tmp*"))
    with open(tmp_path / "c", "rb") as f:
        r = subprocess.run([sys.executable, "-m", "takakrypt", "encrypt", "--key", "other", "-",
                            str(tmp_path / "cc"), "-q"], env=env, stdin=f, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2 and "already a TAKA file" in r.stderr
    r = tk(env, "encrypt", "--key", "other", "--allow-taka-input", str(tmp_path / "c"),
           str(tmp_path / "cc"), "-q")
    assert r.returncode == 0 and (tmp_path / "cc").exists()


# smaller ones ------------------------------------------------------------------------------

def test_failed_run_leaves_no_journal_and_blocks_nothing(tmp_path, env):
    d = tmp_path / "d"
    plain_tree(d)
    with immutable(d / "f1"):
        r = tk(env, "xform", str(d), "--key", "data", "-q", "--json")
        assert r.returncode == 14
        doc = json.loads(r.stdout)  # exactly one document: the summary and the error
        assert doc["exit_code"] == 14 and doc["failed"][0]["path"] == "f1"
        assert doc["converted"] == 2
        assert "not converted: f1" in r.stderr
    assert not (d / xform.JOURNAL).exists()
    assert not list(d.rglob("*takakrypt-xform*"))
    r = tk(env, "xform", str(d), "--key", "data", "-q", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resumed"] is False
    r = tk(env, "xform", str(d), "--decrypt", "-q")  # another direction is not blocked
    assert r.returncode == 0, r.stderr


def test_abandon_an_interrupted_run(tmp_path, env):
    d = tmp_path / "d"
    plain_tree(d)
    assert tk(env, "xform", str(d), "--key", "data", "-q").returncode == 0
    j = xform._Journal(str(d))  # an interrupted --decrypt: journal and a plaintext temporary
    j.open()
    j.write(direction="decrypt", key=None, version=None)
    j.f.close()
    (d / f".f0{xform.TMP_SUFFIX}").write_bytes(b"secret plaintext")
    r = tk(env, "xform", str(d), "--key", "other", "--allow-taka-input", "-q")
    assert r.returncode == 2 and "--abandon" in r.stderr
    r = tk(env, "xform", "--abandon", str(d), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["abandoned"] is True and out["cleaned_temporaries"] == 1
    assert not (d / xform.JOURNAL).exists() and not (d / f".f0{xform.TMP_SUFFIX}").exists()
    r = tk(env, "xform", str(d), "--decrypt", "-q", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resumed"] is False


def test_decrypt_whose_rename_fails_leaves_no_plaintext_temporary(tmp_path, env):
    d = tmp_path / "d"
    files = plain_tree(d)
    os.chmod(d / "f0", 0o644)
    assert tk(env, "xform", str(d), "--key", "data", "-q").returncode == 0
    with immutable(d / "f0"):
        r = tk(env, "xform", str(d), "--decrypt", "-q")
        assert r.returncode == 14 and "f0" in r.stderr
        assert xform.TMP_SUFFIX not in r.stderr
        leftovers = list(d.rglob(f"*{xform.TMP_SUFFIX}"))
        assert not leftovers, [(p, oct(p.stat().st_mode)) for p in leftovers]
    assert (d / "f1").read_bytes() == files[d / "f1"]


def test_encrypt_bad_block_size_is_a_usage_error(tmp_path, env):
    (tmp_path / "p").write_bytes(b"x")
    r = tk(env, "encrypt", "--key", "data", "--block-size", "1000", str(tmp_path / "p"),
           str(tmp_path / "c"), "--json")
    assert r.returncode == 2 and "--block-size 1000" in r.stderr
    assert json.loads(r.stdout)["exit_code"] == 2


def test_os_error_names_the_output_not_a_temporary_and_json_says_it(tmp_path, env):
    (tmp_path / "p").write_bytes(b"x")
    out = tmp_path / "missing-dir" / "c"
    r = tk(env, "encrypt", "--key", "data", str(tmp_path / "p"), str(out), "--json", "-q")
    assert r.returncode == 1
    assert f"{out}: No such file" in r.stderr and "takakrypt-tmp" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and str(out) in doc["message"]
