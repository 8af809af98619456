"""The key manager's backend interface.

Every place in Takakrypt that needs a data-encryption key goes through a
:class:`KeyBackend`.  Two implementations are planned: the embedded local keystore
(:mod:`takakrypt.keys.local`, the default) and a KMIP client.  Both must pass the
same conformance suite (``tests/keys_conformance.py``).

See ``docs/keys.md`` for the full contract; the short version is in the
:class:`KeyBackend` docstring.
"""

from __future__ import annotations

import abc
import re
from datetime import datetime, timezone
from typing import Any

import msgspec

from ..errors import UsageError

__all__ = [
    "ALGORITHM",
    "KEY_BYTES",
    "KeyBackend",
    "KeyInfo",
    "KeyVersionInfo",
    "check_version",
    "now_rfc3339",
    "validate_key_name",
]

#: Every key handed out is a 256-bit AES key.
KEY_BYTES = 32
ALGORITHM = "AES-256"
#: Longest allowed key name, in bytes (names are ASCII so bytes == characters).
MAX_NAME_BYTES = 63

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")


class KeyVersionInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Public metadata of one version of a key (never the material)."""

    version: int
    #: creation time, RFC 3339 in UTC with a ``Z`` suffix, second precision
    created: str
    #: lifecycle state; only ``"active"`` exists today (every version can be used
    #: to decrypt, the current one is used to encrypt)
    state: str = "active"


class KeyInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Public metadata of a key: safe to print, log and serialise."""

    name: str
    current_version: int
    #: all versions, ascending, ``versions[-1].version == current_version``
    versions: list[KeyVersionInfo]
    algorithm: str = ALGORITHM
    #: which backend holds the key (``"local"``, ``"kmip"``)
    backend: str = ""


def validate_key_name(name: Any) -> str:
    """Return ``name`` if it is a valid key name, else raise :class:`UsageError`.

    Valid: a ``str`` of 1-63 characters from ``[A-Za-z0-9._-]`` that does not start
    with ``.`` or ``-`` (so names are safe as file names and command-line arguments).
    """
    if not isinstance(name, str):
        raise UsageError(f"key name must be a string, not {type(name).__name__}")
    if _NAME_RE.fullmatch(name) is None:
        shown = name if len(name) <= 80 and name.isprintable() else ascii(name)[:80]
        raise UsageError(
            f"invalid key name {shown!r}: use 1-{MAX_NAME_BYTES} characters from "
            "A-Z a-z 0-9 . _ - not starting with '.' or '-'"
        )
    return name


def check_version(version: Any) -> int | None:
    """Validate the ``version`` argument of :meth:`KeyBackend.get`.

    ``None`` and ints are returned unchanged (an int < 1 simply names no existing
    version, so the backend reports :class:`~takakrypt.errors.KeyNotFound`); anything
    else (including ``bool``) raises :class:`UsageError`.
    """
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int):
        raise UsageError(f"key version must be an integer, not {type(version).__name__}")
    return version


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with second precision, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KeyBackend(abc.ABC):
    """A store of named, versioned 256-bit keys.

    Contract (every implementation MUST):

    * **Names** are validated with :func:`validate_key_name` by every method that
      takes one; an invalid name raises :class:`~takakrypt.errors.UsageError`
      before any I/O.
    * **Versions** are consecutive integers starting at 1.  ``create`` makes version
      1; ``rotate`` adds ``current_version + 1`` and makes it current.  Old versions
      are never removed or changed, so files encrypted under them stay readable.
    * **Material** is 32 bytes from the OS CSPRNG (``os.urandom``/``secrets``),
      returned by ``get`` as a *fresh* ``bytearray`` that the caller owns and MUST
      wipe (:func:`takakrypt.keys.secret.wipe`) when done.  Wiping it never affects
      the stored key.  Material never appears in :class:`KeyInfo`, ``repr()``,
      exception messages or logs.
    * **Errors** are :class:`takakrypt.errors.Error` subclasses only:
      ``KeyNotFound`` (unknown name or version; the message names both),
      ``KeyExists`` (``create`` of an existing name), ``KeystoreLocked`` (wrong
      credentials), ``KeystoreCorrupt`` (store fails validation/integrity),
      ``BackendUnavailable`` (remote backend unreachable), ``UsageError`` (bad
      arguments, or use after :meth:`close`).
    * **Durability**: when ``create``/``rotate`` return, the change is durable and
      visible to every other instance/process using the same store.
    * **Thread-safety**: one instance may be shared by many threads.  Concurrent
      ``create`` of the same name: exactly one succeeds, the others raise
      ``KeyExists``.  Concurrent ``rotate``: every call gets its own new version
      (no lost updates), also across processes.
    * **Idempotence**: ``get``/``info``/``list`` have no side effects; ``close`` may
      be called any number of times.  ``create`` and ``rotate`` are *not*
      idempotent (a retried ``rotate`` adds another version).
    * Usable as a context manager (``__exit__`` calls :meth:`close`).
    """

    #: short backend identifier used in :attr:`KeyInfo.backend`
    backend_name: str = "abstract"

    @abc.abstractmethod
    def create(self, name: str) -> KeyInfo:
        """Create key ``name`` with a new random version 1; ``KeyExists`` if present."""

    @abc.abstractmethod
    def get(self, name: str, version: int | None = None) -> bytearray:
        """Return the 32-byte material of ``name`` at ``version`` (None = current).

        The caller owns the returned buffer and must wipe it.  Raises
        ``KeyNotFound`` naming the key (and version) if either does not exist.
        """

    @abc.abstractmethod
    def info(self, name: str) -> KeyInfo:
        """Metadata of ``name``; ``KeyNotFound`` if absent."""

    @abc.abstractmethod
    def list(self) -> list[KeyInfo]:
        """Metadata of every key, sorted by name (byte order)."""

    @abc.abstractmethod
    def rotate(self, name: str) -> KeyInfo:
        """Add a new random version ``current_version + 1`` and make it current."""

    def retire(self, name: str, version: int) -> KeyInfo:
        """Destroy version ``version`` of ``name`` for good (state ``retired``; ``get``
        of it raises ``KeyRetired``, a ``KeyNotFound``).  The current version cannot be
        retired (``KeyInUse``); retiring a retired version again changes nothing.
        Whether files still use the version is the caller's check (``keys retire``)."""
        from ..errors import UsageError as _U

        raise _U(f"the {self.backend_name} key backend cannot retire key versions")

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources and wipe cached secrets; later calls raise UsageError."""

    def __enter__(self) -> "KeyBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
