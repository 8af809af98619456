# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin Cython shim over fuse_impl.c; the contract is in src/takakrypt/_fuse.pyi."""

cimport cython
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.pycapsule cimport PyCapsule_GetPointer

import atexit
import os
import weakref

cdef extern from "<errno.h>":
    enum:
        EIO
        EACCES
        ENOKEY
        EINVAL

cdef extern from "fuse_impl.h" nogil:
    enum:
        TK_ACT_COUNT
    ctypedef struct tk_decision:
        uint32_t effects
        int32_t rule
        uint32_t key_version
        double ttl_seconds
    ctypedef struct tk_callbacks:
        void *ctx
        int (*decide)(void *ctx, uint32_t uid, uint32_t gid, uint32_t pid, const char *path,
                      const char *action, tk_decision *out) noexcept nogil
        int (*get_key)(void *ctx, const char *name, uint32_t version, uint32_t *version_out,
                       uint8_t *key) noexcept nogil
        void (*audit)(void *ctx, const char *kind, uint32_t uid, uint32_t gid, uint32_t pid,
                      const char *path, const char *action, uint32_t effects,
                      const char *detail, int32_t rule, uint32_t key_version,
                      uint64_t latency_ns) noexcept nogil
    ctypedef struct tk_fs_config:
        const char *mountpoint
        const char *backing
        const char *key_name
        int threads
        size_t cache_entries
        int debug
        void *ring
        int ring_timeout_ms
        double meta_timeout
        int io_uring
        int io_uring_per_queue
        int read_helpers
        int format_version
    ctypedef struct tk_fs_stats:
        uint64_t ops[15]
        uint64_t denied
        uint64_t cache_hits
        uint64_t cache_misses
        uint64_t decide_errors
        uint64_t bytes_encrypted
        uint64_t bytes_decrypted
        uint64_t integrity_failures
        uint64_t key_fetches
        uint64_t ring_requests
        uint64_t ring_timeouts
        uint64_t ring_errors
        uint64_t ring_error_status
        uint64_t ring_malformed
        uint64_t generation
        uint64_t inodes
        uint64_t fds_cached
        uint64_t fds_pinned
        uint64_t fd_reopens
        uint64_t fd_evictions
        uint64_t stale_handles
        uint64_t ident_hits
        uint64_t ident_reads
        uint64_t uring_threads
        uint64_t uring_requests
        uint64_t nonce_lease_warnings
        uint64_t nonce_limit_refusals
        uint64_t uring_bad_requests
        uint64_t uring_lost
        uint64_t handover_lost_handles
        uint64_t handover_replayed
        uint64_t handover_resent
        uint64_t handover_swaps_finished
        uint64_t header_loads
        uint64_t header_renewals
        uint64_t version_moves
        uint64_t size_cache_hits
        uint64_t killpriv_v2
        uint64_t suid_kills
        uint64_t inval_data
        uint64_t inval_dropped
        uint64_t read_prefetches
        uint64_t read_splits
        uint64_t getxattr_requests
        uint64_t policy_hints
        uint64_t forgets
        uint64_t forget_messages
        uint64_t wronly_direct
        uint64_t direct_opens
        uint64_t ident_skips
        uint64_t rekey_files
        uint64_t rekey_bytes
    ctypedef struct tk_fs:
        pass
    const char *tk_action_name(int action)
    uint32_t tk_action_protocol_code(int action)
    tk_fs *tk_fs_new(const tk_fs_config *cfg, const tk_callbacks *cb, char *err, size_t errlen)
    int tk_fs_mount(tk_fs *fs, char *err, size_t errlen)
    int tk_fs_unmount(tk_fs *fs)
    int tk_fs_is_mounted(const tk_fs *fs)
    uint64_t tk_fs_bump_generation(tk_fs *fs)
    void tk_fs_invalidate(tk_fs *fs)
    void tk_fs_drop_keys(tk_fs *fs)
    void tk_fs_set_hints(tk_fs *fs, unsigned hints)
    void tk_fs_stats_get(const tk_fs *fs, tk_fs_stats *out)
    void tk_fs_free(tk_fs *fs)
    int tk_fs_handover_begin(tk_fs *fs, int **fds_out, size_t *nfds_out, uint8_t **state_out,
                             size_t *len_out, char *err, size_t errlen)
    void tk_fs_handover_abort(tk_fs *fs)
    void tk_fs_handover_done(tk_fs *fs)
    int tk_fs_persist_fds(tk_fs *fs, int out[4])
    int tk_fs_resume(tk_fs *fs, const int *fds, size_t nfds, const uint8_t *state,
                     size_t len, char *err, size_t errlen)
    int tk_fs_rekey_file(tk_fs *fs, const char *relpath, uint32_t version, uint64_t rate,
                         uint32_t chunk_blocks, int *outcome, uint64_t *nbytes, char *err,
                         size_t errlen)
    void tk_fs_rekey_cancel(tk_fs *fs, int on)
    int tk_fs_backing_fd(tk_fs *fs)

