"""The keys of one open TAKA file: its block ciphers by key version, its header MAC key.

A v1 file has one key version, so one cipher.  A v2 file's blocks each name their key
version (docs/file-format.md, "Version 2"): ciphers are made on first use, one per
version met, from ``keys(name, version)``; new blocks are sealed under the header's
write version.  Every reader and writer of TAKA files in Python goes through here, so
the rule "a block's version must lie in the header's [oldest, write] range" has one
place.
"""

from __future__ import annotations

from collections.abc import Callable

from . import format as fmt
from ._aesgcm import BlockCipher
from .errors import IntegrityError, KeyNotFound
from .keys.secret import wipe

#: ``keys(name, version)`` -> the 32-byte data key, in a bytearray the callee may wipe
KeyLookup = Callable[[str, int], bytearray]


class FileKeys:
    """Ciphers and MAC key of one file. Not thread-safe; :meth:`wipe` when done."""

    def __init__(self, header: fmt.Header, keys: KeyLookup) -> None:
        self.header = header
        self._keys = keys
        self._ciphers: dict[int, BlockCipher] = {}
        self._macs: dict[int, bytearray] = {}
        self._bs = header.block_size
        self._sbs = header.stored_block_size
        self._aad = header.aad_prefix
        try:
            self._derive(header.key_version)
        except BaseException:
            self.wipe()
            raise

    # keys -----------------------------------------------------------------------------------
    def _derive(self, version: int) -> BlockCipher:
        h = self.header
        data_key = self._keys(h.key_id, version)
        try:
            enc, mac = fmt.derive_file_keys(data_key, h.file_id, info=h.hkdf_info)
        finally:
            wipe(data_key)
        try:
            cipher = BlockCipher(enc, block_size=h.block_size,
                                 block_version=None if h.version == 1 else version)
        except BaseException:
            wipe(mac)
            raise
        finally:
            wipe(enc)
        self._ciphers[version] = cipher
        self._macs[version] = mac
        return cipher

    def cipher(self, version: int) -> BlockCipher:
        c = self._ciphers.get(version)
        return c if c is not None else self._derive(version)

    @property
    def mac_key(self) -> bytearray:
        """The header MAC key: the write version's."""
        return self._macs[self.header.key_version]

    def set_write_version(self, version: int) -> None:
        """v2: seal new blocks (and tag the header) under ``version`` from now on. The
        caller writes the header before any block of the new version."""
        if self.header.version == 1:
            raise ValueError("a v1 file has one key version")
        self.cipher(version)
        self.header.key_version = version

    # blocks ---------------------------------------------------------------------------------
    def encrypt_into(self, plain: bytes | bytearray | memoryview, out: bytearray | memoryview,
                     first: int) -> int:
        return self.cipher(self.header.key_version).encrypt_into(plain, out, self._aad, first)

    def decrypt_into(self, raw: bytes | bytearray | memoryview, out: bytearray | memoryview,
                     first: int, *, holes: bool = True) -> int:
        """Decrypt stored blocks ``first``... into ``out``; v2 blocks with the cipher of
        the version each names. IntegrityError (``.block``) for a block that fails, or
        that names a version outside the header's range."""
        h = self.header
        if h.version == 1:
            return self.cipher(h.key_version).decrypt_into(raw, out, self._aad, first,
                                                           holes=holes)
        raw, out = memoryview(raw), memoryview(out)
        # runs of blocks of one version (their last four bytes), each in one native call;
        # an all-zero trailer (a hole, or a damaged block the native check then refuses:
        # BlockVersionMismatch, an IntegrityError) joins the run it is in, and leading
        # ones the first run, so every block is decrypted and checked by some call
        runs: list[tuple[int, int]] = []  # (first relative block, version)
        for i in range(0, len(raw), self._sbs):
            end = min(i + self._sbs, len(raw))
            v = int.from_bytes(raw[end - 4:end], "little")
            if v and (not runs or runs[-1][1] != v):
                runs.append((i // self._sbs, v))
        runs[:1] = [(0, runs[0][1] if runs else h.key_version)]
        written = 0
        for k, (a, v) in enumerate(runs):
            b = runs[k + 1][0] if k + 1 < len(runs) else -(-len(raw) // self._sbs)
            if v not in h.versions:
                raise IntegrityError(
                    f"block {first + a} names key version {v}, outside the file's "
                    f"versions {h.oldest_version}..{h.key_version}", block=first + a)
            written = a * self._bs + self.cipher(v).decrypt_into(
                raw[a * self._sbs:b * self._sbs], out[a * self._bs:], self._aad,
                first + a, holes=holes)
        return written

    def wipe(self) -> None:
        for c in self._ciphers.values():
            c.wipe()
        for m in self._macs.values():
            wipe(m)
        self._ciphers.clear()
        self._macs.clear()


def single_key(key_id: str, version: int, data_key: bytes | bytearray) -> KeyLookup:
    """A lookup that knows one (name, version): for a file being created."""
    def lookup(name: str, v: int) -> bytearray:
        if (name, v) != (key_id, version):
            raise KeyNotFound(f"key {name!r} version {v} is not known here")
        return bytearray(data_key)
    return lookup
