"""Key management: the backend interface and the embedded local keystore.

Public API::

    from takakrypt.keys import open_keystore, KeyBackend, KeyInfo, wipe

    with open_keystore(path, passphrase=pw, create=True) as ks:   # -> Keystore
        info = ks.create("payroll")       # KeyInfo, version 1
        key = ks.get("payroll")           # bytearray(32); caller must wipe(key)
        ks.rotate("payroll")              # KeyInfo, version 2; version 1 kept
        ks.list()                         # [KeyInfo, ...] sorted by name

The KMIP backend, ``takakrypt.keys.KmipBackend`` (:mod:`takakrypt.keys.kmip`), is
imported on first use: it needs PyKMIP, which ``import takakrypt.keys`` does not.

See docs/keys.md for the contract, the file format and the threat model.
"""

from typing import TYPE_CHECKING, Any

from .backend import (
    ALGORITHM,
    KEY_BYTES,
    KeyBackend,
    KeyInfo,
    KeyVersionInfo,
    validate_key_name,
)
from .secret import Secret, wipe

if TYPE_CHECKING:
    from .kmip import KmipBackend
    from .local import (
        DEFAULT_KDF_PARAMS,
        Argon2Params,
        Keystore,
        generate_master_key_file,
        open_keystore,
    )

#: imported on first use (the keystore needs cryptography and argon2: seconds of
#: emulated CPU under TCG, for `takakrypt` commands that never open it)
_LOCAL = frozenset({"DEFAULT_KDF_PARAMS", "Argon2Params", "Keystore",
                    "generate_master_key_file", "open_keystore"})

__all__ = [
    "ALGORITHM",
    "DEFAULT_KDF_PARAMS",
    "KEY_BYTES",
    "Argon2Params",
    "KeyBackend",
    "KeyInfo",
    "KeyVersionInfo",
    "Keystore",
    "KmipBackend",
    "Secret",
    "generate_master_key_file",
    "open_keystore",
    "validate_key_name",
    "wipe",
]


def __getattr__(name: str) -> Any:
    if name == "KmipBackend":  # imports PyKMIP
        from .kmip import KmipBackend

        return KmipBackend
    if name in _LOCAL:
        from . import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
