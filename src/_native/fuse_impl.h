/*
 * fuse_impl.h -- Takakrypt guard point data path on the libfuse3 low-level API
 * (pure C; the Python glue is fuse.pyx, the contract for Python is _fuse.pyi).
 *
 * One tk_fs serves one guard point: a backing directory (opened BEFORE the mount, so
 * an in-place mount over the same path still reaches the files underneath) exported
 * at a mount point.  Every operation passes tk_check() (fuse_impl.c): decision cache
 * (cache_impl.h) hit -> act; miss -> a TAKA POLICY_CHECK v2 request over the request
 * ring (ring_impl.h) when the config names one, else the `decide` callback.  Regular files are served
 * in one of two views bound to the kernel inode the caller was routed to at lookup
 * (see docs/guard-points.md):
 *
 *   plaintext (effects permit+apply_key): TAKA v1 decrypted/encrypted per block in C
 *   raw       (effects permit):           the stored bytes, FOPEN_DIRECT_IO
 *
 * Callbacks are called from FUSE worker threads WITHOUT any interpreter state; the
 * shim acquires the GIL itself.  They MUST be thread-safe and MUST NOT block on the
 * mount (they run while a file system request waits for them).
 */
#ifndef TAKAKRYPT_FUSE_IMPL_H
#define TAKAKRYPT_FUSE_IMPL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Actions of the policy language (docs/policy.md).  The value is the `op` of the
 * decision cache key; the order is part of the cache key ABI: append only. */
typedef enum {
    TK_ACT_READ = 0,
    TK_ACT_WRITE,
    TK_ACT_APPEND,
    TK_ACT_TRUNCATE,
    TK_ACT_CREATE,
    TK_ACT_DELETE,
    TK_ACT_RENAME,
    TK_ACT_LINK,
    TK_ACT_GETATTR,
    TK_ACT_SETATTR,
    TK_ACT_LIST,
    TK_ACT_MKDIR,
    TK_ACT_RMDIR,
    TK_ACT_GETXATTR,
    TK_ACT_SETXATTR,
    TK_ACT_COUNT
} tk_action;

/* Name of an action ("read", ...), "?" if out of range. */
const char *tk_action_name(int action);

/* The protocol's action code (enum takakrypt_action in kernel/include/uapi/takakrypt.h,
 * 1..15) of an engine action; 0 (TAKAKRYPT_ACTION_NONE) if out of range.  The engine's
 * enum starts at 0 (it is the cache key's op), the protocol's at 1: never cast. */
uint32_t tk_action_protocol_code(int action);

/* Effects bits (same values as TK_EFFECT_* in cache_impl.h). */
#define TK_FX_PERMIT      (1u << 0)
#define TK_FX_DENY        (1u << 1)
#define TK_FX_APPLY_KEY   (1u << 2)
#define TK_FX_AUDIT       (1u << 3)
#define TK_FX_WOULD_DENY  (1u << 4)
/* Not an effect: a caching hint from the decider.  The answer holds for every path of
 * the guard point (same caller, action): cached once for all paths. */
#define TK_FX_ANY_PATH    (1u << 5)

typedef struct {
    uint32_t effects;
    int32_t rule;
    uint32_t key_version;
    double ttl_seconds;     /* <= 0: do not cache */
} tk_decision;

typedef struct {
    void *ctx;
    /* 0 and *out filled, or a negative errno (the request is then denied).  With a
     * ring (tk_fs_config.ring) only rename and link come here (the engine checks them
     * per path and does not know the other path the protocol's `target` needs). */
    int (*decide)(void *ctx, uint32_t uid, uint32_t gid, uint32_t pid, const char *path,
                  const char *action, tk_decision *out);
    /* Data key `name` at `version` (0 = current; *version_out receives the version).
     * 0 and key[0..32) filled, or a negative errno. */
    int (*get_key)(void *ctx, const char *name, uint32_t version, uint32_t *version_out,
                   uint8_t key[32]);
    /* kind: "access" or "integrity".  rule, key_version: the decision's (-1, 0: none);
     * latency_ns: how long the decision took (0 for events that are not one).  Must
     * not fail; errors are swallowed. */
    void (*audit)(void *ctx, const char *kind, uint32_t uid, uint32_t gid, uint32_t pid,
                  const char *path, const char *action, uint32_t effects,
                  const char *detail, int32_t rule, uint32_t key_version,
                  uint64_t latency_ns);
} tk_callbacks;

