"""TAKA file format, versions 1 and 2: header layout, key derivation, block geometry.

The authoritative description is docs/file-format.md; this module is its code.

Header (128 bytes, integers little-endian)::

    off  size  field
    ---  ----  -------------------------------------------------------------
      0     4  magic            b"TAKA"
      4     1  version          1
      5     1  algorithm        1 = AES-256-GCM blocks, HKDF-SHA256 file keys
      6     2  flags            0 in v1 (any set bit: FormatError)
      8     4  block_size       plaintext bytes per block, power of two, 512..1 MiB
     12     4  key_version      version of the named key, >= 1
     16    16  file_id          random, unique per file
     32     1  key_id_len       1..63
     33    63  key_id           key name: [A-Za-z0-9_][A-Za-z0-9._-]*, zero padded
    ---  ----  ----- end of the static part (bytes 0..95, bound into every block)
     96     8  plaintext_size   bytes of plaintext in the file
    104     8  encryptions      block encryptions reserved under this file's key (lease)
    112    16  header_tag       HMAC-SHA256(mac_key, bytes 0..111), first 16 bytes
    128        first stored block

Stored block ``i`` (at ``128 + i * (block_size + 28)``)::

    nonce (12, random) | AES-256-GCM ciphertext (<= block_size) | tag (16)
    AAD = header[0:96] | uint64 i

Per-file keys: ``HKDF-SHA256(ikm=data key, salt=file_id, info=b"takakrypt/v1 file keys",
L=64)``: bytes 0..31 are the block encryption key, bytes 32..63 the header MAC key.

Version 2 (docs/file-format.md, "Version 2") keeps the geometry and gives every block
its own key version, so rewritten blocks of a file can move to a rotated key at once::

     12     4  key_version      the *write* version: new blocks use it; the header tag
                                is under its MAC key (not part of the blocks' AAD)
    104     4  encryptions      lease under the write version's file key (u32)
    108     4  oldest_version   every block's version is in [oldest, key_version]

    block: nonce (12) | ciphertext | tag (12) | uint32 block version
    AAD = header[0:96] with bytes 12..15 zeroed | uint64 i | uint32 block version
    keys of version v: HKDF(data key (name, v), salt=file_id, info=b"takakrypt/v2 file keys")
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from .errors import FormatError, IntegrityError, UsageError
from .keys.backend import validate_key_name

MAGIC = b"TAKA"
VERSION = 1  # what writers make unless asked for another (all engines read 1 and 2)
VERSIONS = (1, 2)
ALG_AES256GCM_HKDF = 1
ALGORITHMS = {ALG_AES256GCM_HKDF: "AES-256-GCM/HKDF-SHA256"}

HEADER_SIZE = 128
STATIC_SIZE = 96  # header bytes bound into every block's AAD
TAG_OFFSET = 112
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
KEY_ID_MAX = 63
MAX_PLAINTEXT_SIZE = (1 << 63) - 1
HKDF_INFO = b"takakrypt/v1 file keys"
HKDF_INFO_V2 = b"takakrypt/v2 file keys"
TAG_SIZE_V2 = 12  # v2 blocks: a 96-bit GCM tag, then the block's u32 key version
# Per-file GCM budget (random 96-bit nonces: 2^32 encryptions per key, NIST SP 800-38D).
# The header counts encryptions reserved; writers lease NONCE_CHUNK at a time, warn past
# NONCE_SOFT_LIMIT and refuse past NONCE_HARD_LIMIT (docs/file-format.md, "Encryption
# count"). The 2^30 below 2^32 cover one lost lease per crash or reload many times over.
NONCE_CHUNK = 1 << 16
NONCE_SOFT_LIMIT = 1 << 31
NONCE_HARD_LIMIT = 3 << 30

# magic, version, algorithm, flags, block_size, key_version, file_id, key_id_len, key_id
_STATIC = struct.Struct("<4sBBHII16sB63s")
# plaintext_size, encryptions
_DYNAMIC = struct.Struct("<QQ")
# v2: plaintext_size, encryptions, oldest_version
_DYNAMIC_V2 = struct.Struct("<QII")
assert _STATIC.size == STATIC_SIZE and STATIC_SIZE + _DYNAMIC.size == TAG_OFFSET
assert _DYNAMIC_V2.size == _DYNAMIC.size


def _valid_block_size(bs: int) -> bool:
    return MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0


def validate_key_id(key_id: str) -> bytes:
    """The key id's bytes; FormatError unless it is a valid key name (the keystore's rule,
    docs/keys.md: 1..63 of ``[A-Za-z0-9._-]``, not starting with ``.`` or ``-``)."""
    try:
        validate_key_name(key_id)
    except UsageError:
        raise FormatError("key id is not a valid key name (1-63 of A-Z a-z 0-9 . _ -, "
                          "not starting with '.' or '-')") from None
    return key_id.encode("ascii")


@dataclass
class Header:
    """A parsed header. In v1, ``static`` (bytes 0..95) never changes after creation;
    in v2 only ``key_version`` in it may (``aad_prefix`` leaves it out)."""

    key_id: str
    key_version: int
    file_id: bytes = field(default_factory=lambda: os.urandom(16))
    block_size: int = DEFAULT_BLOCK_SIZE
    plaintext_size: int = 0
    #: block encryptions reserved so far under the file key (an upper bound of those done)
    encryptions: int = 0
    flags: int = 0
    algorithm: int = ALG_AES256GCM_HKDF
    version: int = VERSION
    tag: bytes = b""
    #: v2: the lowest key version any block may have (v1: always ``key_version``)
    oldest_version: int = 0

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise FormatError(f"unsupported TAKA version {self.version}")
        if self.version == 1 or not self.oldest_version:
            self.oldest_version = self.key_version
        validate_key_id(self.key_id)
        if not _valid_block_size(self.block_size):
            raise FormatError(f"invalid block size {self.block_size}")
        if not 1 <= self.key_version <= 0xFFFFFFFF:
            raise FormatError(f"invalid key version {self.key_version}")
        if len(self.file_id) != 16:
            raise FormatError("file id must be 16 bytes")
        if not 0 <= self.plaintext_size <= MAX_PLAINTEXT_SIZE:
            raise FormatError(f"invalid plaintext size {self.plaintext_size}")
        if not 0 <= self.encryptions < 1 << (64 if self.version == 1 else 32):
            raise FormatError(f"invalid encryption count {self.encryptions}")
        if self.version == 1 and self.oldest_version != self.key_version:
            raise FormatError("a v1 file has one key version")
        if not 1 <= self.oldest_version <= self.key_version:
            raise FormatError(f"oldest key version {self.oldest_version} is not in "
                              f"1..{self.key_version}")

    @property
    def static(self) -> bytes:
        raw = self.key_id.encode("utf-8")
        return _STATIC.pack(MAGIC, self.version, self.algorithm, self.flags, self.block_size,
                            self.key_version, self.file_id, len(raw), raw)

    @property
    def aad_prefix(self) -> bytes:
        """What every block's AAD starts with: bytes 0..95, in v2 with the write
        version (bytes 12..15) zeroed, since it changes while blocks keep theirs."""
        st = self.static
        return st if self.version == 1 else st[:12] + bytes(4) + st[16:]

    def unsigned(self) -> bytes:
        """Bytes 0..111: what the header tag covers."""
        if self.version == 1:
            return self.static + _DYNAMIC.pack(self.plaintext_size, self.encryptions)
        return self.static + _DYNAMIC_V2.pack(self.plaintext_size, self.encryptions,
                                              self.oldest_version)

    @property
    def versions(self) -> range:
        """The key versions the file's blocks may use (v1: exactly one)."""
        return range(self.oldest_version, self.key_version + 1)

    @property
    def hkdf_info(self) -> bytes:
        return HKDF_INFO if self.version == 1 else HKDF_INFO_V2

    def pack(self, mac_key: bytes | bytearray) -> bytes:
        """Serialise with a fresh tag (also stored in ``self.tag``)."""
        body = self.unsigned()
        self.tag = header_tag(mac_key, body)
        return body + self.tag

    def verify(self, mac_key: bytes | bytearray) -> None:
        if not hmac.compare_digest(header_tag(mac_key, self.unsigned()), self.tag):
            raise IntegrityError("header failed authentication (tampered, or wrong key)")

    # geometry -------------------------------------------------------------------------
    @property
    def stored_block_size(self) -> int:
        return self.block_size + OVERHEAD

    @property
    def nblocks(self) -> int:
        return blocks_for(self.plaintext_size, self.block_size)

    def block_offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.stored_block_size

    @property
    def stored_size(self) -> int:
        return stored_size(self.plaintext_size, self.block_size)


