# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython shim over aesgcm_impl.c; the contract is in src/takakrypt/_aesgcm.pyi."""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint32_t, uint64_t, UINT64_MAX

from operator import index as _index

from takakrypt.errors import BlockVersionMismatch, IntegrityError

cdef extern from "aesgcm_impl.h" nogil:
    ctypedef enum tk_engine:
        TK_ENGINE_IPSECMB
        TK_ENGINE_OPENSSL
    enum:
        TK_GCM_KEY_SIZE
        TK_GCM_NONCE_SIZE
        TK_GCM_TAG_SIZE
        TK_GCM_OVERHEAD
        TK_GCM_MAX_AAD_PREFIX
        TK_GCM_MIN_BLOCK
        TK_GCM_MAX_BLOCK
        TK_OK
        TK_ERR_NOMEM
        TK_ERR_ENGINE
        TK_ERR_RANDOM
        TK_ERR_AUTH
        TK_ERR_SHORT_BLOCK
        TK_ERR_CRYPTO
        TK_ERR_ARG
        TK_ERR_WIPED
        TK_ERR_VERSION
        TK_GCM_TAG_SIZE_V2
    ctypedef struct tk_gcm:
        pass
    const char *tk_gcm_strerror(int status)
    int tk_gcm_engine_available(tk_engine engine)
    int tk_gcm_block_size_ok(size_t block_size)
    tk_gcm *tk_gcm_new(const uint8_t *key, size_t block_size, tk_engine engine,
                       int *status)
    tk_gcm *tk_gcm_new_versioned(const uint8_t *key, size_t block_size, tk_engine engine,
                                 uint32_t block_version, int *status)
    void tk_gcm_free(tk_gcm *g)
    int tk_gcm_encrypt_size(size_t pt_len, size_t block_size, uint64_t *nblocks,
                            size_t *out_len)
    int tk_gcm_decrypt_size(size_t ct_len, size_t block_size, uint64_t *nblocks,
                            size_t *out_len, uint64_t *short_block)
    int tk_gcm_encrypt(tk_gcm *g, const uint8_t *pt, size_t pt_len, uint8_t *out,
                       const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                       const uint8_t *nonces)
    int tk_gcm_decrypt(tk_gcm *g, const uint8_t *ct, size_t ct_len, uint8_t *out,
                       const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                       int holes, size_t *written, uint64_t *bad_block)
    void tk_gcm_set_secure_memory(int on)
    const void *tk_gcm_key_area(const tk_gcm *g, size_t *len)

cdef extern from "secmem.h" nogil:
    ctypedef struct tk_secmem_stats:
        uint64_t chunks, bytes_mapped, bytes_locked, lock_failures, advise_failures, in_use
    void tk_secmem_get_stats(tk_secmem_stats *s)
    int tk_secmem_peek(const void *p, size_t n, void *out)
    void tk_secmem_scrub_stack()

NONCE_SIZE = TK_GCM_NONCE_SIZE
TAG_SIZE = TK_GCM_TAG_SIZE
TAG_SIZE_V2 = TK_GCM_TAG_SIZE_V2
OVERHEAD = TK_GCM_OVERHEAD
MAX_AAD_PREFIX = TK_GCM_MAX_AAD_PREFIX

# Batches with less input than this keep the GIL: the crypto takes ~1 us or less,
# and dropping the GIL could then cost a full switch interval when a CPU-bound
# Python thread grabs it.
cdef enum:
    _NOGIL_MIN = 16384

_ENGINE_IDS = {"ipsecmb": TK_ENGINE_IPSECMB, "openssl": TK_ENGINE_OPENSSL}


def secure_memory_stats():
    """Counters of the secure memory that holds key schedules (docs/keys.md)."""
    cdef tk_secmem_stats st
    tk_secmem_get_stats(&st)
    return {"chunks": st.chunks, "bytes_mapped": st.bytes_mapped,
            "bytes_locked": st.bytes_locked, "lock_failures": st.lock_failures,
            "advise_failures": st.advise_failures, "in_use": st.in_use}


def scrub_stack():
    """Zero the vector registers and 64 KiB of this thread's C stack below the
    caller's depth, where a key derivation or unwrap just called from Python left
    copies of keys (docs/keys.md)."""
    tk_secmem_scrub_stack()