PERMIT = 1
DENY = 2
APPLY_KEY = 4
AUDIT = 8
WOULD_DENY = 16
ANY_PATH = 32  # caching hint (not an effect): the answer holds for every path

ACTIONS = tuple(tk_action_name(i).decode() for i in range(TK_ACT_COUNT))
# action name -> the TAKA protocol's action code the ring requests carry (uapi enum)
PROTOCOL_ACTIONS = {tk_action_name(i).decode(): tk_action_protocol_code(i)
                    for i in range(TK_ACT_COUNT)}
HINT_PLAIN_ONLY = 1   # tk_fs_set_hints: no rule grants the raw view
HINT_GETATTR_ALL = 2  # ... and getattr is permitted, unaudited, to everyone
HINT_NO_PROCESS = 4   # no rule looks at the process or groups: decide by uid/gid
RING_TIMEOUT_MS = 5000  # TAKAKRYPT_TIMEOUT_MS
# Mount.rekey_file outcomes, by tk_fs_rekey_file's TK_REKEY_* (fuse_impl.h)
REKEY_OUTCOMES = ("done", "current", "skipped-hardlink", "skipped-not-regular", "busy",
                  "cancelled")

# SAFETY: _alive is written only with the GIL held (at exit) and read by FUSE threads
# before they ask for the GIL; once the interpreter starts finalising, callbacks deny
# without touching Python (a stale read merely lets one more callback run while the
# interpreter is still fully alive: atexit handlers run before finalisation).
cdef int _alive = 1
_mounts = weakref.WeakSet()


def _at_exit():
    global _alive
    for m in list(_mounts):
        try:
            m.unmount()
        except Exception:
            pass
    _alive = 0


atexit.register(_at_exit)


cdef int _decide_py(void *ctx, uint32_t uid, uint32_t gid, uint32_t pid, const char *path,
                    const char *action, tk_decision *out) noexcept with gil:
    cdef Mount m = <Mount>ctx
    try:
        effects, rule, key_version, ttl = m._decide(uid, gid, pid, os.fsdecode(path),
                                                     action.decode())
        out.effects = <uint32_t>effects
        out.rule = <int32_t>rule
        out.key_version = <uint32_t>key_version
        out.ttl_seconds = <double>ttl
        return 0
    except BaseException as e:  # a failing policy callback denies, never crashes
        m.last_callback_error = f"decide: {type(e).__name__}: {e}"
        return -EACCES


cdef int _decide_cb(void *ctx, uint32_t uid, uint32_t gid, uint32_t pid, const char *path,
                    const char *action, tk_decision *out) noexcept nogil:
    if not _alive:
        return -EACCES
    return _decide_py(ctx, uid, gid, pid, path, action, out)


cdef int _get_key_py(void *ctx, const char *name, uint32_t version, uint32_t *vout,
                     uint8_t *key) noexcept with gil:
    cdef Mount m = <Mount>ctx
    cdef Py_buffer view
    try:
        got, data = m._get_key(name.decode(), version if version else None)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len != 32:
                raise ValueError(f"key must be 32 bytes, got {view.len}")
            memcpy(key, view.buf, 32)
        finally:
            PyBuffer_Release(&view)
        if isinstance(data, bytearray):  # the glue hands out a copy: wipe it (and
            from takakrypt.keys.secret import wipe  # release a keystore's page lock)
            wipe(data)
        vout[0] = <uint32_t>got
        return 0
    except BaseException as e:
        m.last_callback_error = f"get_key: {type(e).__name__}: {e}"
        return -ENOKEY


cdef int _get_key_cb(void *ctx, const char *name, uint32_t version, uint32_t *vout,
                     uint8_t *key) noexcept nogil:
    if not _alive:
        return -ENOKEY
    return _get_key_py(ctx, name, version, vout, key)


