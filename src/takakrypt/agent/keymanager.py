"""The agent's key manager: the configured key backend behind a circuit breaker, with
the key cache and the optional offline cache in front (docs/keys.md, "Key cache and
offline operation").

Data keys handed to guard points are copies (bytearrays) the caller wipes.

* **Key cache** (:class:`takakrypt.keys.cache.KeyCache`): every key fetched is held
  locked in memory with the time the backend last confirmed it.  After
  ``keys.cache_revalidate`` seconds :meth:`KeyManager.maintain` (every few seconds, off
  the data path: a caller holding the key never waits on a slow or hung backend) asks
  the backend again: confirmed, it is served on; gone (``KeyNotFound``, retired), it is
  dropped; the backend failing, it is served until ``keys.cache_ttl`` seconds after
  the last confirmation, then dropped and wiped, and the data path's copies with it
  (the daemon calls ``drop_keys`` on the guard points).  ``cache_ttl: 0`` (the local
  keystore's default): keys are held until the agent stops.
* **Current versions** follow the same rule; with ``cache_ttl: 0`` the backend is asked
  on every use and the last version it named is answered while it fails.
* **Offline cache** (:class:`takakrypt.keys.offline.OfflineCache`, if configured):
  every key fetched from the backend is also stored sealed on disk; while the backend
  fails, keys and current versions not held in memory are served from there.
* The backend may be down when the agent starts (a KMS unreachable, a keystore file
  damaged): the manager starts without it and opens it at the first call that finds
  it back.  Without a key, a guard point serves no encrypted file: it is *closed*.

A key the backend says does not exist is never answered from memory or from disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import config as C
from ..errors import (
    BackendUnavailable,
    ConfigError,
    Error,
    KeyError_,
    KeyExists,
    KeyNotFound,
    KeyRetired,
    KeystoreCorrupt,
    KeystoreLocked,
    UsageError,
)
from ..keys import KeyBackend, open_keystore
from ..keys.cache import KeyCache
from ..keys.offline import OfflineCache, secret_file_problem
from ..keys.secret import lock, wipe
from .breaker import CircuitBreaker

log = logging.getLogger("takakryptd.keys")


def outage(e: BaseException) -> bool:
    """A failure of the backend itself, which may end by itself (a KMS out of reach, a
    keystore file damaged or unreadable): takakryptd starts anyway (closed, or from the
    offline cache) and recovers without a restart.  Not an outage: what the
    configuration must fix (a wrong passphrase, a missing credential or keystore)."""
    return isinstance(e, (BackendUnavailable, KeystoreCorrupt)) or type(e) is KeyError_


def _read_passphrase(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            line = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"$.keys.local.passphrase_file: cannot read {path}: {e.strerror}") \
            from None
    if not line:
        raise ConfigError(f"$.keys.local.passphrase_file: {path} is empty")
    return line


def open_backend(cfg: C.Keys, *, retries: int | None = None) -> KeyBackend:
    """The configured backend; ``retries`` replaces a KMIP backend's configured retries
    (0: one try, for a check that must not wait timeout x (retries + 1) on a hung
    server)."""
    if cfg.backend == "local":
        loc = cfg.local
        if bool(loc.passphrase_file) == bool(loc.master_key_file):
            raise ConfigError("$.keys.local: give exactly one of passphrase_file or "
                              "master_key_file")
        try:
            if loc.master_key_file:
                return open_keystore(loc.path, master_key_file=loc.master_key_file)
            return open_keystore(loc.path, passphrase=_read_passphrase(loc.passphrase_file or ""))
        except UsageError as e:
            raise ConfigError(f"$.keys.local.path: {e}") from None
    if cfg.backend == "kmip":
        km = cfg.kmip
        if km is None:
            raise ConfigError("$.keys.kmip: backend kmip needs a kmip section")
        for fld in ("ca_file", "cert_file", "key_file"):
            if not getattr(km, fld):
                raise ConfigError(f"$.keys.kmip.{fld}: required: the KMIP backend needs "
                                  "mutual TLS (ca_file, cert_file and key_file)")
        from ..keys.kmip import KmipBackend  # PyKMIP only when KMIP is configured

        try:
            return KmipBackend(km.host, km.port, ca_file=km.ca_file or "",
                               cert_file=km.cert_file or "", key_file=km.key_file or "",
                               timeout=km.timeout,
                               retries=km.retries if retries is None else retries)
        except UsageError as e:
            raise ConfigError(f"$.keys.kmip: {e}") from None
    raise ConfigError(f"$.keys.backend: unknown backend {cfg.backend!r}")


def load_config(path: str, *, backend: Any = None, check_keys: bool = True,
                outage_ok: bool = False, outages: list[str] | None = None) -> C.Config:
    """The one validation of a configuration file, shared by takakryptd (start, reload)
    and ``takakrypt config check``: the file's own meaning, then what it names on this
    machine (config.check_host), every error in one ConfigError.  The guard points'
    keys are looked up in ``backend`` (the running agent's KeyManager), else in the
    configured backend, opened for that and closed again (``check_keys=False``: not
    looked up).  ``outage_ok`` (takakryptd): a backend that is down (:func:`outage`) is
    no error, the keys are not checked then; ``outages`` (with ``outage_ok``) receives
    what the backend said then."""

    def key_names(keys: C.Keys) -> set[str] | None:
        try:
            if backend is not None:
                return {i.name for i in backend.list()}
            # one try when an outage is no error (takakryptd's start, config check):
            # the start is not held for timeout x (retries + 1) by a hung server
            with open_backend(keys, retries=0 if outage_ok else None) as b:
                return {i.name for i in b.list()}
        except Error as e:
            if outage_ok and outage(e):
                if outages is not None:
                    outages.append(str(e))
                return None
            raise

    def host(cfg: C.Config, add) -> None:  # type: ignore[no-untyped-def]
        C.check_host(cfg, add, key_names if check_keys else None)

    return C.load(path, host=host)


def _read_secret_line(path: str, field: str) -> bytearray:
    """The first line of ``path`` in a locked bytearray (the caller wipes it)."""
    buf = bytearray(4096)
    lock(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            n = f.readinto(buf) or 0
    except OSError as e:
        wipe(buf)
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from None
    end = next((i for i in range(n) if buf[i] in b"\r\n"), n)
    out = bytearray(buf[:end])
    lock(out)
    wipe(buf)
    if not out:
        raise ConfigError(f"{field}: {path} is empty")
    return out


def open_offline(cfg: C.Keys) -> tuple[OfflineCache | None, str]:
    """The configured offline cache and "", or None and why it is not used (a damaged
    file: refused, never overwritten; reported in status).  ConfigError for what the
    configuration must fix: the local secret (missing, not root-only, wrong)."""
    oc = cfg.offline_cache
    if oc is None:
        return None, ""
    p = "$.keys.offline_cache"
    if bool(oc.passphrase_file) == bool(oc.key_file):
        raise ConfigError(f"{p}: give exactly one of passphrase_file or key_file")
    secret = oc.key_file or oc.passphrase_file or ""
    field = f"{p}.{'key_file' if oc.key_file else 'passphrase_file'}"
    why = secret_file_problem(secret, size=32 if oc.key_file else None)
    if why:
        raise ConfigError(f"{field}: {why}")
    try:
        if oc.key_file:
            return OfflineCache(oc.path, key_file=oc.key_file), ""
        pw = _read_secret_line(secret, field)
        try:
            return OfflineCache(oc.path, passphrase=pw), ""
        finally:
            wipe(pw)
    except (KeystoreLocked, UsageError) as e:
        raise ConfigError(f"{field}: {e}") from None
    except KeyError_ as e:  # damaged (KeystoreCorrupt) or unreadable: not used
        log.error("%s: %s; the offline key cache is not used", p, e)
        return None, str(e)


#: seconds after a probe of the backend that failed slowly (SLOW_PROBE or longer: a
#: hung server) before the next one is made (the health loop probes every 10 s; a
#: `takakrypt status` in between answers from the last one)
PROBE_RETRY = 5.0
SLOW_PROBE = 1.0


class KeyManager:
    """The key backend behind a circuit breaker, the key cache and the offline cache in
    front (module docstring).  Thread-safe: the data path's threads call :meth:`get`
    and :meth:`current_version`; the daemon calls :meth:`maintain` every few seconds
    and acts on what it returns (the data path's copies of dropped keys) and on
    :meth:`drain_events` (audit)."""

    def __init__(self, backend: KeyBackend | None, *, name: str = "local",
                 breaker: CircuitBreaker | None = None, cache: KeyCache | None = None,
                 offline: OfflineCache | None = None,
                 opener: Callable[[], KeyBackend] | None = None) -> None:
        if backend is None and opener is None:
            raise ValueError("a KeyManager needs a backend or an opener")
        self.backend = backend  # None until the opener succeeds (down at start)
        self.name = name
        self.breaker = breaker or CircuitBreaker(name)
        self.cache = cache if cache is not None else KeyCache()
        self.offline = offline
        self.offline_problem = ""  # why the configured offline cache is not (fully) used
        self._opener = opener
        self._lock = threading.Lock()  # opening and closing the backend
        self._mu = threading.Lock()  # events, drops, counters
        self._closed = False
        self._probed = False  # the first probe (at start) trips the breaker if it fails
        # one probe at a time, and none again within PROBE_RETRY of one that failed
        # slowly: a hung server costs timeout x (retries + 1) per probe, which
        # `takakrypt status` and the start-up checks must not wait for again and again
        # (a quick failure -- refused, a damaged keystore -- is simply tried again)
        self._probe_mu = threading.Lock()
        self._last_probe: tuple[bool, float, float] | None = None  # (answered, when, took)
        self._announced: dict[str, int] = {}  # key name -> version changed_versions() saw
        self.last_error: str | None = None  # the backend's latest failure, None once fine
        self.down_since: float | None = None  # wall clock; None while the backend answers
        self.source: dict[str, str] = {}  # key name -> backend | cache | offline
        self._offline_names: set[str] = set()  # served from disk since the backend failed
        self._drops: list[tuple[str, int]] = []
        self._events: list[tuple[str, str, dict[str, Any]]] = []
        self.counters = {"hits": 0, "misses": 0, "expired": 0, "dropped": 0,
                         "revalidations": 0, "revalidation_failures": 0,
                         "offline_serves": 0, "offline_stores": 0, "offline_errors": 0}

    @classmethod
    def open(cls, cfg: C.Keys, *, breaker: CircuitBreaker | None = None,
             known_down: str | None = None, known_down_took: float = 0.0) -> KeyManager:
        """The manager of configuration ``cfg``: ConfigError (or KeystoreLocked) for what
        the configuration must fix; a backend that is down (:func:`outage`) is not
        opened now but at the first call that finds it back.  ``known_down``: what the
        backend said when it was just tried (takakryptd's start-up check of the
        configuration), after ``known_down_took`` seconds: the circuit starts open and,
        after a slow failure, the first probe is not made at once, so the start does not
        wait on a hung server again."""
        offline, problem = open_offline(cfg)
        ttl, revalidate = C.key_cache_times(cfg)
        backend: KeyBackend | None = None
        err: Error | None = None
        try:
            backend = open_backend(cfg)
        except Error as e:
            if not outage(e):
                if offline is not None:
                    offline.close()
                raise
            err = e
        km = cls(backend, name=cfg.backend, breaker=breaker or CircuitBreaker(cfg.backend),
                 cache=KeyCache(ttl, revalidate), offline=offline,
                 opener=lambda: open_backend(cfg))
        km.offline_problem = problem
        if err is None and known_down is not None:
            err = BackendUnavailable(known_down)
        if err is not None:
            log.error("key backend %s unavailable at start: %s", cfg.backend, err)
            km.breaker.trip()
            km._down(err)
            km._probed = True
            km._last_probe = (False, time.monotonic(), known_down_took)
        return km

    # events ---------------------------------------------------------------------------
    def _event(self, kind: str, reason: str, detail: dict[str, Any] | None = None) -> None:
        with self._mu:
            self._events.append((kind, reason, detail or {}))

    def drain_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(audit kind, reason, detail) of what happened since the last call: the backend
        failing and answering again, keys served from the offline cache, keys expired."""
        with self._mu:
            out, self._events = self._events, []
            return out

    def _count(self, what: str, n: int = 1) -> None:
        with self._mu:
            self.counters[what] += n

    def _drop_copies(self, keys: list[tuple[str, int]]) -> None:
        if keys:
            with self._mu:
                self._drops.extend(keys)
                self.counters["dropped"] += len(keys)

    # the backend ----------------------------------------------------------------------
    def _live(self) -> KeyBackend:
        b = self.backend
        if b is not None:
            return b
        with self._lock:
            if self._closed:
                raise UsageError("the key manager is closed")
            if self.backend is None:
                assert self._opener is not None
                self.backend = self._opener()
                log.info("key backend %s opened", self.name)
            return self.backend

    def _call(self, fn: Callable[[KeyBackend], Any]) -> Any:
        rejected = self.breaker.rejected
        try:
            out = self.breaker.call(lambda: fn(self._live()))
        except (KeyNotFound, KeyExists):
            self._up()
            raise
        except Error as e:
            self._down(e, rejected=self.breaker.rejected != rejected)
            raise
        self._up()
        return out

    def _up(self) -> None:
        self.last_error = None
        if self.down_since is None:
            return
        with self._mu:
            if self.down_since is None:
                return
            was = time.time() - self.down_since
            self.down_since = None
            offline = sorted(self._offline_names)
            self._offline_names.clear()
            self._events.append(("key-backend", f"key backend {self.name} answers again "
                                 f"after {was:.0f} s: keys back",
                                 {"backend": self.name, "down_seconds": round(was, 3),
                                  "served_offline": offline}))
        log.info("key backend %s answers again", self.name)

    def _down(self, e: Error, rejected: bool = False) -> None:
        if not rejected or self.last_error is None:  # keep the cause, not "circuit open"
            self.last_error = str(e)
        if self.down_since is not None:
            return
        with self._mu:
            if self.down_since is not None:
                return
            self.down_since = time.time()
            ttl = self.cache.ttl
            held = (f"held keys are served for up to {ttl:g} s" if ttl else
                    "held keys are served until the agent stops")
            self._events.append(("key-backend", f"key backend {self.name} unavailable: {e}; "
                                 f"{held}" + ("; then from the offline cache"
                                              if self.offline is not None else ""),
                                 {"backend": self.name, "error": str(e)}))
        log.error("key backend %s unavailable: %s", self.name, e)

    # offline cache --------------------------------------------------------------------
    def _offline(self, what: str, fn: Callable[[OfflineCache], Any]) -> Any:
        """A write to the offline cache; a failure is logged and counted, never raised
        (the key came from the backend and is served)."""
        if self.offline is None:
            return None
        try:
            return fn(self.offline)
        except (Error, OSError) as e:
            self._count("offline_errors")
            self.offline_problem = f"cannot {what}: {e}"
            log.error("offline key cache: cannot %s: %s", what, e)
            return None

    def _served_offline(self, name: str) -> None:
        with self._mu:
            if name in self._offline_names:
                return
            self._offline_names.add(name)
            self._events.append(("key-backend", f"key {name} served from the offline key "
                                 f"cache: key backend {self.name} unavailable "
                                 f"({self.last_error})", {"key": name,
                                                          "backend": self.name}))
        log.warning("key %s: served from the offline key cache (backend unavailable)", name)

    def _offline_current(self, name: str) -> int | None:
        if self.offline is None:
            return None
        try:
            v = self.offline.current_version(name)
        except Error:
            return None
        self.source[name] = "offline"
        self._served_offline(name)
        return v

    # keys -----------------------------------------------------------------------------
    def _confirmed(self, name: str, info: Any) -> set[int]:
        """The backend answered ``info`` for ``name``: held entries are confirmed, the
        versions it no longer has are dropped, here and on disk."""
        active = {v.version for v in info.versions if getattr(v, "state", "active") == "active"}
        gone = self.cache.confirm(name, active, info.current_version)
        self._drop_copies([(name, v) for v in gone])
        for v in info.versions:
            if v.version not in active:
                self._offline("forget a retired key", lambda o, v=v: o.remove(name, v.version))
        self._offline("record the current version",
                      lambda o: o.set_current(name, info.current_version))
        return active

    def _forget(self, name: str, version: int | None = None) -> None:
        """The backend says the key (or version) does not exist: nothing keeps it."""
        held = [(name, v) for v in ([version] if version else [])]
        n = self.cache.drop(name, version)
        if version is None:
            self.source.pop(name, None)
        if n:
            self._drop_copies(held or [(name, 0)])
        self._offline("forget a key the backend no longer has",
                      lambda o: o.remove(name, version))

    def get(self, name: str, version: int | None = None) -> bytearray:
        """The key (a locked copy the caller wipes): from the key cache while the
        backend confirmed it recently enough, else from the backend, else (the backend
        failing) from the offline cache."""
        if version is None:
            version = self.current_version(name)
        hit = self.cache.lookup(name, version)
        if hit is not None:
            key, age = hit
            if not self.cache.expired(age):
                # fresh, or due for revalidation: served at once; maintain() (every few
                # seconds, off the data path) asks the backend, so no caller waits on a
                # slow or hung one for a key it holds
                self._count("hits")
                return key
            try:
                info = self._call(lambda b: b.info(name))
            except KeyNotFound:
                wipe(key)
                self._forget(name)
                raise
            except Error:
                self._count("revalidation_failures")
                if not self.cache.expired(age):
                    self._count("hits")
                    return key
                wipe(key)
                self._expire([(name, version)])
            else:
                self._count("revalidations")
                if version in self._confirmed(name, info):
                    self._count("hits")
                    return key
                wipe(key)
                raise KeyRetired(f"key {name!r} version {version} is no longer in the key "
                                 f"backend {self.name}")
        self._count("misses")
        try:
            key = self._call(lambda b: b.get(name, version))
        except KeyNotFound:
            self._forget(name, version)
            raise
        except Error:
            if self.offline is None:
                raise
            try:
                key = self.offline.get(name, version)
            except Error:
                raise BackendUnavailable(f"key {name!r} version {version}: key backend "
                                         f"{self.name} unavailable ({self.last_error}) and "
                                         "the key is not in the offline key cache") from None
            self._count("offline_serves")
            self._served_offline(name)
            return key
        self.cache.store(name, version, key)
        memo = self.cache.current(name)
        current = memo[0] if memo is not None else 0
        if self._offline("store a key", lambda o: o.store(name, version, key, current)):
            self._count("offline_stores")
        return key

    def current_version(self, name: str, *, force: bool = False) -> int:
        """The key's current version: remembered while the backend confirmed it
        recently enough (with ``cache_ttl: 0`` the backend is asked every time); the
        remembered one while the backend fails, until it expires; then the offline
        cache's.  ``force``: ask the backend now."""
        memo = self.cache.current(name)
        if memo is not None and not force and self.cache.ttl and not self.cache.expired(memo[1]):
            return memo[0]  # due ones are confirmed by maintain(), as keys are
        try:
            info = self._call(lambda b: b.info(name))
        except KeyNotFound:
            self._forget(name)
            raise
        except Error:
            if memo is not None and not self.cache.expired(memo[1]):
                self.source[name] = "cache"
                return memo[0]
            v = self._offline_current(name)
            if v is None:
                self.source.pop(name, None)
                raise
            return v
        self._confirmed(name, info)
        self.source[name] = "backend"
        self._announced.setdefault(name, info.current_version)
        return int(info.current_version)

    def _expire(self, keys: list[tuple[str, int]]) -> None:
        for n, v in keys:
            self.cache.drop(n, v)
        self._count("expired", len(keys))
        self._drop_copies(keys)
        self._event("key-cache", f"{len(keys)} key(s) held {self.cache.ttl:g} s without the "
                    f"key backend {self.name} confirming them: dropped and wiped",
                    {"keys": [f"{n}:{v}" for n, v in keys], "backend": self.name})
        log.warning("key cache: %s expired (backend %s unavailable): dropped and wiped",
                    ", ".join(f"{n} v{v}" for n, v in keys), self.name)

    def maintain(self) -> list[tuple[str, int]]:
        """Upkeep, every few seconds: confirm the keys due for it with the backend, drop
        (wipe) the expired ones.  Returns every (name, version) dropped since the last
        call, here or in :meth:`get` (version 0: all of the name): the data path's
        copies of those must go too."""
        due = self.cache.due()
        for name in due:
            try:
                info = self._call(lambda b, n=name: b.info(n))
            except KeyNotFound:
                self._forget(name)
                continue
            except Error:
                self._count("revalidation_failures")
                for n in due:  # served from memory until they are confirmed or expire
                    if self.source.get(n) != "offline":
                        self.source[n] = "cache"
                break  # the backend fails: the next round tries again
            self._count("revalidations")
            self._confirmed(name, info)
        gone = self.cache.expire()
        if gone:
            self._count("expired", len(gone))
            self._drop_copies(gone)
            self._event("key-cache", f"{len(gone)} key(s) held {self.cache.ttl:g} s without "
                        f"the key backend {self.name} confirming them: dropped and wiped",
                        {"keys": [f"{n}:{v}" for n, v in gone], "backend": self.name})
            log.warning("key cache: %s expired (backend %s unavailable): dropped and wiped",
                        ", ".join(f"{n} v{v}" for n, v in gone), self.name)
        with self._mu:
            out, self._drops = self._drops, []
        return out

    def upkeep_interval(self) -> float:
        """Seconds between :meth:`maintain` calls: fine enough for the cache's times
        (0: none needed, the health check's round is enough)."""
        if not self.cache.ttl:
            return 0.0
        return min(5.0, max(0.1, self.cache.revalidate / 2, self.cache.ttl / 20))

    def changed_versions(self) -> dict[str, int]:
        """Keys whose current version moved since the last call (``keys rotate``):
        name -> new version.  Keys that cannot be read now are left as they are."""
        out = {}
        for name in list(self._announced):
            try:
                new = self.current_version(name, force=True)
            except Error:
                continue
            if new != self._announced[name]:
                self._announced[name] = out[name] = new
        return out

    @property
    def degraded(self) -> bool:
        """The backend fails now (held keys are still served)."""
        return self.last_error is not None or self.breaker.state != "closed"

    def list(self) -> list:  # type: ignore[type-arg]
        return self._call(lambda b: b.list())

    def probe(self) -> bool:
        """Health check: the backend answers a listing.  Made past the breaker and
        reported to it, so an open circuit closes as soon as the backend is back.  The
        first one failing (takakryptd's start) opens the circuit at once: the start's
        checks of each guard point's key do not each wait on a dead server."""
        if not self._probe_mu.acquire(blocking=False):
            # one is under way (a slow or hung server): its caller reports; this one
            # answers with what is known
            return self.last_error is None and self.breaker.state == "closed"
        try:
            last, t0 = self._last_probe, time.monotonic()
            if last is not None and not last[0] and last[2] >= SLOW_PROBE and \
                    t0 - last[1] < PROBE_RETRY:
                return False
            ok = self._probe_now()
            now = time.monotonic()
            self._last_probe = (ok, now, now - t0)
            return ok
        finally:
            self._probe_mu.release()

    def _probe_now(self) -> bool:
        first, self._probed = not self._probed, True
        try:
            self._live().list()
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            err = e if isinstance(e, Error) else BackendUnavailable(f"{type(e).__name__}: {e}")
            if first:
                self.breaker.trip()
            else:
                self.breaker.record(False)
            self._down(err)
            return False
        self.breaker.record(True)
        self._up()
        return True

    def status(self) -> dict[str, Any]:
        """What ``takakrypt status`` shows of the keys: never material."""
        c = self.cache.stats()
        with self._mu:
            counters = dict(self.counters)
            offline_names = sorted(self._offline_names)
        sources = dict(self.source)
        return {
            "backend": self.name,
            "available": self.down_since is None and self.last_error is None,
            "opened": self.backend is not None,
            "breaker": self.breaker.state,
            "last_error": self.last_error,
            "down_seconds": round(time.time() - self.down_since, 3)
            if self.down_since is not None else None,
            "cache": {"keys": c["entries"], "oldest_age": c["oldest_age"],
                      "ttl": c["ttl"], "revalidate": c["revalidate"]},
            "served_from": sources,
            "offline_cache": None if self.offline is None and not self.offline_problem else {
                **(self.offline.stats() if self.offline is not None else {}),
                "configured": True, "usable": self.offline is not None,
                "in_use": bool(offline_names), "serving": offline_names,
                "problem": self.offline_problem or None},
            "counters": counters,
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.cache.clear()
            if self.offline is not None:
                self.offline.close()
            if self.backend is not None:
                self.backend.close()

    def __repr__(self) -> str:
        return f"<KeyManager {self.name} {len(self.cache)} keys held>"