struct tk_ring;

typedef struct {
    const char *mountpoint;   /* absolute path */
    const char *backing;      /* NULL or "": in place (backing = mountpoint) */
    const char *key_name;     /* key for new files (1..63 bytes) */
    int threads;              /* FUSE worker threads (>= 1) */
    size_t cache_entries;     /* decision cache bound (0: 65536) */
    int debug;                /* libfuse debug output on stderr */
    /* Decision-cache misses: NULL -> the `decide` callback (with the GIL); else a TAKA
     * POLICY_CHECK v2 request over this ring, answered by the agent's event loop (no
     * GIL).  The ring must outlive the tk_fs (the Python Mount holds the Ring). */
    struct tk_ring *ring;
    int ring_timeout_ms;      /* submit + answer under one deadline; <= 0: 5000 */
    /* O_PATH fds kept open for inodes the kernel remembers (an LRU; the others are
     * reopened from kernel file handles).  0: $TAKAKRYPT_FD_CACHE, else 4096.  At
     * least 16, at most a quarter of RLIMIT_NOFILE. */
    size_t fd_cache;
    /* Seconds the kernel may keep what it learnt from us (docs/guard-points.md,
     * "Kernel caching"): directory entries and the attributes of directories and
     * symlinks; a regular file's attributes after a lookup, getattr or setattr by a
     * caller permitted getattr.  Never a regular file's entry (views are per caller).
     * 0: the kernel asks every time. */
    double meta_timeout;
    /* FUSE over io_uring (fuse_uring.c): 1 = offer it in INIT and serve per-CPU ring
     * queues when the kernel takes it (else the classic channel serves everything). */
    int io_uring;
    int io_uring_per_queue;   /* threads (one entry each) per CPU queue; 0: `threads` */
    /* 1: large reads are read and decrypted by helper threads pinned to the other CPUs
     * (fuse_split.c, docs/guard-points.md "Large reads on the other CPUs") */
    int read_helpers;
    /* TAKA format of files this engine creates: 1 or 2 (docs/file-format.md,
     * "Version 2"); every file of either version is read and written */
    int format_version;
} tk_fs_config;