cdef void _audit_py(void *ctx, const char *kind, uint32_t uid, uint32_t gid, uint32_t pid,
                    const char *path, const char *action, uint32_t effects,
                    const char *detail, int32_t rule, uint32_t key_version,
                    uint64_t latency_ns) noexcept with gil:
    cdef Mount m = <Mount>ctx
    if m._audit is None:
        return
    try:
        m._audit(kind.decode(), uid, gid, pid, os.fsdecode(path), action.decode(), effects,
                 detail.decode("utf-8", "replace"), rule, key_version, latency_ns)
    except BaseException as e:
        m.last_callback_error = f"audit: {type(e).__name__}: {e}"


cdef void _audit_cb(void *ctx, const char *kind, uint32_t uid, uint32_t gid, uint32_t pid,
                    const char *path, const char *action, uint32_t effects,
                    const char *detail, int32_t rule, uint32_t key_version,
                    uint64_t latency_ns) noexcept nogil:
    if _alive:
        _audit_py(ctx, kind, uid, gid, pid, path, action, effects, detail, rule, key_version,
                  latency_ns)


@cython.auto_pickle(False)
@cython.final
cdef class Mount:
    """One guard point served by the C engine; see takakrypt/_fuse.pyi."""

    cdef tk_fs *_fs
    cdef object _decide
    cdef object _get_key
    cdef object _audit
    # SAFETY: the tk_fs holds a raw pointer to this Ring's tk_ring.  The reference is
    # set once in __init__ and dropped only after __dealloc__ has freed the tk_fs
    # (which joins every worker thread), so no thread uses the ring after it is freed.
    cdef readonly object ring
    cdef readonly int ring_timeout_ms
    cdef readonly str mountpoint
    cdef readonly str backing
    cdef readonly str key_name
    cdef public object last_callback_error
    cdef object __weakref__

    def __cinit__(self):
        self._fs = NULL

    def __init__(self, mountpoint, backing, key_name, decide, get_key, audit=None, *,
                 int threads=4, size_t cache_entries=0, bint debug=False, ring=None,
                 int ring_timeout_ms=RING_TIMEOUT_MS, double meta_timeout=1.0,
                 bint io_uring=False, int io_uring_per_queue=0, bint read_helpers=True,
                 int format_version=1):
        cdef tk_fs_config cfg
        cdef tk_callbacks cb
        cdef char err[512]
        cdef void *ring_ptr = NULL
        if self._fs != NULL:
            raise ValueError("Mount is already initialised")
        if ring is not None:
            from takakrypt._ring import Ring
            if not isinstance(ring, Ring):
                raise TypeError(f"ring must be a takakrypt._ring.Ring, not {type(ring).__name__}")
            ring_ptr = PyCapsule_GetPointer(ring._capsule(), b"takakrypt._ring.tk_ring")
        elif decide is None:
            raise ValueError("decide is required without a ring")
        if ring_timeout_ms < 1:
            raise ValueError(f"ring_timeout_ms must be >= 1, got {ring_timeout_ms}")
        if not 0.0 <= meta_timeout <= 3600.0:
            raise ValueError(f"meta_timeout must be in [0, 3600] seconds, got {meta_timeout}")
        self.ring = ring
        self.ring_timeout_ms = ring_timeout_ms
        self.mountpoint = os.fspath(mountpoint)
        self.backing = os.fspath(backing) if backing is not None else self.mountpoint
        self.key_name = key_name
        self._decide, self._get_key, self._audit = decide, get_key, audit
        self.last_callback_error = None
        mp = os.fsencode(self.mountpoint)
        bk = os.fsencode(self.backing)
        kn = key_name.encode()
        memset(&cfg, 0, sizeof(cfg))
        cfg.mountpoint = mp
        cfg.backing = bk
        cfg.key_name = kn
        cfg.threads = threads
        cfg.cache_entries = cache_entries
        cfg.debug = debug
        cfg.ring = ring_ptr
        cfg.ring_timeout_ms = ring_timeout_ms
        cfg.meta_timeout = meta_timeout
        cfg.io_uring = io_uring
        cfg.io_uring_per_queue = io_uring_per_queue
        cfg.read_helpers = read_helpers
        if format_version not in (1, 2):
            raise ValueError(f"format_version must be 1 or 2, got {format_version}")
        cfg.format_version = format_version
        cb.ctx = <void *>self
        cb.decide = NULL  # no callback: rename/link (the only ring actions it serves) deny
        if decide is not None:
            cb.decide = _decide_cb
        cb.get_key = _get_key_cb
        cb.audit = _audit_cb
        err[0] = 0
        self._fs = tk_fs_new(&cfg, &cb, err, sizeof(err))
        if self._fs == NULL:
            raise ValueError(err.decode(errors="replace"))

    def __dealloc__(self):
        # The FUSE threads may be waiting for the GIL: never join them while holding it.
        if self._fs != NULL:
            with nogil:
                tk_fs_free(self._fs)
            self._fs = NULL

    def mount(self):
        cdef char err[512]
        cdef int rc
        err[0] = 0
        _mounts.add(self)
        with nogil:
            rc = tk_fs_mount(self._fs, err, sizeof(err))
        if rc:
            raise OSError(-rc, err.decode(errors="replace"))

    def unmount(self):
        with nogil:
            tk_fs_unmount(self._fs)

    def handover_begin(self):
        """Quiesce and describe this guard point for a successor process: returns
        (fds, state).  The fds stay ours (pass copies); fds[0] is the /dev/fuse fd.
        Until handover_abort() or handover_done() nothing is served."""
        cdef char err[512]
        cdef int rc
        cdef int *fds = NULL
        cdef size_t nfds = 0, n = 0
        cdef uint8_t *state = NULL
        err[0] = 0
        with nogil:
            rc = tk_fs_handover_begin(self._fs, &fds, &nfds, &state, &n, err, sizeof(err))
        if rc:
            raise OSError(-rc, err.decode(errors="replace"))
        try:
            return [fds[i] for i in range(nfds)], (<char *>state)[:n]
        finally:
            free(fds)
            free(state)

    def persist_fds(self):
        """The fds a service manager keeps so that a successor can take over even
        after this process is killed (resume with them and an empty state)."""
        cdef int out[4]
        cdef int n = tk_fs_persist_fds(self._fs, out)
        return [out[i] for i in range(n)]

    def handover_abort(self):
        """The successor failed: serve again."""
        with nogil:
            tk_fs_handover_abort(self._fs)

    def handover_done(self):
        """The successor serves: let go for good (never unmount, never abort)."""
        with nogil:
            tk_fs_handover_done(self._fs)

    def resume(self, fds, const unsigned char[::1] state not None):
        """Instead of mount(): take a predecessor's connection over (fds and state
        from its handover_begin(); the fds are duplicated, close yours after)."""
        cdef char err[512]
        cdef int rc
        cdef size_t nfds = len(fds)
        cdef size_t n = state.shape[0]
        cdef int *cfds = <int *>malloc((nfds if nfds else 1) * sizeof(int))
        if cfds == NULL:
            raise MemoryError()
        for i in range(nfds):
            cfds[i] = int(fds[i])
        err[0] = 0
        _mounts.add(self)
        try:
            with nogil:
                rc = tk_fs_resume(self._fs, cfds, nfds, &state[0] if n else NULL, n, err,
                                  sizeof(err))
        finally:
            free(cfds)
        if rc:
            raise OSError(-rc, err.decode(errors="replace"))

    @property
    def is_mounted(self):
        return bool(tk_fs_is_mounted(self._fs))

    def bump_generation(self):
        return tk_fs_bump_generation(self._fs)

    def invalidate(self):
        tk_fs_invalidate(self._fs)

    def drop_keys(self):
        """Wipe the mount's data keys (tk_fs_drop_keys): files ask get_key again."""
        tk_fs_drop_keys(self._fs)

    def rekey_file(self, relpath, *, version=0, rate=0, chunk_blocks=256):
        """Re-encrypt the regular file `relpath` (relative to the backing directory)
        to `version` of its key (0: the current one) while it stays in use; returns
        (outcome, bytes written).  Blocks until done (the GIL released); see _fuse.pyi."""
        cdef char err[1024]
        cdef int rc, outcome = 0
        cdef uint64_t nbytes = 0
        cdef uint32_t ver
        cdef uint64_t rt
        cdef uint32_t chunk
        if not isinstance(relpath, str):
            raise TypeError(f"relpath must be a str, not {type(relpath).__name__}")
        parts = relpath.split("/")
        if (not relpath or relpath.startswith("/") or "\0" in relpath
                or any(p in ("", ".", "..") for p in parts)):
            raise OSError(EINVAL, f"rekey_file: {relpath!r} is not a path relative to the "
                          "backing directory (no leading '/', no '.', '..' or empty "
                          "components)")
        if not 0 <= version < 2 ** 32:
            raise ValueError(f"version must be in [0, 2**32), got {version}")
        if rate < 0 or chunk_blocks < 1 or chunk_blocks >= 2 ** 32:
            raise ValueError("rate must be >= 0 and chunk_blocks >= 1")
        ver, rt, chunk = version, rate, chunk_blocks
        path = os.fsencode(relpath)
        cdef const char *cpath = path
        err[0] = 0
        with nogil:
            rc = tk_fs_rekey_file(self._fs, cpath, ver, rt, chunk, &outcome, &nbytes, err,
                                  sizeof(err))
        if rc:
            raise OSError(-rc, err.decode(errors="replace") or os.strerror(-rc), relpath)
        return REKEY_OUTCOMES[outcome], nbytes

    def rekey_cancel(self, bint on=True):
        """on: running rekey_file calls stop at their next chunk ("cancelled", the
        original untouched) and new ones return "cancelled" at once; False clears it."""
        tk_fs_rekey_cancel(self._fs, on)

    def backing_fd(self):
        """A new descriptor (O_RDONLY, the caller closes it) of the backing directory,
        also under an in-place mount."""
        cdef int fd = tk_fs_backing_fd(self._fs)
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd))
        return fd

    def set_hints(self, unsigned int hints):
        """Policy facts (HINT_PLAIN_ONLY | HINT_GETATTR_ALL | HINT_NO_PROCESS) that let
        the kernel keep regular files' entries and attributes, and checks skip /proc
        (fuse_impl.h, tk_fs_set_hints)."""
        tk_fs_set_hints(self._fs, hints)

    def stats(self):
        cdef tk_fs_stats s
        tk_fs_stats_get(self._fs, &s)
        return {
            "ops": {ACTIONS[i]: s.ops[i] for i in range(TK_ACT_COUNT)},
            "denied": s.denied,
            "cache_hits": s.cache_hits,
            "cache_misses": s.cache_misses,
            "decide_errors": s.decide_errors,
            "nonce_lease_warnings": s.nonce_lease_warnings,
            "nonce_limit_refusals": s.nonce_limit_refusals,
            "bytes_encrypted": s.bytes_encrypted,
            "bytes_decrypted": s.bytes_decrypted,
            "integrity_failures": s.integrity_failures,
            "key_fetches": s.key_fetches,
            "ring_requests": s.ring_requests,
            "ring_timeouts": s.ring_timeouts,
            "ring_errors": s.ring_errors,
            "ring_error_status": s.ring_error_status,
            "ring_malformed": s.ring_malformed,
            "generation": s.generation,
            "inodes": s.inodes,
            "fds_cached": s.fds_cached,
            "fds_pinned": s.fds_pinned,
            "fd_reopens": s.fd_reopens,
            "fd_evictions": s.fd_evictions,
            "stale_handles": s.stale_handles,
            "ident_hits": s.ident_hits,
            "ident_reads": s.ident_reads,
            "uring_threads": s.uring_threads,
            "uring_requests": s.uring_requests,
            "uring_bad_requests": s.uring_bad_requests,
            "uring_lost": s.uring_lost,
            "handover_lost_handles": s.handover_lost_handles,
            "handover_replayed": s.handover_replayed,
            "handover_resent": s.handover_resent,
            "handover_swaps_finished": s.handover_swaps_finished,
            "header_loads": s.header_loads,
            "header_renewals": s.header_renewals,
            "version_moves": s.version_moves,
            "size_cache_hits": s.size_cache_hits,
            "killpriv_v2": s.killpriv_v2,
            "suid_kills": s.suid_kills,
            "inval_data": s.inval_data,
            "inval_dropped": s.inval_dropped,
            "read_prefetches": s.read_prefetches,
            "read_splits": s.read_splits,
            "getxattr_requests": s.getxattr_requests,
            "policy_hints": s.policy_hints,
            "forgets": s.forgets,
            "forget_messages": s.forget_messages,
            "wronly_direct": s.wronly_direct,
            "direct_opens": s.direct_opens,
            "ident_skips": s.ident_skips,
            "rekey_files": s.rekey_files,
            "rekey_bytes": s.rekey_bytes,
        }