def _set_secure_memory(on):
    """Benchmarks only: False puts the key schedules of later ciphers on the plain heap."""
    tk_gcm_set_secure_memory(1 if on else 0)


def _secure_peek(Py_ssize_t addr, Py_ssize_t n):
    """Test hook: the n bytes at addr if they lie in mapped secure memory, else None."""
    cdef bytes res
    if addr <= 0 or n < 0:
        return None
    res = PyBytes_FromStringAndSize(NULL, n)
    if not tk_secmem_peek(<const void *>addr, <size_t>n, PyBytes_AS_STRING(res)):
        return None
    return res


def engines():
    """Available engines, preferred first (e.g. ["ipsecmb", "openssl"])."""
    return [name for name, eid in _ENGINE_IDS.items() if tk_gcm_engine_available(eid)]


cdef int _acquire(object obj, Py_buffer *view, bint writable, str name) except -1:
    """PyObject_GetBuffer with contiguity required and readable error messages."""
    cdef int flags = PyBUF_WRITABLE if writable else PyBUF_SIMPLE
    try:
        PyObject_GetBuffer(obj, view, flags)
    except TypeError:
        raise TypeError(
            f"{name} must be a bytes-like object (buffer protocol), "
            f"not {type(obj).__name__}") from None
    except (BufferError, ValueError) as e:
        kind = "writable C-contiguous" if writable else "C-contiguous"
        raise ValueError(f"{name} must be a {kind} buffer ({e})") from None
    return 0


cdef inline bint _overlap(const void *a, Py_ssize_t la, const void *b, Py_ssize_t lb) noexcept:
    cdef const char *pa = <const char *>a
    cdef const char *pb = <const char *>b
    return la > 0 and lb > 0 and pa < pb + lb and pb < pa + la


cdef object _raise_status(int rc, uint64_t first_block, uint64_t rel):
    if rc == TK_ERR_AUTH:
        idx = first_block + rel
        raise IntegrityError(f"block {idx} failed authentication", block=idx)
    if rc == TK_ERR_NOMEM:
        raise MemoryError()
    if rc == TK_ERR_RANDOM:
        raise OSError("getrandom() failed")
    if rc == TK_ERR_ARG:
        raise ValueError(tk_gcm_strerror(rc).decode())
    if rc == TK_ERR_WIPED:
        raise RuntimeError("AES-GCM key schedule is not usable in a forked child "
                           "(secure memory is wiped on fork): create the cipher again")
    raise RuntimeError(f"AES-GCM engine error: {tk_gcm_strerror(rc).decode()}")


cdef uint64_t _first_block(object first_block, uint64_t nblocks) except? 0:
    cdef uint64_t f
    if type(first_block) is not int:
        first_block = _index(first_block)  # TypeError for floats, str, ...
    try:
        f = first_block
    except OverflowError:
        raise ValueError(f"first_block must be in [0, 2**64), got {first_block!r}") from None
    if nblocks > 0 and nblocks - 1 > UINT64_MAX - f:
        raise ValueError(
            f"first_block + number of blocks overflows 2**64 "
            f"(first_block={f}, blocks={nblocks})")
    return f