def header_tag(mac_key: bytes | bytearray, body: bytes) -> bytes:
    return hmac.new(bytes(mac_key), body, hashlib.sha256).digest()[:TAG_SIZE]


def blocks_for(plaintext_size: int, block_size: int) -> int:
    return -(-plaintext_size // block_size)


def stored_size(plaintext_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Size of a well-formed TAKA file holding ``plaintext_size`` bytes."""
    return HEADER_SIZE + plaintext_size + blocks_for(plaintext_size, block_size) * OVERHEAD


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate the 128 header bytes (the tag is checked later, with the key).

    Any malformed input raises :class:`FormatError` and nothing else.
    """
    data = bytes(data[:HEADER_SIZE])
    if len(data) < HEADER_SIZE:
        if not data.startswith(MAGIC[: len(data)]) or len(data) < 4:
            raise FormatError("not a TAKA file (no TAKA magic)")
        raise FormatError(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    (magic, version, algorithm, flags, block_size, key_version, file_id, klen,
     kraw) = _STATIC.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError("not a TAKA file (no TAKA magic)")
    if version not in VERSIONS:
        raise FormatError(f"unsupported TAKA version {version} (this build reads 1 and 2)")
    if version == 1:
        size, encryptions = _DYNAMIC.unpack_from(data, STATIC_SIZE)
        oldest = key_version
    else:
        size, encryptions, oldest = _DYNAMIC_V2.unpack_from(data, STATIC_SIZE)
    if algorithm not in ALGORITHMS:
        raise FormatError(f"unknown algorithm {algorithm}")
    if flags:
        raise FormatError(f"unknown flags 0x{flags:04x}")
    if not _valid_block_size(block_size):
        raise FormatError(f"invalid block size {block_size}")
    if key_version == 0:
        raise FormatError("invalid key version 0")
    if not 1 <= oldest <= key_version:
        raise FormatError(f"oldest key version {oldest} is not in 1..{key_version}")
    if not 1 <= klen <= KEY_ID_MAX:
        raise FormatError(f"invalid key id length {klen}")
    if any(kraw[klen:]):
        raise FormatError("key id padding is not zero")
    try:
        key_id = kraw[:klen].decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("key id is not a valid key name (not ASCII)") from None
    validate_key_id(key_id)
    if size > MAX_PLAINTEXT_SIZE:
        raise FormatError(f"invalid plaintext size {size}")
    return Header(key_id=key_id, key_version=key_version, file_id=file_id,
                  block_size=block_size, plaintext_size=size, encryptions=encryptions,
                  flags=flags, algorithm=algorithm, version=version,
                  tag=data[TAG_OFFSET:HEADER_SIZE], oldest_version=oldest)


def derive_file_keys(data_key: bytes | bytearray, file_id: bytes, *,
                     info: bytes = HKDF_INFO) -> tuple[bytearray, bytearray]:
    """(block key, header MAC key) for one file (v2: for one key version of it, with
    ``info=HKDF_INFO_V2``). Callers wipe both when done."""
    if len(data_key) != 32:
        raise FormatError("data key must be 32 bytes")
    # imported here: `takakrypt` commands that never derive a key start without them
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from .keys.secret import lock, wipe

    # straight into locked buffers: no immutable copy of the data key or of the file
    # keys is left for the garbage collector (docs/keys.md, "Keys in memory")
    okm = bytearray(64)
    lock(okm)
    HKDF(algorithm=hashes.SHA256(), length=64, salt=file_id,
         info=info).derive_into(data_key, okm)
    enc, mac = bytearray(32), bytearray(32)
    lock(enc)
    lock(mac)
    enc[:], mac[:] = okm[:32], okm[32:]
    wipe(okm)
    return enc, mac
