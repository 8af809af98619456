"""The agent's offline key cache: sealed copies of the data keys takakryptd used, so a
host that restarts while the key backend (a KMS) is unreachable can still open its
guard points.  Off unless configured (``keys.offline_cache``); the trade-off is in
docs/keys.md, "Key cache and offline operation": whoever holds the disk *and* the
local secret (passphrase file or key file) holds the keys, as with Thales CTE's
offline-access password.

One JSON file, written atomically (temp file, fsync, rename, directory fsync; mode
0600) under an ``flock`` on ``PATH.lock``, authenticated as a whole with HMAC-SHA256::

    {
      "format": "takakrypt-offline-cache",
      "version": 1,
      "cache_id": "…32 lowercase hex…",
      "created": "2026-01-31T12:00:00Z",
      "generation": 3,
      "kdf": {"alg": "argon2id", "salt": …, "memory_kib": …, "iterations": …,
              "lanes": …}   |   {"alg": "hkdf-sha256", "salt": …},
      "check": "…base64 of 32 bytes…",
      "keys": [
        {"name": "payroll", "current_version": 2,
         "versions": [{"version": 2, "stored": "2026-01-31T12:00:00Z",
                       "nonce": "…12 bytes…", "sealed": "…48 bytes…"}]}
      ],
      "mac": "…base64 of 32 bytes…"
    }

Cryptography (labels ``L = "takakrypt-offline-cache/v1/"``)::

    passphrase:  KEK = Argon2id(passphrase, kdf.salt, t, m, p, 32)
    key file:    KEK = HKDF-SHA256(IKM = the 32 bytes, salt = kdf.salt, info = L‖"key-file")
    K_seal, K_mac, K_check = HKDF-SHA256(KEK, info = L‖"kek/seal" | "kek/mac" | "kek/check")
    check  = HMAC-SHA256(K_check, L‖"check")
    sealed = AES-256-GCM(K_seal, nonce, key, AAD = L‖"seal"‖0x00‖u16be(len id)‖cache_id
                                                  ‖u16be(len name)‖name‖u64be(version))
    mac    = HMAC-SHA256(K_mac, L‖"mac"‖0x00‖ canonical JSON without "mac", keys sorted)

Errors: a wrong credential is ``KeystoreLocked``; a malformed, tampered or foreign
file ``KeystoreCorrupt`` (never used); a key not held ``KeyNotFound``; I/O errors
``KeyError_``.  Material never appears in ``repr()``, errors or logs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KeyError_, KeyNotFound, KeystoreCorrupt, KeystoreLocked, UsageError
from .backend import KEY_BYTES, now_rfc3339, validate_key_name
from .local import (
    CHECK_BYTES,
    MAC_BYTES,
    MIN_PASSPHRASE,
    NONCE_BYTES,
    SALT_BYTES,
    TAG_BYTES,
    Argon2Params,
    _Argon2idKdf,
    _b64,
    _coerce_params,
    _Credential,
    _hkdf_into,
    _is_int,
    _MasterKeyKdf,
    _remove_stale_temps,
    _unb64,
    _valid_time,
    _write_atomic,
)
from .secret import Secret, lock, scrub_stack, wipe

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "OfflineCache", "secret_file_problem"]

log = logging.getLogger("takakrypt.keys")

FORMAT_NAME = "takakrypt-offline-cache"
FORMAT_VERSION = 1
CACHE_ID_BYTES = 16
#: a cache of 1,000 keys of a few versions is about 200 KiB
MAX_FILE_BYTES = 16 * 1024 * 1024
_L = b"takakrypt-offline-cache/v1/"


class _VersionRec(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    stored: str
    nonce: str
    sealed: str


class _KeyRec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    current_version: int  # 0: not known
    versions: list[_VersionRec]


class _Doc(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    cache_id: str
    created: str
    generation: int
    kdf: _Argon2idKdf | _MasterKeyKdf
    check: str
    keys: list[_KeyRec]
    mac: str


def secret_file_problem(path: str, *, size: int | None = None) -> str | None:
    """Why ``path`` cannot hold the offline cache's local secret (None if it can): it
    must be a regular file owned by root (or by this process's user) and readable by
    its owner only (0600 or 0400); ``size``: its exact length in bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}: it must be owned by root"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return (f"{path} is readable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): it must be root-only (chmod 600 {path})")
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    if size is not None and st.st_size != size:
        return f"{path} must hold exactly {size} bytes (it has {st.st_size})"
    return None


