"""The agent's key manager: the configured key backend behind a circuit breaker.

Data keys handed to guard points are copies (bytearrays) the caller wipes.
"""

from __future__ import annotations

import threading

from .. import config as C
from ..errors import ConfigError, UsageError
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


class KeyManager:
    def __init__(self, backend: KeyBackend, *, name: str = "local",
                 breaker: CircuitBreaker | None = None) -> None:
        self.backend = backend
        self.breaker = breaker or CircuitBreaker(name)
        self._lock = threading.Lock()  # backends are thread-safe; this orders close()

    def get(self, name: str, version: int | None = None) -> bytearray:
        return self.breaker.call(lambda: self.backend.get(name, version))

    def current_version(self, name: str) -> int:
        return self.breaker.call(lambda: self.backend.info(name)).current_version

    def list(self) -> list:  # type: ignore[type-arg]
        return self.breaker.call(self.backend.list)

    def probe(self) -> bool:
        """Health check: the backend answers a listing."""
        try:
            self.list()
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self.backend.close()