/* Counters; a snapshot taken with relaxed atomics. */
typedef struct {
    uint64_t ops[TK_ACT_COUNT];    /* checks by action */
    uint64_t denied;
    uint64_t cache_hits;
    uint64_t cache_misses;
    uint64_t decide_errors;        /* callback failed or raised -> denied */
    uint64_t bytes_encrypted;      /* plaintext bytes encrypted */
    uint64_t bytes_decrypted;      /* plaintext bytes produced by decryption */
    uint64_t integrity_failures;
    uint64_t key_fetches;          /* get_key callbacks */
    uint64_t ring_requests;        /* POLICY_CHECK requests sent over the ring */
    uint64_t ring_timeouts;        /* ... no answer in time (denied) */
    uint64_t ring_errors;          /* ... ring closed, error answer from the consumer (denied) */
    uint64_t ring_error_status;    /* ... answered with a non-SUCCESS status (denied) */
    uint64_t ring_malformed;       /* ... answer failed validation (denied) */
    uint64_t generation;
    /* inode table / fd cache (gauges, then counters) */
    uint64_t inodes;               /* inodes known (kernel references or named children) */
    uint64_t fds_cached;           /* O_PATH fds in the LRU (bound: fd_cache) */
    uint64_t fds_pinned;           /* inodes whose fd is pinned (root, no file handle) */
    uint64_t fd_reopens;           /* open_by_handle_at on a cache miss */
    uint64_t fd_evictions;         /* fds closed by the LRU */
    uint64_t stale_handles;        /* reopen found the object gone (ESTALE -> ENOENT) */
    /* caller identity */
    uint64_t ident_hits;           /* answered by the cached /proc/<tid> directory */
    uint64_t ident_reads;          /* read afresh from /proc */
    /* FUSE over io_uring */
    uint64_t uring_threads;        /* ring threads with a registered entry (gauge) */
    uint64_t uring_requests;       /* requests that came through a ring */
    uint64_t uring_bad_requests;   /* ... with a layout we do not know (EIO) */
    uint64_t uring_lost;           /* ring entries lost while serving: connection aborted */
    uint64_t handover_lost_handles; /* open files a resume could not reopen (EIO on them) */
    uint64_t handover_replayed;    /* requests of a killed predecessor served again */
    uint64_t handover_resent;      /* ... re-sent by the kernel instead (FUSE_NOTIFY_RESEND) */
    uint64_t handover_swaps_finished; /* inodes a predecessor killed between a rekey's
                                       * exchange and its repoint left: the copy kept */
    uint64_t header_loads;         /* TAKA headers read and verified */
    uint64_t header_renewals;      /* truncates to 0 that gave a file a new header (the
                                    * key's current version): tk_taka_truncate0 */
    uint64_t version_moves;        /* TAKA v2 files moved to their key's current version
                                    * by a write (docs/file-format.md, "Version 2") */
    uint64_t size_cache_hits;      /* stats answered from remembered header sizes */
    uint64_t killpriv_v2;          /* 1: FUSE_HANDLE_KILLPRIV_V2 negotiated (gauge) */
    uint64_t suid_kills;           /* setuid/setgid bits cleared for a write/truncate/open */
    uint64_t inval_data;           /* page caches of plaintext nodes dropped (notifier) */
    uint64_t inval_dropped;        /* ... not queued (queue full; next open drops them) */
    uint64_t read_prefetches;      /* backing ranges asked for ahead of a sequential read */
    uint64_t read_splits;          /* parts of large reads decrypted by helper threads */
    uint64_t getxattr_requests;    /* GETXATTR requests, any name */
    uint64_t policy_hints;         /* TK_HINT_* in force (gauge) */
    uint64_t forgets;              /* nodes forgotten by the kernel (FORGET, BATCH_FORGET) */
    uint64_t forget_messages;      /* ... messages carrying them */
    uint64_t wronly_direct;        /* 1: write-only plaintext opens use direct I/O (gauge) */
    uint64_t direct_opens;         /* ... opens and creates given it */
    uint64_t ident_skips;          /* checks keyed by uid/gid alone (TK_HINT_NO_PROCESS) */
    uint64_t rekey_files;          /* files re-encrypted by a live rekey (swapped in) */
    uint64_t rekey_bytes;          /* ... bytes written to them (copies and mirrored writes) */
    /* per-file GCM nonce budget (docs/file-format.md, "Encryption count") */
    uint64_t nonce_lease_warnings; /* leases taken past the soft limit (re-key the file) */
    uint64_t nonce_limit_refusals; /* writes refused at the hard limit (EKEYEXPIRED) */
} tk_fs_stats;

typedef struct tk_fs tk_fs;

/* New unmounted file system; NULL + message in err on failure. */
tk_fs *tk_fs_new(const tk_fs_config *cfg, const tk_callbacks *cb, char *err, size_t errlen);

/*
 * Open the backing directory, mount, start the worker threads and wait until the
 * kernel's INIT was answered.  0, or -errno with a message in err.  Blocking: call
 * without the GIL.
 */
int tk_fs_mount(tk_fs *fs, char *err, size_t errlen);

/*
 * Unmount (lazy), abort the connection if clients still hold files open, join the
 * threads, wipe every key.  Idempotent.  Blocking: call without the GIL.  Callbacks
 * may still run while it waits; they must not wait on the caller of this function.
 */
int tk_fs_unmount(tk_fs *fs);

/* 1 while the loop serves requests (the kernel side may still be gone: ENOTCONN). */
int tk_fs_is_mounted(const tk_fs *fs);

/* Policy reload: hide all cached decisions (O(1)) and forget the current key version. */
uint64_t tk_fs_bump_generation(tk_fs *fs);
/* Drop every cached decision and the per-file header state. */
void tk_fs_invalidate(tk_fs *fs);
/* Key expiry (the agent's key cache, docs/keys.md): wipe and empty the key table and
 * forget the current version; every file's header state is reloaded at its next use,
 * so its keys are asked of get_key again (a file whose key is refused: EIO). */
void tk_fs_drop_keys(tk_fs *fs);

