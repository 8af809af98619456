"""The local keystore: the embedded, default :class:`~takakrypt.keys.backend.KeyBackend`.

One JSON file holds every key.  Each key version's 32 bytes are wrapped with
AES-256-GCM under a key-encryption key (KEK) that is derived either from a
passphrase (Argon2id) or from a 32-byte master key file (HKDF-SHA256).  The whole
file is authenticated with HMAC-SHA256, so any edit, deletion, reordering or partial
revert inside the file is detected.  Updates are atomic (temp file + fsync + rename +
directory fsync) and serialised across processes with ``flock`` on a sidecar
``<path>.lock`` file.

The file format, KDF parameters and threat model are documented in ``docs/keys.md``.

Typical use (this is what the CLI does)::

    from takakrypt.keys import open_keystore
    with open_keystore("/etc/takakrypt/keystore.json",
                       master_key_file="/etc/takakrypt/master.key",
                       create=True) as ks:
        ks.create("payroll")
        key = ks.get("payroll")          # bytearray(32), caller wipes
        try:
            ...
        finally:
            wipe(key)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import (
    KeyError_,
    KeyExists,
    KeyInUse,
    KeyNotFound,
    KeyRetired,
    KeystoreCorrupt,
    KeystoreLocked,
    UsageError,
)
from .backend import (
    ALGORITHM,
    KEY_BYTES,
    KeyBackend,
    KeyInfo,
    KeyVersionInfo,
    check_version,
    now_rfc3339,
    validate_key_name,
)
from .secret import Secret, lock, random_secret, scrub_stack, wipe

__all__ = [
    "Argon2Params",
    "DEFAULT_KDF_PARAMS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Keystore",
    "generate_master_key_file",
    "open_keystore",
]

log = logging.getLogger("takakrypt.keys")

FORMAT_NAME = "takakrypt-keystore"
FORMAT_VERSION = 1

SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
MAC_BYTES = 32
CHECK_BYTES = 32
KEYSTORE_ID_BYTES = 16
MASTER_KEY_BYTES = 32
#: refuse to parse keystore files larger than this (a keystore with 10,000 keys of
#: 10 versions each is about 2 MiB)
MAX_FILE_BYTES = 64 * 1024 * 1024

# Argon2id parameter bounds accepted in a file or from the caller.  The lower
# bounds are Argon2's own minimums (tests use them for speed); the upper bounds
# stop a crafted file from making the loader allocate unbounded memory or time.
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB
ARGON2_MAX_ITERATIONS = 64
ARGON2_MAX_LANES = 64

_LABEL = b"takakrypt-keystore/v1/"

#: Test hook: called with the name of each step of an atomic write
#: ("tmp-created", "tmp-written", "tmp-fsynced", "renamed", "dir-fsynced").
#: Tests set it to raise or to ``os._exit`` to simulate a crash at that point.
_fault_hook: Callable[[str], None] | None = None

_T = TypeVar("_T")


def _fault(step: str) -> None:
    hook = _fault_hook
    if hook is not None:
        hook(step)


# --------------------------------------------------------------------------- params


class Argon2Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Argon2id cost parameters for passphrase-protected keystores.

    Defaults: 64 MiB of memory, 3 passes, 1 lane (about 0.25 s on a current x86 core).
    Lower values are accepted (down to Argon2's minimum: 8 KiB per lane, 1 pass) so
    tests can run fast; do not lower them in production.
    """

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 1

    def problem(self) -> str | None:
        """Why these parameters are unacceptable, or None if they are fine."""
        for field in ("memory_kib", "iterations", "lanes"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                return f"argon2id {field} must be an integer"
        if not 1 <= self.lanes <= ARGON2_MAX_LANES:
            return f"argon2id lanes must be between 1 and {ARGON2_MAX_LANES}"
        if not 1 <= self.iterations <= ARGON2_MAX_ITERATIONS:
            return f"argon2id iterations must be between 1 and {ARGON2_MAX_ITERATIONS}"
        if not 8 * self.lanes <= self.memory_kib <= ARGON2_MAX_MEMORY_KIB:
            return (
                f"argon2id memory_kib must be between 8*lanes and {ARGON2_MAX_MEMORY_KIB}"
            )
        return None


DEFAULT_KDF_PARAMS = Argon2Params()


def _coerce_params(kdf_params: Any) -> Argon2Params:
    if kdf_params is None:
        return DEFAULT_KDF_PARAMS
    if isinstance(kdf_params, Argon2Params):
        p = kdf_params
    elif isinstance(kdf_params, Mapping):
        try:
            p = msgspec.convert(dict(kdf_params), Argon2Params)
        except msgspec.ValidationError as e:
            raise UsageError(f"invalid kdf_params: {e}") from None
    else:
        raise UsageError("kdf_params must be an Argon2Params or a mapping")
    why = p.problem()
    if why:
        raise UsageError(f"invalid kdf_params: {why}")
    return p


# ---------------------------------------------------------------------- file format


class _Argon2idKdf(msgspec.Struct, tag="argon2id", tag_field="alg", forbid_unknown_fields=True):
    salt: str
    memory_kib: int
    iterations: int
    lanes: int


class _MasterKeyKdf(
    msgspec.Struct, tag="hkdf-sha256", tag_field="alg", forbid_unknown_fields=True
):
    salt: str


class _VersionRec(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    created: str
    state: str
    nonce: str
    wrapped: str


class _KeyRec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    algorithm: str
    current_version: int
    versions: list[_VersionRec]


class _Doc(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    keystore_id: str
    created: str
    generation: int
    kdf: _Argon2idKdf | _MasterKeyKdf
    check: str
    keys: list[_KeyRec]
    mac: str


_HEX_ID_RE = re.compile(r"[0-9a-f]{%d}" % (2 * KEYSTORE_ID_BYTES))
_RFC3339_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(s: str, n: int) -> bytes | None:
    """Decode strict base64 of exactly ``n`` bytes, or None."""
    try:
        out = base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return out if len(out) == n else None


def _valid_time(s: str) -> bool:
    if not _RFC3339_RE.fullmatch(s):
        return False
    try:
        datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _structure_problem(doc: _Doc) -> str | None:
    """First structural problem of a decoded document (no secrets needed), or None."""
    if not _HEX_ID_RE.fullmatch(doc.keystore_id):
        return "keystore_id is not 32 lowercase hex digits"
    if not _valid_time(doc.created):
        return "created is not an RFC 3339 UTC timestamp"
    if doc.generation < 0:
        return "generation is negative"
    kdf = doc.kdf
    if _unb64(kdf.salt, SALT_BYTES) is None:
        return f"kdf.salt is not {SALT_BYTES} bytes of base64"
    if isinstance(kdf, _Argon2idKdf):
        why = Argon2Params(kdf.memory_kib, kdf.iterations, kdf.lanes).problem()
        if why:
            return f"kdf: {why}"
    if _unb64(doc.check, CHECK_BYTES) is None:
        return f"check is not {CHECK_BYTES} bytes of base64"
    if _unb64(doc.mac, MAC_BYTES) is None:
        return f"mac is not {MAC_BYTES} bytes of base64"
    prev: str | None = None
    for i, k in enumerate(doc.keys):
        where = f"keys[{i}]"
        try:
            validate_key_name(k.name)
        except UsageError:
            return f"{where}.name is not a valid key name"
        if prev is not None and not prev < k.name:
            return f"{where}: keys are not sorted by name or a name is repeated"
        prev = k.name
        if k.algorithm != ALGORITHM:
            return f"{where}.algorithm is not {ALGORITHM}"
        if not k.versions:
            return f"{where} has no versions"
        if k.current_version != len(k.versions):
            return f"{where}.current_version does not match its versions"
        for j, v in enumerate(k.versions):
            vw = f"{where}.versions[{j}]"
            if v.version != j + 1:
                return f"{vw}.version is not {j + 1}"
            if v.state not in ("active", "retired"):
                return f"{vw}.state is not 'active' or 'retired'"
            if not _valid_time(v.created):
                return f"{vw}.created is not an RFC 3339 UTC timestamp"
            if v.state == "retired":
                if v.version == k.current_version:
                    return f"{vw}: the current version cannot be retired"
                if v.nonce or v.wrapped:
                    return f"{vw}: a retired version keeps no nonce or wrapped key"
                continue
            if _unb64(v.nonce, NONCE_BYTES) is None:
                return f"{vw}.nonce is not {NONCE_BYTES} bytes of base64"
            if _unb64(v.wrapped, KEY_BYTES + TAG_BYTES) is None:
                return f"{vw}.wrapped is not {KEY_BYTES + TAG_BYTES} bytes of base64"
    return None


def _parse(raw: bytes, shown: str) -> _Doc:
    """Decode and structurally validate a keystore file; KeystoreCorrupt on any problem."""
    if len(raw) > MAX_FILE_BYTES:
        raise KeystoreCorrupt(f"keystore {shown} is too large ({len(raw)} bytes)")
    if not raw.strip():
        raise KeystoreCorrupt(f"keystore {shown} is empty")
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise KeystoreCorrupt(f"keystore {shown} is not valid JSON ({e})") from None
    except UnicodeDecodeError:  # msgspec raises it for bad UTF-8 inside a string
        raise KeystoreCorrupt(f"keystore {shown} is not valid JSON (not UTF-8)") from None
    except RecursionError:
        raise KeystoreCorrupt(f"keystore {shown} is not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise KeystoreCorrupt(f"{shown} is not a takakrypt keystore (no format marker)")
    ver = obj.get("version")
    if not _is_int(ver):
        raise KeystoreCorrupt(f"keystore {shown} has no valid format version")
    if ver != FORMAT_VERSION:
        raise KeystoreCorrupt(
            f"keystore {shown} has unsupported format version {ver} "
            f"(this takakrypt reads version {FORMAT_VERSION})"
        )
    try:
        doc = msgspec.convert(obj, _Doc)
    except msgspec.ValidationError as e:
        raise KeystoreCorrupt(f"keystore {shown} is malformed: {e}") from None
    why = _structure_problem(doc)
    if why:
        raise KeystoreCorrupt(f"keystore {shown} is malformed: {why}")
    return doc


def _mac_input(doc: _Doc) -> bytes:
    """Canonical bytes covered by the file MAC: every field except ``mac``."""
    d = msgspec.to_builtins(doc)
    del d["mac"]
    return _LABEL + b"mac\x00" + msgspec.json.encode(d, order="sorted")


def _encode(doc: _Doc) -> bytes:
    """The file's bytes: indented JSON for human inspection (the MAC does not depend
    on the layout, only on the values; see :func:`_mac_input`)."""
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


def _aad(keystore_id: str, name: str, version: int) -> bytes:
    kid = keystore_id.encode("ascii")
    nm = name.encode("utf-8")
    return (
        _LABEL
        + b"wrap\x00"
        + len(kid).to_bytes(2, "big")
        + kid
        + len(nm).to_bytes(2, "big")
        + nm
        + version.to_bytes(8, "big")
    )


# ------------------------------------------------------------------- key derivation


class _Credential:
    """The caller's passphrase or master key, as a wipeable secret."""

    def __init__(self, passphrase: Any, master_key_file: Any) -> None:
        if (passphrase is None) == (master_key_file is None):
            raise UsageError("give exactly one of a passphrase or a master key file")
        self.kind: str
        self.source = ""
        if passphrase is not None:
            self.kind = "passphrase"
            if isinstance(passphrase, str):
                buf = bytearray(unicodedata.normalize("NFC", passphrase).encode("utf-8"))
            elif isinstance(passphrase, (bytes, bytearray, memoryview)):
                buf = bytearray(passphrase)
            else:
                raise UsageError("passphrase must be str or bytes")
            if not buf:
                raise UsageError("the passphrase must not be empty")
            self.secret = Secret.take(buf)
        else:
            self.kind = "master-key-file"
            self.source = os.fspath(master_key_file)
            self.secret = Secret.take(_read_master_key(self.source))

    def wipe(self) -> None:
        self.secret.wipe()


#: characters a NEW keystore's passphrase needs at least (docs/keys.md); existing
#: keystores open with whatever passphrase they were made with
MIN_PASSPHRASE = 8


def _check_new_passphrase(cred: _Credential) -> None:
    # code points, counted in place: no unwipeable copy of the passphrase
    n = sum(1 for b in cred.secret.value if b & 0xC0 != 0x80)
    if n < MIN_PASSPHRASE:
        raise UsageError(f"the passphrase of a new keystore must be at least "
                         f"{MIN_PASSPHRASE} characters (got {n}); or use a master key file")


def _read_master_key(path: str) -> bytearray:
    buf = bytearray(MASTER_KEY_BYTES + 1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot open master key file {path}: {e.strerror}") from None
    try:
        n = 0
        with contextlib.suppress(Exception):
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                log.warning("master key file %s is accessible by group/others", path)
        while n < len(buf):
            got = os.readv(fd, [memoryview(buf)[n:]])
            if got == 0:
                break
            n += got
    except OSError as e:
        wipe(buf)
        raise UsageError(f"cannot read master key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if n != MASTER_KEY_BYTES:
        wipe(buf)
        raise UsageError(
            f"master key file {path} must contain exactly {MASTER_KEY_BYTES} bytes"
            + (" (it is longer)" if n > MASTER_KEY_BYTES else f" (it has {n})")
        )
    del buf[MASTER_KEY_BYTES:]
    return buf


def _hkdf_into(ikm: bytearray, info: bytes, salt: bytes | None = None) -> bytearray:
    out = bytearray(32)
    lock(out)
    HKDF(hashes.SHA256(), 32, salt, info).derive_into(ikm, out)
    return out


class _Keys:
    """Subkeys derived from the KEK: kept in memory while the keystore is open."""

    def __init__(self, wrap: Secret, mac: Secret, check: bytes) -> None:
        self.wrap = wrap
        self.mac = mac
        self.check = check

    def wipe(self) -> None:
        self.wrap.wipe()
        self.mac.wipe()


def _derive(kdf: _Argon2idKdf | _MasterKeyKdf, cred: _Credential, shown: str) -> _Keys:
    if isinstance(kdf, _Argon2idKdf) and cred.kind != "passphrase":
        raise KeystoreLocked(
            f"keystore {shown} is protected by a passphrase, not a master key file"
        )
    if isinstance(kdf, _MasterKeyKdf) and cred.kind != "master-key-file":
        raise KeystoreLocked(
            f"keystore {shown} is protected by a master key file, not a passphrase"
        )
    salt = base64.b64decode(kdf.salt)
    kek = bytearray(32)
    lock(kek)
    try:
        if isinstance(kdf, _Argon2idKdf):
            Argon2id(
                salt=salt,
                length=32,
                iterations=kdf.iterations,
                lanes=kdf.lanes,
                memory_cost=kdf.memory_kib,
            ).derive_into(cred.secret.value, kek)
        else:
            HKDF(hashes.SHA256(), 32, salt, _LABEL + b"master-key-file").derive_into(
                cred.secret.value, kek
            )
        wrap = Secret.take(_hkdf_into(kek, _LABEL + b"kek/wrap"))
        mac = Secret.take(_hkdf_into(kek, _LABEL + b"kek/mac"))
        check_key = _hkdf_into(kek, _LABEL + b"kek/check")
        try:
            check = hmac.new(check_key, _LABEL + b"check", "sha256").digest()
        finally:
            wipe(check_key)
    finally:
        wipe(kek)
        scrub_stack()  # the KDFs' copies of the KEK and subkeys
    return _Keys(wrap, mac, check)


# ------------------------------------------------------------------------ file I/O


_Sig = tuple[int, int, int, int, int]


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(target: str, data: bytes) -> _Sig:
    """Replace ``target`` with ``data`` atomically and durably; returns the new stat sig.

    temp file (same dir, O_EXCL, 0600) -> write -> fsync -> rename -> fsync(dir).
    A crash at any point leaves either the old or the new file at ``target``.
    """
    d, base = os.path.split(target)
    tmp = os.path.join(d, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        try:
            _fault("tmp-created")
            os.fchmod(fd, 0o600)
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
            _fault("tmp-written")
            os.fsync(fd)
            _fault("tmp-fsynced")
            sig = _sig(os.fstat(fd))
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fault("renamed")
    _fsync_dir(d or ".")
    _fault("dir-fsynced")
    return sig


def _remove_stale_temps(target: str) -> None:
    """Delete temp files left by writers that crashed (call with the lock held)."""
    d, base = os.path.split(target)
    prefix = f".{base}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(d or "."):
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


# ------------------------------------------------------------------------ keystore


class Keystore(KeyBackend):
    """A key store in one local file, protected by a passphrase or a master key file.

    ``Keystore(path, passphrase=... | master_key_file=...)`` opens an existing
    keystore (UsageError if there is none); with ``create=True`` a missing keystore
    is created first (``exist_ok=False`` makes an existing one an error).  Prefer
    :func:`open_keystore` or :meth:`Keystore.new`.

    What stays in memory while the keystore is open: the two 32-byte subkeys
    derived from the KEK (the wrapping key and the file-MAC key) in wipeable
    buffers, the decoded file (wrapped material only) and the check value.  The
    passphrase / master key and the KEK itself are wiped as soon as the subkeys are
    derived, before the constructor returns.  ``close()`` wipes the subkeys.

    Thread-safe (an ``RLock`` serialises calls); safe across processes (every
    update re-reads the file under an exclusive ``flock`` on ``<path>.lock``).
    Changes made by other processes are picked up automatically: every call checks
    whether the file was replaced and, if so, re-reads and re-verifies it.
    """

    backend_name = "local"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: bytes | bytearray | str | None = None,
        master_key_file: str | os.PathLike[str] | None = None,
        kdf_params: Argon2Params | Mapping[str, int] | None = None,
        create: bool = False,
        exist_ok: bool = True,
    ) -> None:
        self._shown = os.fspath(path)
        # Writes replace the real file, not a symlink pointing at it.
        self._target = os.path.realpath(self._shown)
        self._lock = threading.RLock()
        self._closed = True
        self._keys: _Keys | None = None
        self._doc: _Doc | None = None
        self._sig: _Sig | None = None
        if kdf_params is not None and (master_key_file is not None or not create):
            raise UsageError(
                "kdf_params only apply when creating a passphrase-protected keystore"
            )
        params = _coerce_params(kdf_params)
        cred = _Credential(passphrase, master_key_file)
        try:
            if create:
                self._create_or_open(cred, params, exist_ok)
            else:
                self._open(cred)
        finally:
            cred.wipe()
        self._closed = False

    # ----------------------------------------------------------- construction

    @classmethod
    def new(
        cls,
        path: str | os.PathLike[str],
        *,
        passphrase: bytes | bytearray | str | None = None,
        master_key_file: str | os.PathLike[str] | None = None,
        kdf_params: Argon2Params | Mapping[str, int] | None = None,
    ) -> "Keystore":
        """Create a new, empty keystore at ``path``; UsageError if one exists.

        (Named ``new`` because ``create`` is the :class:`KeyBackend` method that
        creates a *key* in an open keystore.)
        """
        return cls(
            path,
            passphrase=passphrase,
            master_key_file=master_key_file,
            kdf_params=kdf_params,
            create=True,
            exist_ok=False,
        )

    def _open(self, cred: _Credential) -> None:
        raw, sig = self._read()
        doc = _parse(raw, self._shown)
        keys = _derive(doc.kdf, cred, self._shown)
        try:
            if not hmac.compare_digest(keys.check, base64.b64decode(doc.check)):
                raise KeystoreLocked(f"wrong passphrase or master key for keystore {self._shown}")
            self._verify_mac(doc, keys)
        except BaseException:
            keys.wipe()
            raise
        self._keys, self._doc, self._sig = keys, doc, sig

    def _create_or_open(self, cred: _Credential, params: Argon2Params, exist_ok: bool) -> None:
        if exist_ok and os.path.lexists(self._target):
            # plain open: needs no lock (and so no write access to the directory)
            self._open(cred)
            return
        parent = os.path.dirname(self._target) or "."
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
                os.chmod(parent, 0o700)
            except OSError as e:
                raise KeyError_(
                    f"cannot create keystore directory {parent}: {e.strerror}"
                ) from None
        with self._file_lock():
            if os.path.lexists(self._target):
                if not exist_ok:
                    raise UsageError(f"keystore {self._shown} already exists")
                self._open(cred)
                return
            if cred.kind == "passphrase":
                _check_new_passphrase(cred)
            salt = _b64(os.urandom(SALT_BYTES))
            kdf: _Argon2idKdf | _MasterKeyKdf
            if cred.kind == "passphrase":
                kdf = _Argon2idKdf(salt, params.memory_kib, params.iterations, params.lanes)
            else:
                kdf = _MasterKeyKdf(salt)
            keys = _derive(kdf, cred, self._shown)
            try:
                doc = _Doc(
                    format=FORMAT_NAME,
                    version=FORMAT_VERSION,
                    keystore_id=os.urandom(KEYSTORE_ID_BYTES).hex(),
                    created=now_rfc3339(),
                    generation=0,
                    kdf=kdf,
                    check=_b64(keys.check),
                    keys=[],
                    mac="",
                )
                doc.mac = _b64(self._compute_mac(doc, keys))
                sig = self._write(_encode(doc))
            except BaseException:
                keys.wipe()
                raise
            self._keys, self._doc, self._sig = keys, doc, sig
            log.info("created keystore %s (%s)", self._shown, cred.kind)

    # ------------------------------------------------------------------ helpers

    def _read(self) -> tuple[bytes, _Sig]:
        try:
            # O_NONBLOCK: a FIFO planted at PATH must not hang the open
            fd = os.open(self._target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise UsageError(
                f"keystore {self._shown} does not exist (create it first)"
            ) from None
        except OSError as e:
            raise KeyError_(f"cannot open keystore {self._shown}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeystoreCorrupt(f"keystore {self._shown} is not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise KeystoreCorrupt(f"keystore {self._shown} is too large")
            chunks = []
            total = 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
                total += len(b)
                if total > MAX_FILE_BYTES:
                    raise KeystoreCorrupt(f"keystore {self._shown} is too large")
            return b"".join(chunks), _sig(st)
        except OSError as e:
            raise KeystoreCorrupt(f"cannot read keystore {self._shown}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _write(self, data: bytes) -> _Sig:
        try:
            _remove_stale_temps(self._target)
            return _write_atomic(self._target, data)
        except OSError as e:
            raise KeyError_(f"cannot write keystore {self._shown}: {e.strerror}") from None

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        lock_path = self._target + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise KeyError_(f"cannot open keystore lock {lock_path}: {e.strerror}") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries already
                    continue
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _compute_mac(doc: _Doc, keys: _Keys) -> bytes:
        try:
            return hmac.new(keys.mac.value, _mac_input(doc), "sha256").digest()
        finally:
            scrub_stack()  # HMAC's keyed states: as good as K_mac

    def _verify_mac(self, doc: _Doc, keys: _Keys) -> None:
        if not hmac.compare_digest(self._compute_mac(doc, keys), base64.b64decode(doc.mac)):
            raise KeystoreCorrupt(
                f"keystore {self._shown} failed its integrity check (modified or damaged)"
            )

    def _check_open(self) -> _Keys:
        if self._closed or self._keys is None:
            raise UsageError(f"keystore {self._shown} is closed")
        return self._keys

    def _load(self, *, force: bool) -> _Doc:
        """Current verified document; re-read from disk if the file changed (or force)."""
        keys = self._check_open()
        assert self._doc is not None
        if not force:
            try:
                st = os.stat(self._target)
            except FileNotFoundError:
                raise KeystoreCorrupt(f"keystore {self._shown} has disappeared") from None
            except OSError as e:
                raise KeyError_(f"cannot stat keystore {self._shown}: {e.strerror}") from None
            if _sig(st) == self._sig:
                return self._doc
        raw, sig = self._read()
        if sig == self._sig:
            return self._doc
        doc = _parse(raw, self._shown)
        old = self._doc
        if (
            doc.keystore_id != old.keystore_id
            or doc.kdf != old.kdf
            or doc.check != old.check
        ):
            raise KeystoreCorrupt(
                f"keystore {self._shown} was replaced by a different keystore; reopen it"
            )
        self._verify_mac(doc, keys)
        if doc.generation < old.generation:
            raise KeystoreCorrupt(
                f"keystore {self._shown} went back to an older generation "
                f"({doc.generation} < {old.generation}): restored from backup?"
            )
        self._doc, self._sig = doc, sig
        return doc

    def _update(self, fn: Callable[[_Doc, _Keys], tuple[_Doc, _T]]) -> _T:
        """Read-modify-write under the thread lock and the exclusive file lock."""
        with self._lock:
            keys = self._check_open()
            with self._file_lock():
                # work on a shallow copy: the cached document must stay intact if
                # fn or the write fails (fn replaces lists, never mutates them)
                doc = self._load(force=True)
                new, result = fn(msgspec.structs.replace(doc), keys)
                new.generation = doc.generation + 1
                new.mac = _b64(self._compute_mac(new, keys))
                sig = self._write(_encode(new))
                self._doc, self._sig = new, sig
                return result

    def _wrap_new_version(self, doc: _Doc, keys: _Keys, name: str, version: int) -> _VersionRec:
        material = random_secret(KEY_BYTES)
        try:
            nonce = os.urandom(NONCE_BYTES)
            ct = AESGCM(keys.wrap.value).encrypt(
                nonce, material, _aad(doc.keystore_id, name, version)
            )
        finally:
            wipe(material)
            scrub_stack()
        return _VersionRec(version, now_rfc3339(), "active", _b64(nonce), _b64(ct))

    @staticmethod
    def _find(doc: _Doc, name: str) -> tuple[int, _KeyRec | None]:
        lo, hi = 0, len(doc.keys)
        while lo < hi:
            mid = (lo + hi) // 2
            if doc.keys[mid].name < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(doc.keys) and doc.keys[lo].name == name:
            return lo, doc.keys[lo]
        return lo, None

    @staticmethod
    def _info(rec: _KeyRec) -> KeyInfo:
        return KeyInfo(
            name=rec.name,
            current_version=rec.current_version,
            versions=[KeyVersionInfo(v.version, v.created, v.state) for v in rec.versions],
            algorithm=rec.algorithm,
            backend=Keystore.backend_name,
        )

    # ------------------------------------------------------------- KeyBackend API

    def create(self, name: str) -> KeyInfo:
        """Create key ``name`` (version 1). KeyExists if it exists."""
        validate_key_name(name)

        def fn(doc: _Doc, keys: _Keys) -> tuple[_Doc, KeyInfo]:
            idx, rec = self._find(doc, name)
            if rec is not None:
                raise KeyExists(f"key {name!r} already exists in keystore {self._shown}")
            rec = _KeyRec(name, ALGORITHM, 1, [self._wrap_new_version(doc, keys, name, 1)])
            doc.keys = doc.keys[:idx] + [rec] + doc.keys[idx:]
            return doc, self._info(rec)

        info = self._update(fn)
        log.info("created key %s version 1 in %s", name, self._shown)
        return info

    def rotate(self, name: str) -> KeyInfo:
        """Add version ``current + 1`` to ``name`` and make it current."""
        validate_key_name(name)

        def fn(doc: _Doc, keys: _Keys) -> tuple[_Doc, KeyInfo]:
            idx, rec = self._find(doc, name)
            if rec is None:
                raise KeyNotFound(f"key {name!r} not found in keystore {self._shown}")
            v = rec.current_version + 1
            new = _KeyRec(
                rec.name,
                rec.algorithm,
                v,
                rec.versions + [self._wrap_new_version(doc, keys, name, v)],
            )
            doc.keys = doc.keys[:idx] + [new] + doc.keys[idx + 1 :]
            return doc, self._info(new)

        info = self._update(fn)
        log.info("rotated key %s to version %d in %s", name, info.current_version, self._shown)
        return info

    def retire(self, name: str, version: int) -> KeyInfo:
        """Destroy version ``version`` of ``name``: its wrapped material is erased from
        the file (state ``retired``); files naming it can no longer be decrypted.  The
        current version cannot be retired (``KeyInUse``).  Retiring a retired version
        again changes nothing."""
        validate_key_name(name)
        if check_version(version) is None:
            raise UsageError("retire: give the version to retire")

        def fn(doc: _Doc, keys: _Keys) -> tuple[_Doc, KeyInfo]:
            idx, rec = self._find(doc, name)
            if rec is None:
                raise KeyNotFound(f"key {name!r} not found in keystore {self._shown}")
            if not 1 <= version <= rec.current_version:
                raise KeyNotFound(f"key {name!r} has no version {version} "
                                  f"(versions 1-{rec.current_version}) in keystore {self._shown}")
            if version == rec.current_version:
                raise KeyInUse(f"version {version} is the current version of key {name!r}: "
                               "rotate first")
            vs = list(rec.versions)
            old = vs[version - 1]
            vs[version - 1] = _VersionRec(old.version, old.created, "retired", "", "")
            new = _KeyRec(rec.name, rec.algorithm, rec.current_version, vs)
            doc.keys = doc.keys[:idx] + [new] + doc.keys[idx + 1 :]
            return doc, self._info(new)

        info = self._update(fn)
        log.info("retired version %d of key %s in %s", version, name, self._shown)
        return info

    def get(self, name: str, version: int | None = None) -> bytearray:
        """The 32-byte material of ``name`` at ``version`` (None = current).

        Returns a new bytearray owned by the caller, who must wipe it.
        """
        validate_key_name(name)
        check_version(version)
        with self._lock:
            doc = self._load(force=False)
            keys = self._check_open()
            _, rec = self._find(doc, name)
            if rec is None:
                raise KeyNotFound(f"key {name!r} not found in keystore {self._shown}")
            v = rec.current_version if version is None else version
            if not 1 <= v <= rec.current_version:
                raise KeyNotFound(
                    f"key {name!r} has no version {v} "
                    f"(versions 1-{rec.current_version}) in keystore {self._shown}"
                )
            vr = rec.versions[v - 1]
            if vr.state == "retired":
                raise KeyRetired(f"key {name!r} version {v} was retired (its material is "
                                 f"destroyed) in keystore {self._shown}")
            out = bytearray(KEY_BYTES)
            lock(out)  # released by the caller's wipe()
            try:
                AESGCM(keys.wrap.value).decrypt_into(
                    base64.b64decode(vr.nonce),
                    base64.b64decode(vr.wrapped),
                    _aad(doc.keystore_id, name, v),
                    out,
                )
            except InvalidTag:
                wipe(out)
                raise KeystoreCorrupt(
                    f"key {name!r} version {v} in keystore {self._shown} cannot be unwrapped"
                ) from None
            finally:
                scrub_stack()  # OpenSSL's copies of the wrapping key
            return out

    def info(self, name: str) -> KeyInfo:
        validate_key_name(name)
        with self._lock:
            _, rec = self._find(self._load(force=False), name)
            if rec is None:
                raise KeyNotFound(f"key {name!r} not found in keystore {self._shown}")
            return self._info(rec)

    def list(self) -> list[KeyInfo]:  # noqa: A003
        with self._lock:
            return [self._info(r) for r in self._load(force=False).keys]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._keys is not None:
                self._keys.wipe()
                self._keys = None

    # ------------------------------------------------------------------- extras

    @property
    def path(self) -> str:
        """The keystore path as given by the caller."""
        return self._shown

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def protection(self) -> str:
        """``"passphrase"`` (Argon2id) or ``"master-key-file"`` (HKDF-SHA256)."""
        if self._doc is None:
            return "unknown"
        return "passphrase" if isinstance(self._doc.kdf, _Argon2idKdf) else "master-key-file"

    @property
    def keystore_id(self) -> str:
        """Random identifier of this keystore (hex), bound into every wrapped key."""
        assert self._doc is not None
        return self._doc.keystore_id

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Keystore path={self._shown!r} protection={self.protection} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("Keystore objects cannot be pickled")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._keys is not None:
                self._keys.wipe()


# ------------------------------------------------------------------ module helpers


def open_keystore(
    path: str | os.PathLike[str],
    *,
    passphrase: bytes | bytearray | str | None = None,
    master_key_file: str | os.PathLike[str] | None = None,
    create: bool = False,
    kdf_params: Argon2Params | Mapping[str, int] | None = None,
) -> Keystore:
    """Open (or with ``create=True``, create if missing) the local keystore at ``path``.

    Arguments:
      path: the keystore file.  Its parent directory is created with mode 0700 if
        missing (only when creating); the file is always mode 0600.
      passphrase / master_key_file: exactly one is required (else ``UsageError``).
        A passphrase (``str`` is NFC-normalised and UTF-8 encoded; pass a
        ``bytearray`` for best memory hygiene) derives the KEK with Argon2id.  A
        master key file must hold exactly 32 bytes (see
        :func:`generate_master_key_file`); the KEK is HKDF-SHA256 of it.
      create: ``False`` (default): the keystore must exist, else ``UsageError``.
        ``True``: create an empty keystore if none exists, otherwise open the
        existing one (so it is safe to pass on every run).
      kdf_params: Argon2id costs, only when creating a passphrase keystore
        (``Argon2Params`` or a mapping with ``memory_kib``/``iterations``/``lanes``);
        default 64 MiB / 3 / 1.  Passing them otherwise is a ``UsageError``.

    Returns an open :class:`Keystore` (a :class:`KeyBackend`; use it as a context
    manager or call ``close()``).

    Raises (all :class:`takakrypt.errors.Error`): ``UsageError`` (bad arguments,
    missing keystore, unreadable/invalid master key file), ``KeystoreLocked`` (wrong
    passphrase or master key, or the other kind of credential),
    ``KeystoreCorrupt`` (malformed, unsupported format version, tampered),
    ``KeyError_`` (I/O errors such as permission denied or disk full).
    """
    if create:
        return Keystore(
            path,
            passphrase=passphrase,
            master_key_file=master_key_file,
            kdf_params=kdf_params,
            create=True,
        )
    if kdf_params is not None:
        raise UsageError("kdf_params only apply when creating a keystore")
    return Keystore(path, passphrase=passphrase, master_key_file=master_key_file)


def generate_master_key_file(path: str | os.PathLike[str]) -> None:
    """Write 32 random bytes to a new file ``path`` with mode 0600.

    Refuses to overwrite an existing file (``UsageError``); the file is created
    with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and fsynced, and so is its directory.
    """
    p = os.fspath(path)
    try:
        fd = os.open(
            p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise UsageError(f"master key file {p} already exists; refusing to overwrite") from None
    except OSError as e:
        raise UsageError(f"cannot create master key file {p}: {e.strerror}") from None
    buf = random_secret(MASTER_KEY_BYTES)
    ok = False
    try:
        os.fchmod(fd, 0o600)
        mv = memoryview(buf)
        while mv:
            mv = mv[os.write(fd, mv):]
        mv.release()
        os.fsync(fd)
        ok = True
    except OSError as e:
        raise UsageError(f"cannot write master key file {p}: {e.strerror}") from None
    finally:
        wipe(buf)
        os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(p)
    with contextlib.suppress(OSError):
        _fsync_dir(os.path.dirname(os.path.abspath(p)))
