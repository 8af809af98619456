"""The agent's key manager: the configured key backend behind a circuit breaker.

Data keys handed to guard points are copies (bytearrays) the caller wipes.

The current version of each key is remembered once the backend has named it.  While the
backend fails (a keystore moved away, unreadable or corrupt; the circuit open) the agent
keeps answering with the remembered version, so files whose keys the data path already
holds stay readable: the manager is then *degraded*.  A key the backend says does not
exist is never answered from memory.
"""

from __future__ import annotations

import threading

from .. import config as C
from ..errors import ConfigError, Error, KeyExists, KeyNotFound, UsageError
from ..keys import KeyBackend, open_keystore
from .breaker import CircuitBreaker


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


def open_backend(cfg: C.Keys) -> KeyBackend:
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
        raise ConfigError("$.keys.backend: the KMIP backend is not available in this build")
    raise ConfigError(f"$.keys.backend: unknown backend {cfg.backend!r}")


def load_config(path: str, *, backend: KeyBackend | None = None,
                check_keys: bool = True) -> C.Config:
    """The one validation of a configuration file, shared by takakryptd (start, reload)
    and ``takakrypt config check``: the file's own meaning, then what it names on this
    machine (config.check_host), every error in one ConfigError.  The guard points'
    keys are looked up in ``backend`` (the running agent's), else in the configured
    backend, opened for that and closed again (``check_keys=False``: not looked up)."""

    def key_names(keys: C.Keys) -> set[str]:
        if backend is not None:
            return {i.name for i in backend.list()}
        with open_backend(keys) as b:
            return {i.name for i in b.list()}

    def host(cfg: C.Config, add) -> None:  # type: ignore[no-untyped-def]
        C.check_host(cfg, add, key_names if check_keys else None)

    return C.load(path, host=host)


class KeyManager:
    def __init__(self, backend: KeyBackend, *, name: str = "local",
                 breaker: CircuitBreaker | None = None) -> None:
        self.backend = backend
        self.breaker = breaker or CircuitBreaker(name)
        self._lock = threading.Lock()  # backends are thread-safe; this orders close()
        self._current: dict[str, int] = {}  # key name -> last current version seen
        self._announced: dict[str, int] = {}  # ... as changed_versions() last reported it
        self.last_error: str | None = None  # the backend's latest failure, None once fine

    def get(self, name: str, version: int | None = None) -> bytearray:
        return self._call(lambda: self.backend.get(name, version))

    def _call(self, fn):  # type: ignore[no-untyped-def]
        try:
            out = self.breaker.call(fn)
        except (KeyNotFound, KeyExists):
            self.last_error = None
            raise
        except Error as e:
            self.last_error = str(e)
            raise
        self.last_error = None
        return out

    def current_version(self, name: str) -> int:
        """The key's current version; the remembered one while the backend fails."""
        try:
            v = self._call(lambda: self.backend.info(name)).current_version
        except KeyNotFound:
            self._current.pop(name, None)
            raise
        except Error:
            held = self._current.get(name)
            if held is None:
                raise
            return held
        self._current[name] = v
        self._announced.setdefault(name, v)
        return v

    def changed_versions(self) -> dict[str, int]:
        """Keys whose current version moved since the last call (``keys rotate``):
        name -> new version.  Keys that cannot be read now are left as they are."""
        out = {}
        for name in list(self._announced):
            try:
                new = self.current_version(name)
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
        return self._call(self.backend.list)

    def probe(self) -> bool:
        """Health check: the backend answers a listing.  Made past the breaker and
        reported to it, so an open circuit closes as soon as the backend is back."""
        try:
            self.backend.list()
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            self.last_error = str(e) if isinstance(e, Error) else f"{type(e).__name__}: {e}"
            self.breaker.record(False)
            return False
        self.last_error = None
        self.breaker.record(True)
        return True

    def close(self) -> None:
        with self._lock:
            self.backend.close()