/* Facts the policy engine proved for every caller and path of this guard point
 * (takakrypt.policy.Engine.metadata_hints); they let the kernel keep more:
 *   TK_HINT_PLAIN_ONLY   no rule grants the raw view: every caller a regular file is
 *                        permitted to gets its plaintext node, so its entry can be kept;
 *   TK_HINT_GETATTR_ALL  getattr is permitted, unaudited, to everyone on every path, so
 *                        a regular file's attributes can be kept whoever asked;
 *   TK_HINT_NO_PROCESS   no rule looks at the process or at groups: a decision is a
 *                        function of the request's uid and gid (and path, action, time),
 *                        so a check reads nothing from /proc and caches by uid/gid;
 *                        the process is still identified for a decision asked of the
 *                        agent (a miss).  Independent of the other two.
 * Any time, from any thread; 0 (the default) keeps the per-caller routing.  A reload
 * that drops TK_HINT_NO_PROCESS must clear it before the new policy decides anything
 * (takakrypt.agent.daemon: the hints of both policies first, then the new ones). */
#define TK_HINT_PLAIN_ONLY 1u
#define TK_HINT_GETATTR_ALL 2u
#define TK_HINT_NO_PROCESS 4u
void tk_fs_set_hints(tk_fs *fs, unsigned hints);

void tk_fs_stats_get(const tk_fs *fs, tk_fs_stats *out);

/* Unmounts first if needed. NULL accepted. */
void tk_fs_free(tk_fs *fs);

/* Handover to a successor process (fuse_handover.c; docs/guard-points.md, "Restarts
 * without unmounting").  begin: quiesce, then the fds to pass (*fds_out[0] is the
 * /dev/fuse fd; still ours: pass copies) and the state (malloc'd, like *fds_out).
 * After it the guard point serves nothing until abort (serve again) or done (let go
 * for good: never unmounted, never aborted by us).  resume: instead of tk_fs_mount,
 * take a predecessor's connection over (the fds are dup'ed). */
int tk_fs_handover_begin(tk_fs *fs, int **fds_out, size_t *nfds_out, uint8_t **state_out,
                         size_t *len_out, char *err, size_t errlen);
void tk_fs_handover_abort(tk_fs *fs);
void tk_fs_handover_done(tk_fs *fs);
int tk_fs_persist_fds(tk_fs *fs, int out[4]);
int tk_fs_resume(tk_fs *fs, const int *fds, size_t nfds, const uint8_t *state, size_t len,
                 char *err, size_t errlen);

/* Live rekey of one regular file (fuse_rekey.c; docs/guard-points.md, "Live rekey
 * (data path)"): re-encrypt relpath (relative to the backing directory: no leading /,
 * no . or .. components) to `version` of its key (0: the current version, as new files
 * get it) while it stays in use.  rate: bytes of ciphertext written per second (0: no
 * limit), slept with no lock held; chunk_blocks: blocks copied per read-lock hold.
 * 0 with *outcome (and, for a DONE, *bytes: what the copy wrote,
 * not the writes mirrored for applications), or -errno with a message in err:
 * -EIO a header or block that does not verify (nothing is written), -ENOKEY a key that
 * cannot be got, -ENOENT the file is gone, -EINVAL a bad path.  Blocks the caller
 * (no GIL: it calls get_key).  Thread-safe; one rekey per file at a time (BUSY). */
enum {
    TK_REKEY_DONE = 0,        /* swapped in */
    TK_REKEY_CURRENT,         /* at the target version (or newer): nothing written */
    TK_REKEY_HARDLINK,        /* more than one name: skipped */
    TK_REKEY_NOT_REGULAR,     /* not a regular file: skipped */
    TK_REKEY_BUSY,            /* renamed, raw-written, handover: try again later */
    TK_REKEY_CANCELLED        /* tk_fs_rekey_cancel or unmount: the original untouched */
};
int tk_fs_rekey_file(tk_fs *fs, const char *relpath, uint32_t version, uint64_t rate,
                     uint32_t chunk_blocks, int *outcome, uint64_t *bytes, char *err,
                     size_t errlen);
/* 1: running rekeys stop at their next chunk (CANCELLED) and new ones stop at once,
 * until called with 0. */
void tk_fs_rekey_cancel(tk_fs *fs, int on);
/* A new O_RDONLY descriptor of the backing directory (under an in-place mount too),
 * or -errno. */
int tk_fs_backing_fd(tk_fs *fs);

#ifdef __cplusplus
}
#endif

#endif /* TAKAKRYPT_FUSE_IMPL_H */