@cython.auto_pickle(False)
@cython.final
cdef class BlockCipher:
    """AES-256-GCM over fixed-size blocks; see takakrypt/_aesgcm.pyi."""

    cdef tk_gcm *_g
    # SAFETY: _inflight/_wiped are only read or written with the GIL held, which
    # serialises them; _g is freed only when no call is inside the nogil section.
    cdef Py_ssize_t _inflight
    cdef bint _wiped
    cdef size_t _bs
    cdef readonly str engine
    cdef readonly Py_ssize_t block_size
    cdef readonly object block_version

    def __cinit__(self):
        self._g = NULL
        self._inflight = 0
        self._wiped = False

    def __init__(self, key, *, block_size=4096, engine="auto", block_version=None):
        cdef Py_buffer kb
        cdef int status = 0
        cdef tk_engine eid
        cdef Py_ssize_t bs
        cdef uint32_t bv = 0
        if self._g != NULL or self._wiped:
            raise ValueError("BlockCipher is already initialised")
        if block_version is not None:
            if type(block_version) is not int:
                block_version = _index(block_version)
            if not 1 <= block_version <= 0xFFFFFFFF:
                raise ValueError(f"block_version must be in [1, 2**32), got {block_version!r}")
            bv = <uint32_t>block_version
        if type(block_size) is not int:
            block_size = _index(block_size)
        try:
            bs = block_size
        except OverflowError:
            raise ValueError(f"block_size out of range: {block_size!r}") from None
        if bs <= 0 or not tk_gcm_block_size_ok(<size_t>bs):
            raise ValueError(
                f"block_size must be a power of two in [{TK_GCM_MIN_BLOCK}, "
                f"{TK_GCM_MAX_BLOCK}], got {block_size!r}")
        if engine == "auto":
            avail = engines()
            if not avail:
                raise ValueError("no AES-GCM engine available")
            engine = avail[0]
        if not isinstance(engine, str) or engine not in _ENGINE_IDS:
            raise ValueError(
                f"unknown engine {engine!r}; expected 'auto', 'ipsecmb' or 'openssl'")
        eid = _ENGINE_IDS[engine]
        if not tk_gcm_engine_available(eid):
            raise ValueError(f"engine {engine!r} is not available on this machine")
        _acquire(key, &kb, False, "key")
        try:
            if kb.len != TK_GCM_KEY_SIZE:
                raise ValueError(f"key must be exactly {TK_GCM_KEY_SIZE} bytes, got {kb.len}")
            self._g = tk_gcm_new_versioned(<const uint8_t *>kb.buf, <size_t>bs, eid, bv,
                                           &status)
        finally:
            PyBuffer_Release(&kb)
        if self._g == NULL:
            _raise_status(status, 0, 0)
        self._bs = <size_t>bs
        self.block_size = bs
        self.engine = engine
        self.block_version = block_version

    def __dealloc__(self):
        # No call can be in flight: every method holds a reference to self.
        tk_gcm_free(self._g)
        self._g = NULL

    def __repr__(self):
        state = " wiped" if self._wiped else ""
        ver = "" if self.block_version is None else f" block_version={self.block_version}"
        return (f"<BlockCipher engine={self.engine!r} block_size={self.block_size}{ver}"
                f"{state}>")

    def _key_area(self):
        """Test hook: (address, size) of the key schedule, None if OpenSSL holds it."""
        cdef size_t n = 0
        cdef const void *p
        if self._g == NULL:
            return None
        p = tk_gcm_key_area(self._g, &n)
        return None if p == NULL else (<Py_ssize_t>p, <Py_ssize_t>n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wipe()
        return False

    def wipe(self):
        """Wipe and free the key schedule; later calls raise ValueError("cipher wiped").

        If other threads are inside a call right now, the free happens when the last
        of them returns (they finish with the old schedule)."""
        self._wiped = True
        if self._inflight == 0 and self._g != NULL:
            tk_gcm_free(self._g)
            self._g = NULL

    cdef inline int _enter(self) except -1:
        if self._wiped:
            raise ValueError("cipher wiped")
        if self._g == NULL:
            raise ValueError("cipher not initialised")
        self._inflight += 1
        return 0

    cdef inline void _leave(self) noexcept:
        self._inflight -= 1
        if self._inflight == 0 and self._wiped and self._g != NULL:
            tk_gcm_free(self._g)
            self._g = NULL

    # -- encryption ---------------------------------------------------------------

    cdef Py_ssize_t _encrypt(self, const uint8_t *pt, Py_ssize_t pt_len, object out_obj,
                             uint8_t *out, Py_ssize_t out_len, object aad_prefix,
                             object first_block, object nonces) except -1:
        cdef Py_buffer ab, nb
        cdef bint have_a = False, have_n = False
        cdef uint64_t nblocks = 0, fb
        cdef size_t need = 0
        cdef const uint8_t *np = NULL
        cdef int rc
        cdef tk_gcm *g = self._g
        if tk_gcm_encrypt_size(<size_t>pt_len, self._bs, &nblocks, &need) != TK_OK:
            raise ValueError("plaintext too large")
        try:
            _acquire(aad_prefix, &ab, False, "aad_prefix")
            have_a = True
            if ab.len > TK_GCM_MAX_AAD_PREFIX:
                raise ValueError(
                    f"aad_prefix is {ab.len} bytes, at most {TK_GCM_MAX_AAD_PREFIX} allowed")
            fb = _first_block(first_block, nblocks)
            if out_obj is not None and <size_t>out_len < need:
                raise ValueError(f"out is too small: need {need} bytes, got {out_len}")
            if nonces is not None:
                _acquire(nonces, &nb, False, "nonces")
                have_n = True
                if <uint64_t>nb.len != nblocks * TK_GCM_NONCE_SIZE:
                    raise ValueError(
                        f"nonces must be exactly {nblocks} * {TK_GCM_NONCE_SIZE} = "
                        f"{nblocks * TK_GCM_NONCE_SIZE} bytes, got {nb.len}")
                np = <const uint8_t *>nb.buf
                if _overlap(out, <Py_ssize_t>need, np, nb.len):
                    raise ValueError("out overlaps nonces")
            if _overlap(out, <Py_ssize_t>need, pt, pt_len):
                raise ValueError("out overlaps plaintext")
            if _overlap(out, <Py_ssize_t>need, ab.buf, ab.len):
                raise ValueError("out overlaps aad_prefix")
            # SAFETY: the Py_buffer exports pin every buffer (no resize / free) until
            # the releases in `finally`, after the nogil section has ended.
            if pt_len >= _NOGIL_MIN:
                with nogil:
                    rc = tk_gcm_encrypt(g, pt, <size_t>pt_len, out,
                                        <const uint8_t *>ab.buf, <size_t>ab.len, fb, np)
            else:
                rc = tk_gcm_encrypt(g, pt, <size_t>pt_len, out,
                                    <const uint8_t *>ab.buf, <size_t>ab.len, fb, np)
            if rc != TK_OK:
                _raise_status(rc, fb, 0)
            return <Py_ssize_t>need
        finally:
            if have_n:
                PyBuffer_Release(&nb)
            if have_a:
                PyBuffer_Release(&ab)

    def encrypt_into(self, plaintext, out, aad_prefix, first_block, nonces=None):
        """Encrypt into the writable buffer `out`; returns bytes written."""
        cdef Py_buffer pb, ob
        cdef bint have_p = False, have_o = False
        self._enter()
        try:
            _acquire(plaintext, &pb, False, "plaintext")
            have_p = True
            _acquire(out, &ob, True, "out")
            have_o = True
            return self._encrypt(<const uint8_t *>pb.buf, pb.len, out,
                                 <uint8_t *>ob.buf, ob.len, aad_prefix, first_block, nonces)
        finally:
            if have_o:
                PyBuffer_Release(&ob)
            if have_p:
                PyBuffer_Release(&pb)
            self._leave()

    def encrypt(self, plaintext, aad_prefix, first_block, nonces=None):
        """Encrypt into a new exact-size bytes object."""
        cdef Py_buffer pb
        cdef bint have_p = False
        cdef uint64_t nblocks = 0
        cdef size_t need = 0
        cdef bytes res
        self._enter()
        try:
            _acquire(plaintext, &pb, False, "plaintext")
            have_p = True
            if tk_gcm_encrypt_size(<size_t>pb.len, self._bs, &nblocks, &need) != TK_OK:
                raise ValueError("plaintext too large")
            # A fresh, unshared bytes object may be filled in place before it escapes.
            res = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>need)
            self._encrypt(<const uint8_t *>pb.buf, pb.len, None,
                          <uint8_t *>PyBytes_AS_STRING(res), <Py_ssize_t>need,
                          aad_prefix, first_block, nonces)
            return res
        finally:
            if have_p:
                PyBuffer_Release(&pb)
            self._leave()

    # -- decryption ---------------------------------------------------------------

    cdef Py_ssize_t _decrypt(self, const uint8_t *ct, Py_ssize_t ct_len, object out_obj,
                             uint8_t *out, Py_ssize_t out_len, object aad_prefix,
                             object first_block, bint holes) except -1:
        cdef Py_buffer ab
        cdef bint have_a = False
        cdef uint64_t nblocks = 0, fb, bad = 0, short_block = 0
        cdef size_t need = 0, written = 0, so, sl
        cdef const uint8_t *p
        cdef uint32_t ver
        cdef int rc
        cdef tk_gcm *g = self._g
        rc = tk_gcm_decrypt_size(<size_t>ct_len, self._bs, &nblocks, &need, &short_block)
        try:
            _acquire(aad_prefix, &ab, False, "aad_prefix")
            have_a = True
            if ab.len > TK_GCM_MAX_AAD_PREFIX:
                raise ValueError(
                    f"aad_prefix is {ab.len} bytes, at most {TK_GCM_MAX_AAD_PREFIX} allowed")
            fb = _first_block(first_block, nblocks if rc == TK_OK else short_block + 1)
            if rc == TK_ERR_SHORT_BLOCK:
                slen = ct_len - short_block * (self._bs + TK_GCM_OVERHEAD)
                raise ValueError(
                    f"stored block {fb + short_block} is too short: {slen} bytes, "
                    f"a stored block has at least {TK_GCM_OVERHEAD + 1}")
            if rc != TK_OK:
                _raise_status(rc, fb, 0)
            if out_obj is not None and <size_t>out_len < need:
                raise ValueError(f"out is too small: need {need} bytes, got {out_len}")
            if _overlap(out, <Py_ssize_t>need, ct, ct_len):
                raise ValueError("out overlaps ciphertext")
            if _overlap(out, <Py_ssize_t>need, ab.buf, ab.len):
                raise ValueError("out overlaps aad_prefix")
            # SAFETY: buffers stay exported (pinned) until `finally`, see _encrypt.
            if ct_len >= _NOGIL_MIN:
                with nogil:
                    rc = tk_gcm_decrypt(g, ct, <size_t>ct_len, out, <const uint8_t *>ab.buf,
                                        <size_t>ab.len, fb, holes, &written, &bad)
            else:
                rc = tk_gcm_decrypt(g, ct, <size_t>ct_len, out, <const uint8_t *>ab.buf,
                                    <size_t>ab.len, fb, holes, &written, &bad)
            if rc == TK_ERR_VERSION:
                # the stored version of block `bad`: its last 4 bytes
                so = <size_t>bad * (self._bs + TK_GCM_OVERHEAD)
                sl = min(<size_t>ct_len - so, self._bs + TK_GCM_OVERHEAD)
                p = ct + so + sl - 4
                ver = p[0] | p[1] << 8 | p[2] << 16 | <uint32_t>p[3] << 24
                raise BlockVersionMismatch(
                    f"block {fb + bad} is sealed under key version {ver}, not "
                    f"{self.block_version}", block=fb + bad, version=ver)
            if rc != TK_OK:
                _raise_status(rc, fb, bad)
            return <Py_ssize_t>written
        finally:
            if have_a:
                PyBuffer_Release(&ab)

    def decrypt_into(self, ciphertext, out, aad_prefix, first_block, *, holes=False):
        """Decrypt into the writable buffer `out`; returns plaintext bytes written."""
        cdef Py_buffer cb, ob
        cdef bint have_c = False, have_o = False
        self._enter()
        try:
            _acquire(ciphertext, &cb, False, "ciphertext")
            have_c = True
            _acquire(out, &ob, True, "out")
            have_o = True
            return self._decrypt(<const uint8_t *>cb.buf, cb.len, out, <uint8_t *>ob.buf,
                                 ob.len, aad_prefix, first_block, bool(holes))
        finally:
            if have_o:
                PyBuffer_Release(&ob)
            if have_c:
                PyBuffer_Release(&cb)
            self._leave()

    def decrypt(self, ciphertext, aad_prefix, first_block, *, holes=False):
        """Decrypt into a new exact-size bytes object."""
        cdef Py_buffer cb
        cdef bint have_c = False
        cdef uint64_t nblocks = 0, short_block = 0
        cdef size_t need = 0
        cdef bytes res
        self._enter()
        try:
            _acquire(ciphertext, &cb, False, "ciphertext")
            have_c = True
            # On a short block `need` stays 0 and _decrypt raises the ValueError.
            tk_gcm_decrypt_size(<size_t>cb.len, self._bs, &nblocks, &need, &short_block)
            res = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>need)
            self._decrypt(<const uint8_t *>cb.buf, cb.len, None,
                          <uint8_t *>PyBytes_AS_STRING(res), <Py_ssize_t>need,
                          aad_prefix, first_block, bool(holes))
            return res
        finally:
            if have_c:
                PyBuffer_Release(&cb)
            self._leave()