def _structure_problem(doc: _Doc) -> str | None:
    if len(doc.cache_id) != 2 * CACHE_ID_BYTES or doc.cache_id.strip("0123456789abcdef"):
        return "cache_id is not 32 lowercase hex digits"
    if not _valid_time(doc.created):
        return "created is not an RFC 3339 UTC timestamp"
    if not _is_int(doc.generation) or doc.generation < 0:
        return "generation is negative"
    if _unb64(doc.kdf.salt, SALT_BYTES) is None:
        return f"kdf.salt is not {SALT_BYTES} bytes of base64"
    if isinstance(doc.kdf, _Argon2idKdf):
        why = Argon2Params(doc.kdf.memory_kib, doc.kdf.iterations, doc.kdf.lanes).problem()
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
        if k.current_version < 0:
            return f"{where}.current_version is negative"
        last = 0
        for j, v in enumerate(k.versions):
            vw = f"{where}.versions[{j}]"
            if not v.version > last:
                return f"{vw}.version is not ascending from 1"
            last = v.version
            if not _valid_time(v.stored):
                return f"{vw}.stored is not an RFC 3339 UTC timestamp"
            if _unb64(v.nonce, NONCE_BYTES) is None:
                return f"{vw}.nonce is not {NONCE_BYTES} bytes of base64"
            if _unb64(v.sealed, KEY_BYTES + TAG_BYTES) is None:
                return f"{vw}.sealed is not {KEY_BYTES + TAG_BYTES} bytes of base64"
    return None


