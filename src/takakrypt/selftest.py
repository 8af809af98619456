"""Start-up self-test: known answers from tests/vectors (independent implementation).

Run before the CLI touches keys or files (about a millisecond); a failure means the
native build is broken and nothing is encrypted with it.
"""

from __future__ import annotations

import hashlib

from . import format as fmt
from ._aesgcm import BlockCipher, engines
from .errors import NativeError
from .keys.secret import wipe

# vector "block-plus-one" of tests/vectors/taka_v1.json
_DATA_KEY = bytes.fromhex("dd45b2d46b7ca96d4856df868d38351f2957cab55394430cd78cf3da9596bb4c")
_FILE_ID = bytes.fromhex("0214f322fae55a239a4fb6dcec71f335")
_NONCES = bytes.fromhex("787909de9d1c6c62376d9d1a149575eaa36dfc77ac10f557")
_KEY_ID, _KEY_VERSION, _SIZE = 'share.key-1', 2, 4097
_FILE_SHA256 = "11b1812fef439a87a7af0a8d133a30b0903152d23844c77792600181610ffb85"


def _det(label: str, n: int) -> bytes:
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


def run() -> None:
    """Raise NativeError unless every engine reproduces and reverses the vector."""
    plaintext = _det("block-plus-one/plaintext", _SIZE)
    h = fmt.Header(key_id=_KEY_ID, key_version=_KEY_VERSION, file_id=_FILE_ID,
                   plaintext_size=_SIZE)
    enc, mac = fmt.derive_file_keys(bytearray(_DATA_KEY), _FILE_ID)
    head = h.pack(mac)
    wipe(mac)  # a test key, but locked like every file key: release it
    try:
        _check_engines(enc, h, head, plaintext)
    finally:
        wipe(enc)


def _check_engines(enc: bytearray, h: fmt.Header, head: bytes, plaintext: bytes) -> None:
    for engine in engines():
        with BlockCipher(enc, engine=engine) as c:
            body = c.encrypt(plaintext, h.static, 0, nonces=_NONCES)
            ok = hashlib.sha256(head + body).hexdigest() == _FILE_SHA256
            ok = ok and c.decrypt(body, h.static, 0) == plaintext
        if not ok:
            raise NativeError(f"self-test failed for crypto engine {engine}: "
                              "the native build is broken")
