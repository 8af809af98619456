"""The key cache (takakrypt.keys.cache), the sealed offline cache (takakrypt.keys.offline)
and the key manager in front of a real local keystore made unavailable (moved away,
damaged) -- docs/keys.md, "Key cache and offline operation".  Ages come from a clock
the test moves, never from sleeping."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
from pathlib import Path

import pytest

from takakrypt import config as C
from takakrypt.agent.breaker import CircuitBreaker
from takakrypt.agent.keymanager import KeyManager, open_offline, outage
from takakrypt.errors import (
    BackendUnavailable,
    ConfigError,
    KeyNotFound,
    KeystoreCorrupt,
    KeystoreLocked,
    UsageError,
)
from takakrypt.keys import generate_master_key_file, open_keystore
from takakrypt.keys.cache import KeyCache
from takakrypt.keys.offline import OfflineCache, secret_file_problem
from takakrypt.keys.secret import lock_stats

FAST = {"memory_kib": 8, "iterations": 1, "lanes": 1}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- KeyCache

def test_cache_serves_copies_and_wipes_what_it_drops():
    clk = Clock()
    c = KeyCache(10, 4, clock=clk)
    key = bytearray(os.urandom(32))
    c.store("k", 1, key)
    got, age = c.lookup("k", 1)
    assert got == key and got is not key and age == 0
    got[:] = bytes(32)  # the caller's copy: wiping it leaves the cache's
    assert c.lookup("k", 1)[0] == key
    held = c._keys[("k", 1)][0]
    assert c.drop("k", 1) == 1 and held == bytearray(32)  # wiped in place
    assert c.lookup("k", 1) is None


def test_cache_ages_revalidation_and_expiry():
    clk = Clock()
    c = KeyCache(10, 4, clock=clk)
    c.store("a", 1, os.urandom(32))
    c.set_current("a", 1)
    assert not c.stale(c.lookup("a", 1)[1]) and c.due() == []
    clk.t += 4
    assert c.stale(c.lookup("a", 1)[1]) and c.due() == ["a"]
    assert c.expire() == []
    assert c.confirm("a", {1}, 1) == []  # the backend answered: young again
    assert c.due() == [] and c.lookup("a", 1)[1] == 0
    clk.t += 10
    held = c._keys[("a", 1)][0]
    assert c.expire() == [("a", 1)] and held == bytearray(32)
    assert c.lookup("a", 1) is None and c.current("a") is None


def test_cache_confirm_drops_versions_the_backend_no_longer_has():
    c = KeyCache(10, clock=Clock())
    for v in (1, 2, 3):
        c.store("a", v, os.urandom(32))
    assert c.confirm("a", {2, 3}, 3) == [1]
    assert c.lookup("a", 1) is None and c.current("a") == (3, 0)


def test_cache_ttl_zero_holds_for_ever():
    clk = Clock()
    c = KeyCache(0, clock=clk)
    c.store("a", 1, os.urandom(32))
    clk.t += 10 ** 9
    assert not c.stale(1e9) and not c.expired(1e9) and c.expire() == [] and c.due() == []
    assert c.lookup("a", 1) is not None


def test_cache_rejects_bad_times_and_shows_no_material():
    with pytest.raises(ValueError):
        KeyCache(-1)
    with pytest.raises(ValueError):
        KeyCache(10, 11)
    c = KeyCache(10)
    key = os.urandom(32)
    c.store("a", 1, key)
    text = repr(c) + str(c.stats())
    assert key.hex() not in text and "1 keys" in repr(c)
    before = lock_stats()["buffers"]
    c.clear()
    assert lock_stats()["buffers"] < before  # released with the wipe
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(c)


# ----------------------------------------------------------------------- OfflineCache

@pytest.fixture
def key_file(tmp_path) -> str:
    p = tmp_path / "off.key"
    p.write_bytes(os.urandom(32))
    os.chmod(p, 0o600)
    return str(p)


def test_offline_roundtrip_key_file(tmp_path, key_file):
    path = tmp_path / "d" / "off.json"
    oc = OfflineCache(str(path), key_file=key_file)
    assert not path.exists()  # created by the first store
    k1, k2 = os.urandom(32), os.urandom(32)
    assert oc.store("pay", 1, k1, 1) and oc.store("pay", 2, k2, 2)
    assert not oc.store("pay", 2, k2)  # held: nothing written
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert (Path(str(path) + ".lock").stat().st_mode & 0o777) == 0o600
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    oc.close()
    again = OfflineCache(str(path), key_file=key_file)
    assert again.get("pay", 1) == k1 and again.get("pay", 2) == k2
    assert again.current_version("pay") == 2
    with pytest.raises(KeyNotFound):
        again.get("pay", 3)
    with pytest.raises(KeyNotFound):
        again.current_version("other")
    assert again.remove("pay", 1) and not again.holds("pay", 1) and again.holds("pay", 2)
    assert again.remove("pay") and not again.holds("pay", 2)
    text = path.read_text()
    assert k1.hex() not in text and base64.b64encode(k1).decode() not in text


def test_offline_passphrase_wrong_and_other_kind(tmp_path, key_file):
    path = str(tmp_path / "off.json")
    with pytest.raises(UsageError, match="at least 8"):
        OfflineCache(path, passphrase=b"short", kdf_params=FAST)
    OfflineCache(path, passphrase=b"right passphrase", kdf_params=FAST).store("a", 1, os.urandom(32))
    with pytest.raises(KeystoreLocked, match="wrong passphrase for offline key cache"):
        OfflineCache(path, passphrase=b"wrong passphrase")
    with pytest.raises(KeystoreLocked, match="sealed under a passphrase, not a key file"):
        OfflineCache(path, key_file=key_file)
    assert OfflineCache(path, passphrase=bytearray(b"right passphrase")).holds("a", 1)


def test_offline_tampering_is_refused(tmp_path, key_file):
    path = tmp_path / "off.json"
    oc = OfflineCache(str(path), key_file=key_file)
    oc.store("a", 1, os.urandom(32), 1)
    oc.store("a", 2, os.urandom(32), 2)
    oc.store("b", 1, os.urandom(32), 1)
    good = json.loads(path.read_text())

    def edited(fn):
        doc = json.loads(json.dumps(good))
        fn(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises((KeystoreCorrupt, KeystoreLocked)) as e:
            OfflineCache(str(path), key_file=key_file)
        return str(e.value)

    def swap(d):  # a's sealed versions exchanged: the MAC (and the AAD) refuse it
        v = d["keys"][0]["versions"]
        v[0]["sealed"], v[1]["sealed"] = v[1]["sealed"], v[0]["sealed"]

    assert "integrity" in edited(swap)
    assert "integrity" in edited(lambda d: d["keys"][0].__setitem__("current_version", 1))
    assert "integrity" in edited(lambda d: d["keys"].pop())
    assert "integrity" in edited(lambda d: d.__setitem__("generation", 0))
    assert "malformed" in edited(lambda d: d.__setitem__("extra", 1))
    assert "unsupported format version" in edited(lambda d: d.__setitem__("version", 2))
    assert "wrong key file" in edited(lambda d: d["kdf"].__setitem__(
        "salt", base64.b64encode(os.urandom(16)).decode()))
    path.write_text(json.dumps(good))
    assert OfflineCache(str(path), key_file=key_file).current_version("a") == 2


def test_offline_parser_fuzz(tmp_path, key_file):
    """Random mutations of a real file: refused with our errors, never a crash, never
    a key served that was not stored."""
    path = tmp_path / "off.json"
    oc = OfflineCache(str(path), key_file=key_file)
    keys = {v: os.urandom(32) for v in (1, 2)}
    for v, k in keys.items():
        oc.store("fz", v, k, v)
    raw = path.read_bytes()
    rnd = random.Random(1234)
    accepted = 0
    for i in range(300):
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.random()
            pos = rnd.randrange(len(b))
            if op < 0.5:
                b[pos] = rnd.randrange(256)
            elif op < 0.75:
                del b[pos:pos + rnd.randint(1, 8)]
            else:
                b[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 4)))
        path.write_bytes(bytes(b))
        try:
            got = OfflineCache(str(path), key_file=key_file)
        except (KeystoreCorrupt, KeystoreLocked):
            continue
        accepted += 1  # whitespace changes only: the values are the same
        assert all(got.get("fz", v) == k for v, k in keys.items()), i
    assert accepted < 300


def test_offline_secrets_never_in_repr_errors_or_logs(tmp_path, key_file, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "off.json"
    oc = OfflineCache(str(path), key_file=key_file)
    k = os.urandom(32)
    oc.store("a", 1, k, 1)
    texts = [repr(oc), str(oc.stats())]
    for bad in (lambda: oc.get("a", 9), lambda: OfflineCache(str(path), key_file=__file__)):
        try:
            bad()
        except Exception as e:  # noqa: BLE001
            texts.append(str(e))
    texts.append(caplog.text)
    secret = Path(key_file).read_bytes()
    for t in texts:
        for s in (k, secret):
            assert s.hex() not in t and base64.b64encode(s).decode() not in t


def test_secret_file_problem(tmp_path, key_file):
    assert secret_file_problem(key_file, size=32) is None
    os.chmod(key_file, 0o640)
    assert "root-only" in secret_file_problem(key_file, size=32)
    os.chmod(key_file, 0o400)
    assert secret_file_problem(key_file, size=32) is None
    assert "exactly 16 bytes (it has 32)" in secret_file_problem(key_file, size=16)
    assert "does not exist" in secret_file_problem(str(tmp_path / "none"))
    assert "not a regular file" in secret_file_problem(str(tmp_path))


# ----------------------------------------------------------------------- KeyManager

@pytest.fixture
def store(tmp_path):
    mk = tmp_path / "master.key"
    generate_master_key_file(str(mk))
    ks = tmp_path / "keystore.json"
    with open_keystore(str(ks), master_key_file=str(mk), create=True) as k:
        k.create("k1")
    return ks, mk


def _manager(store, ttl=10.0, revalidate=4.0, offline=None, clk=None):
    ks, mk = store

    def opener():
        return open_keystore(str(ks), master_key_file=str(mk))

    return KeyManager(opener(), cache=KeyCache(ttl, revalidate, clock=clk or Clock()),
                      offline=offline, opener=opener,
                      breaker=CircuitBreaker("local", failure_threshold=2))


def _away(store):
    ks, _ = store
    os.rename(ks, str(ks) + ".away")


def _back(store):
    ks, _ = store
    os.rename(str(ks) + ".away", ks)


def test_manager_serves_held_keys_until_ttl_then_denies(store):
    clk = Clock()
    km = _manager(store, clk=clk)
    key = km.get("k1")
    assert km.counters["misses"] == 1
    _away(store)
    clk.t += 3  # fresh: served without asking
    assert km.get("k1", 1) == key and km.current_version("k1") == 1
    assert km.counters["hits"] == 1 and km.last_error is None
    clk.t += 3  # due: served at once all the same (no caller waits on the backend) ...
    assert km.get("k1", 1) == key and km.current_version("k1") == 1
    assert km.counters["revalidations"] == km.counters["revalidation_failures"] == 0
    assert km.maintain() == []  # ... and maintain() asks: the backend fails, within the TTL
    assert km.counters["revalidation_failures"] == 1
    assert km.get("k1", 1) == key and km.current_version("k1") == 1
    assert km.degraded and km.source["k1"] == "cache"
    clk.t += 5  # past the TTL
    assert km.maintain() == [("k1", 1)]
    with pytest.raises(BackendUnavailable):
        km.get("k1", 1)
    with pytest.raises(Exception) as e:
        km.current_version("k1")
    assert outage(e.value)
    kinds = [k for k, _r, _d in km.drain_events()]
    assert kinds == ["key-backend", "key-cache"], kinds
    _back(store)
    assert km.probe() and km.get("k1", 1) == key
    assert [r for _k, r, _d in km.drain_events()][-1].endswith("keys back")
    assert km.status()["available"]


def test_manager_revalidation_confirms_and_drops_what_is_gone(store):
    ks, mk = store
    clk = Clock()
    km = _manager(store, clk=clk)
    key = km.get("k1")
    clk.t += 5
    assert km.maintain() == [] and km.counters["revalidations"] == 1
    clk.t += 8  # 13 s after the fetch, 8 after the confirmation: still held
    _away(store)
    assert km.get("k1", 1) == key
    _back(store)
    with open_keystore(str(ks), master_key_file=str(mk)) as k:
        k.rotate("k1")
        k.retire("k1", 1)
    clk.t += 5
    assert ("k1", 1) in km.maintain()
    with pytest.raises(KeyNotFound):
        km.get("k1", 1)
    assert km.current_version("k1") == 2


def test_a_first_failing_probe_opens_the_circuit_later_ones_count(store):
    km, km2 = _manager(store), _manager(store)
    km.breaker.failure_threshold = km2.breaker.failure_threshold = 5
    km2._probed = True  # past the start
    _away(store)
    assert not km.probe() and km.breaker.state == "open"
    assert not km2.probe() and km2.breaker.state == "closed"


def test_manager_ttl_zero_keeps_todays_behaviour(store):
    km = _manager(store, ttl=0, revalidate=None)
    key = km.get("k1")
    _away(store)
    for _ in range(5):
        assert km.get("k1", 1) == key and km.current_version("k1") == 1
    assert km.maintain() == [] and km.degraded


def test_manager_offline_cache_serves_when_the_backend_is_down(store, tmp_path, key_file):
    off = OfflineCache(str(tmp_path / "off.json"), key_file=key_file)
    clk = Clock()
    km = _manager(store, offline=off, clk=clk)
    assert km.current_version("k1") == 1
    key = km.get("k1")
    assert km.counters["offline_stores"] == 1
    km.close()
    _away(store)
    # a fresh start with the backend down: nothing in memory, all from the disk
    ks, mk = store
    off2 = OfflineCache(str(tmp_path / "off.json"), key_file=key_file)
    km2 = KeyManager(None, cache=KeyCache(10, clock=clk), offline=off2,
                     opener=lambda: open_keystore(str(ks), master_key_file=str(mk)))
    assert km2.current_version("k1") == 1 and km2.get("k1", 1) == key
    st = km2.status()
    assert st["offline_cache"]["in_use"] and st["served_from"]["k1"] == "offline"
    assert not st["opened"] and not st["available"]
    assert any("offline" in r for _k, r, _d in km2.drain_events())
    _back(store)
    assert km2.probe() and km2.status()["opened"]
    assert not km2.status()["offline_cache"]["in_use"]


def test_manager_forgets_on_disk_what_the_backend_destroyed(store, tmp_path, key_file):
    ks, mk = store
    off = OfflineCache(str(tmp_path / "off.json"), key_file=key_file)
    km = _manager(store, offline=off)
    km.get("k1")
    with open_keystore(str(ks), master_key_file=str(mk)) as k:
        k.rotate("k1")
        k.retire("k1", 1)
    assert km.current_version("k1", force=True) == 2
    assert not off.holds("k1", 1)


def _keys_cfg(**kw) -> C.Keys:
    return C.Keys(**kw)


def test_open_starts_without_a_damaged_keystore_and_opens_it_later(store):
    ks, mk = store
    good = ks.read_bytes()
    ks.write_bytes(b"garbage")
    cfg = _keys_cfg(local=C.LocalKeys(path=str(ks), master_key_file=str(mk)))
    km = KeyManager.open(cfg)
    assert km.backend is None and "not valid JSON" in km.last_error
    assert km.breaker.state == "open"  # found down at start: nothing waits on it again
    with pytest.raises(BackendUnavailable, match="circuit open"):
        km.current_version("k1")
    ks.write_bytes(good)
    assert km.probe() and km.current_version("k1") == 1


def test_open_refuses_what_the_configuration_must_fix(store, tmp_path, key_file):
    ks, mk = store
    loc = C.LocalKeys(path=str(ks), master_key_file=str(mk))
    with pytest.raises(ConfigError, match=r"\$\.keys\.local\.path"):
        KeyManager.open(_keys_cfg(local=C.LocalKeys(path=str(tmp_path / "none"),
                                                    master_key_file=str(mk))))
    os.chmod(key_file, 0o644)
    oc = C.OfflineKeyCache(path=str(tmp_path / "off.json"), key_file=key_file)
    with pytest.raises(ConfigError, match="key_file.*root-only"):
        KeyManager.open(_keys_cfg(local=loc, offline_cache=oc))
    pw = tmp_path / "pw"
    pw.write_text("")
    os.chmod(pw, 0o600)
    oc = C.OfflineKeyCache(path=str(tmp_path / "off.json"), passphrase_file=str(pw))
    with pytest.raises(ConfigError, match="is empty"):
        open_offline(_keys_cfg(local=loc, offline_cache=oc))


def test_config_fields_are_checked(tmp_path):
    def errors(keys):
        p = tmp_path / "c.yaml"
        import yaml

        p.write_text(yaml.safe_dump({"keys": keys}))
        with pytest.raises(ConfigError) as e:
            C.load(str(p))
        return str(e.value)

    assert "$.keys.cache_ttl: must be between 0" in errors({"cache_ttl": -1})
    assert "$.keys.cache_revalidate: needs a cache_ttl above 0" in errors(
        {"cache_revalidate": 5})
    assert "at most cache_ttl (10)" in errors({"cache_ttl": 10, "cache_revalidate": 11})
    assert "exactly one of passphrase_file or key_file" in errors(
        {"offline_cache": {"path": "/x"}})
    assert "$.keys.offline_cache.path: must be absolute" in errors(
        {"offline_cache": {"path": "x", "key_file": "/k"}})
    assert C.key_cache_times(C.Keys()) == (0.0, 0.0)
    assert C.key_cache_times(C.Keys(backend="kmip")) == (3600.0, 900.0)
    assert C.key_cache_times(C.Keys(cache_ttl=60, cache_revalidate=5)) == (60.0, 5.0)


def test_config_check_warns_when_the_backend_is_down(tmp_path):
    """``takakrypt config check``: a key backend that is down (here the keystore damaged)
    is a warning (exit 0; exit 3 with --strict), since takakryptd would start closed;
    a missing keystore (a bad path) stays an error."""
    import subprocess
    import sys

    import yaml

    from agent_helpers import base_config

    cfg = base_config(tmp_path)
    (tmp_path / "gp").mkdir()
    cfg["guard_points"] = [{"path": str(tmp_path / "gp"), "policy": "p", "key": "k1"}]
    cf = tmp_path / "c.yaml"
    cf.write_text(yaml.safe_dump(cfg))

    def check(*extra):
        return subprocess.run([sys.executable, "-m", "takakrypt", "config", "check", *extra,
                               str(cf)], capture_output=True, text=True, timeout=60)

    r = check("--json")
    assert r.returncode == 0 and json.loads(r.stdout)["warnings"] == [], r.stderr
    ks = tmp_path / "keystore.json"
    ks.write_bytes(b"{ damaged")
    r = check("--json")
    assert r.returncode == 0, r.stderr
    (w,) = json.loads(r.stdout)["warnings"]
    assert "key backend is down" in w and "closed" in w
    assert "WARNING" in r.stderr and "Traceback" not in r.stderr
    r = check("--strict")
    assert r.returncode == 3 and "key backend is down" in r.stderr, r.stderr
    ks.unlink()
    r = check()
    assert r.returncode == 3 and "no keystore at" in r.stderr, r.stderr