def _parse(raw: bytes, shown: str) -> _Doc:
    """Decode and check a file's structure; KeystoreCorrupt on any problem."""
    if len(raw) > MAX_FILE_BYTES:
        raise KeystoreCorrupt(f"offline key cache {shown} is too large ({len(raw)} bytes)")
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise KeystoreCorrupt(f"offline key cache {shown} is not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise KeystoreCorrupt(f"{shown} is not a takakrypt offline key cache")
    ver = obj.get("version")
    if not _is_int(ver) or ver != FORMAT_VERSION:
        raise KeystoreCorrupt(f"offline key cache {shown} has unsupported format version "
                              f"{ver!r} (this takakrypt reads version {FORMAT_VERSION})")
    try:
        doc = msgspec.convert(obj, _Doc)
    except msgspec.ValidationError as e:
        raise KeystoreCorrupt(f"offline key cache {shown} is malformed: {e}") from None
    why = _structure_problem(doc)
    if why:
        raise KeystoreCorrupt(f"offline key cache {shown} is malformed: {why}")
    return doc


def _mac_input(doc: _Doc) -> bytes:
    d = msgspec.to_builtins(doc)
    del d["mac"]
    return _L + b"mac\x00" + msgspec.json.encode(d, order="sorted")


def _aad(cache_id: str, name: str, version: int) -> bytes:
    cid, nm = cache_id.encode("ascii"), name.encode("utf-8")
    return (_L + b"seal\x00" + len(cid).to_bytes(2, "big") + cid + len(nm).to_bytes(2, "big")
            + nm + version.to_bytes(8, "big"))


class _Keys:
    def __init__(self, seal: Secret, mac: Secret, check: bytes) -> None:
        self.seal, self.mac, self.check = seal, mac, check

    def wipe(self) -> None:
        self.seal.wipe()
        self.mac.wipe()


def _derive(kdf: _Argon2idKdf | _MasterKeyKdf, cred: _Credential) -> _Keys:
    if isinstance(kdf, _Argon2idKdf) != (cred.kind == "passphrase"):
        raise KeystoreLocked("sealed under a " + ("passphrase" if isinstance(kdf, _Argon2idKdf)
                                                  else "key file") + ", not a "
                             + ("key file" if cred.kind != "passphrase" else "passphrase"))
    salt = base64.b64decode(kdf.salt)
    kek = bytearray(32)
    lock(kek)
    try:
        if isinstance(kdf, _Argon2idKdf):
            Argon2id(salt=salt, length=32, iterations=kdf.iterations, lanes=kdf.lanes,
                     memory_cost=kdf.memory_kib).derive_into(cred.secret.value, kek)
        else:
            HKDF(hashes.SHA256(), 32, salt, _L + b"key-file").derive_into(
                cred.secret.value, kek)
        seal = Secret.take(_hkdf_into(kek, _L + b"kek/seal"))
        mac = Secret.take(_hkdf_into(kek, _L + b"kek/mac"))
        ck = _hkdf_into(kek, _L + b"kek/check")
        try:
            check = hmac.new(ck, _L + b"check", "sha256").digest()
        finally:
            wipe(ck)
    finally:
        wipe(kek)
        scrub_stack()
    return _Keys(seal, mac, check)


class OfflineCache:
    """Sealed copies of used data keys in one file (module docstring).

    ``passphrase`` (bytes; pass a bytearray, it is copied) or ``key_file`` (a path of
    exactly 32 bytes): exactly one.  An existing file is read and verified now
    (``KeystoreLocked`` for a wrong credential, ``KeystoreCorrupt`` for a damaged one);
    a missing one is created by the first :meth:`store`.  ``kdf_params``: Argon2id costs
    of a new passphrase-sealed file (tests lower them).  Thread-safe."""

    def __init__(self, path: str, *, passphrase: bytes | bytearray | None = None,
                 key_file: str | None = None,
                 kdf_params: Argon2Params | Mapping[str, int] | None = None) -> None:
        self.path = os.path.abspath(path)
        self._mu = threading.Lock()
        self._keys: _Keys | None = None
        self._doc: _Doc | None = None
        cred = _Credential(passphrase, key_file)
        self.protection = "passphrase" if cred.kind == "passphrase" else "key-file"
        try:
            raw = self._read()
            if raw is None:
                if cred.kind == "passphrase":
                    n = sum(1 for b in cred.secret.value if b & 0xC0 != 0x80)
                    if n < MIN_PASSPHRASE:
                        raise UsageError(f"the passphrase of a new offline key cache must be "
                                         f"at least {MIN_PASSPHRASE} characters (got {n})")
                    p = _coerce_params(kdf_params)
                    kdf: _Argon2idKdf | _MasterKeyKdf = _Argon2idKdf(
                        _b64(os.urandom(SALT_BYTES)), p.memory_kib, p.iterations, p.lanes)
                else:
                    kdf = _MasterKeyKdf(_b64(os.urandom(SALT_BYTES)))
                keys = _derive(kdf, cred)
                self._keys = keys
                self._doc = _Doc(FORMAT_NAME, FORMAT_VERSION, secrets.token_hex(CACHE_ID_BYTES),
                                 now_rfc3339(), 0, kdf, _b64(keys.check), [], "")
                return
            doc = _parse(raw, self.path)
            try:
                keys = _derive(doc.kdf, cred)
            except KeystoreLocked as e:
                raise KeystoreLocked(f"offline key cache {self.path} is {e}") from None
            if not hmac.compare_digest(keys.check, base64.b64decode(doc.check)):
                keys.wipe()
                raise KeystoreLocked(f"wrong {'passphrase' if cred.kind == 'passphrase' else 'key file'}"
                                     f" for offline key cache {self.path}")
            self._verify(doc, keys)
            self._keys, self._doc = keys, doc
        finally:
            cred.wipe()

    # file ----------------------------------------------------------------------------
    def _read(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KeyError_(f"cannot open offline key cache {self.path}: {e.strerror}") \
                from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeystoreCorrupt(f"offline key cache {self.path} is not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise KeystoreCorrupt(f"offline key cache {self.path} is too large")
            chunks, total = [], 0
            while b := os.read(fd, 1 << 20):
                chunks.append(b)
                total += len(b)
                if total > MAX_FILE_BYTES:
                    raise KeystoreCorrupt(f"offline key cache {self.path} is too large")
            return b"".join(chunks)
        except OSError as e:
            raise KeyError_(f"cannot read offline key cache {self.path}: {e.strerror}") \
                from None
        finally:
            os.close(fd)

    def _mac(self, doc: _Doc, keys: _Keys) -> bytes:
        try:
            return hmac.new(keys.mac.value, _mac_input(doc), "sha256").digest()
        finally:
            scrub_stack()

    def _verify(self, doc: _Doc, keys: _Keys) -> None:
        if not hmac.compare_digest(self._mac(doc, keys), base64.b64decode(doc.mac)):
            keys.wipe()
            raise KeystoreCorrupt(f"offline key cache {self.path} failed its integrity check "
                                  "(modified or damaged): refused")

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        d = os.path.dirname(self.path)
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            fd = os.open(self.path + ".lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise KeyError_(f"cannot lock offline key cache {self.path}: {e.strerror}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _update(self, fn: Any) -> bool:
        """Apply ``fn(keys_list) -> new list or None`` (None: nothing to write) and
        write the file atomically, under the lock."""
        with self._mu:
            keys, doc = self._live()
            new_keys = fn(list(doc.keys), keys, doc.cache_id)
            if new_keys is None:
                return False
            new = msgspec.structs.replace(doc, keys=new_keys, generation=doc.generation + 1,
                                          mac="")
            new.mac = _b64(self._mac(new, keys))
            data = msgspec.json.format(msgspec.json.encode(new), indent=2) + b"\n"
            with self._file_lock():
                try:
                    _remove_stale_temps(self.path)
                    _write_atomic(self.path, data)
                except OSError as e:
                    raise KeyError_(f"cannot write offline key cache {self.path}: "
                                    f"{e.strerror}") from None
            self._doc = new
            return True

    def _live(self) -> tuple[_Keys, _Doc]:
        if self._keys is None or self._doc is None:
            raise UsageError(f"offline key cache {self.path} is closed")
        return self._keys, self._doc

    @staticmethod
    def _find(recs: list[_KeyRec], name: str) -> tuple[int, _KeyRec | None]:
        for i, r in enumerate(recs):
            if r.name >= name:
                return i, (r if r.name == name else None)
        return len(recs), None

    # API -----------------------------------------------------------------------------
    def get(self, name: str, version: int) -> bytearray:
        """The sealed key, unsealed into a new locked bytearray the caller wipes;
        ``KeyNotFound`` if this cache does not hold it."""
        with self._mu:
            keys, doc = self._live()
            _i, rec = self._find(doc.keys, name)
            vr = next((v for v in rec.versions if v.version == version), None) \
                if rec is not None else None
            if vr is None:
                raise KeyNotFound(f"key {name!r} version {version} is not in the offline "
                                  f"key cache {self.path}")
            out = bytearray(KEY_BYTES)
            lock(out)
            try:
                AESGCM(keys.seal.value).decrypt_into(
                    base64.b64decode(vr.nonce), base64.b64decode(vr.sealed),
                    _aad(doc.cache_id, name, version), out)
            except InvalidTag:
                wipe(out)
                raise KeystoreCorrupt(f"key {name!r} version {version} in offline key cache "
                                      f"{self.path} cannot be unsealed") from None
            finally:
                scrub_stack()
            return out

    def current_version(self, name: str) -> int:
        """The current version last seen from the backend; ``KeyNotFound`` if none."""
        with self._mu:
            _k, doc = self._live()
            _i, rec = self._find(doc.keys, name)
            if rec is None or not rec.current_version:
                raise KeyNotFound(f"key {name!r} is not in the offline key cache {self.path}")
            return rec.current_version

    def holds(self, name: str, version: int) -> bool:
        with self._mu:
            _k, doc = self._live()
            _i, rec = self._find(doc.keys, name)
            return rec is not None and any(v.version == version for v in rec.versions)

    def store(self, name: str, version: int, key: bytearray | bytes, current: int = 0) -> bool:
        """Keep a sealed copy of ``key`` (and ``current``, the key's current version, if
        known and not recorded yet); True if the file was written (False: held)."""
        validate_key_name(name)
        if len(key) != KEY_BYTES:
            raise UsageError(f"a key is {KEY_BYTES} bytes")

        def fn(recs: list[_KeyRec], keys: _Keys, cache_id: str) -> list[_KeyRec] | None:
            i, rec = self._find(recs, name)
            if rec is not None and any(v.version == version for v in rec.versions):
                if not current or rec.current_version == current:
                    return None
                recs[i] = _KeyRec(name, current, rec.versions)
                return recs
            nonce = os.urandom(NONCE_BYTES)
            try:
                ct = AESGCM(keys.seal.value).encrypt(nonce, key, _aad(cache_id, name, version))
            finally:
                scrub_stack()
            vr = _VersionRec(version, now_rfc3339(), _b64(nonce), _b64(ct))
            if rec is None:
                recs.insert(i, _KeyRec(name, current, [vr]))
            else:
                recs[i] = _KeyRec(name, current or rec.current_version,
                                  sorted([*rec.versions, vr], key=lambda v: v.version))
            return recs

        return self._update(fn)

    def set_current(self, name: str, version: int) -> bool:
        """Record the backend's current version of a key this cache holds; True if the
        file was written."""
        def fn(recs: list[_KeyRec], _keys: _Keys, _cid: str) -> list[_KeyRec] | None:
            i, rec = self._find(recs, name)
            if rec is None or rec.current_version == version:
                return None
            recs[i] = _KeyRec(name, version, rec.versions)
            return recs

        return self._update(fn)

    def remove(self, name: str, version: int | None = None) -> bool:
        """Forget one version, or the whole key (the backend says it is gone or
        retired: its copy must not outlive it here); True if the file was written."""
        def fn(recs: list[_KeyRec], _keys: _Keys, _cid: str) -> list[_KeyRec] | None:
            i, rec = self._find(recs, name)
            if rec is None:
                return None
            if version is None:
                del recs[i]
                return recs
            left = [v for v in rec.versions if v.version != version]
            if len(left) == len(rec.versions):
                return None
            recs[i] = _KeyRec(name, rec.current_version, left)
            return recs

        return self._update(fn)

    def stats(self) -> dict[str, object]:
        with self._mu:
            doc = self._doc
            return {"path": self.path, "protection": self.protection,
                    "keys": sum(len(r.versions) for r in doc.keys) if doc else 0,
                    "names": len(doc.keys) if doc else 0,
                    "exists": os.path.exists(self.path)}

    def close(self) -> None:
        with self._mu:
            if self._keys is not None:
                self._keys.wipe()
            self._keys = None

    def __repr__(self) -> str:
        return f"<OfflineCache path={self.path!r} protection={self.protection}>"

    def __reduce__(self) -> Any:
        raise TypeError("OfflineCache objects cannot be pickled")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._keys is not None:
                self._keys.wipe()
