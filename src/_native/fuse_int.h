/*
 * fuse_int.h -- internals shared by fuse_impl.c (lifecycle, identity, tk_check, keys),
 * fuse_inode.c (inode table, paths), fuse_taka.c (TAKA file I/O) and fuse_ops.c (the
 * low-level operations).  Not an API.
 */
#ifndef TAKAKRYPT_FUSE_INT_H
#define TAKAKRYPT_FUSE_INT_H

#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "aesgcm_impl.h"
#include "cache_impl.h"
#include "secmem.h"
#include "fuse_impl.h"

#define TK_HDR_SIZE      128
#define TK_HDR_STATIC    96
#define TK_HDR_TAGOFF    112
#define TK_KEYID_MAX     63
#define TK_MAX_PLAIN     ((uint64_t)INT64_MAX)
/* a read of at least 2 x TK_SPLIT_MIN_BLOCKS blocks is decrypted in parts of at least
 * that many blocks, one per CPU, on at most TK_SPLIT_MAX_CPUS CPUs (fuse_split.c) */
#define TK_SPLIT_MIN_BLOCKS  64
#define TK_SPLIT_MAX_CPUS    8

/* Views.  A regular file has one kernel inode (nodeid) per view, so page cache,
 * i_size and mmap never mix plaintext and raw bytes. */
enum { TK_VIEW_PLAIN = 0, TK_VIEW_RAW = 1, TK_NVIEWS = 2 };

/* TAKA v2 (docs/file-format.md, "Version 2"): the handles of a file's other key
 * versions, made on first use.  Readers (shared lock) add entries under a global mutex
 * and publish them with a release store of nvers; the exclusive lock holder may also. */
#define TK_TAKA_VERS 8
typedef struct {
    uint32_t ver;
    tk_gcm *gcm;
} tk_vgcm;

/* Per backing inode TAKA state: valid under the inode's lock (rwlock). */
typedef struct {
    int state;                    /* 0 unknown, 1 loaded+verified, -errno load failed */
    uint64_t epoch;               /* fs->taka_epoch when loaded (invalidate() bumps it) */
    uint8_t hdr[TK_HDR_SIZE];
    uint8_t aad[TK_HDR_STATIC];   /* every block's AAD prefix: hdr[0..96), in v2 with the
                                   * write version (hdr[12..16)) zeroed */
    uint64_t size;                /* plaintext size (mirror of hdr[96..104)) */
    uint32_t bs;
    uint8_t fmtv;                 /* format version: 1 or 2 */
    uint32_t wver;                /* key version new blocks use (hdr[12..16)) */
    uint32_t oldest;              /* v2: lowest block version (hdr[108..112)); v1: wver */
    tk_gcm *gcm;                  /* wver's; secure memory (secmem.h), as is mac_key */
    uint8_t *mac_key;             /* 32 bytes (wver's), NULL until keys_from() */
    tk_vgcm vers[TK_TAKA_VERS];   /* v2: other versions met (see above) */
    uint32_t nvers;
    int phys_ok;                  /* 1: the stored length is exactly what `size` implies
                                   * (we wrote or cut it so): no stale tail to look for */
    uint64_t enc_used;            /* block encryptions counted, <= the lease in the header */
} tk_taka;

struct tk_inode;

typedef struct {
    struct tk_inode *ino;
    uint64_t nlookup;             /* kernel references to this nodeid */
    int view;
} tk_node;

/* A table of objects by small integer (fuse_inode.c): the kernel's node ids and file
 * handles are slot numbers, not addresses, so a successor process can rebuild the same
 * numbers from a handover (fuse_handover.c).  Reads are lock-free (the kernel only
 * names live slots); add/del/place under mu. */
#define TK_SLOT_BITS   14
#define TK_SLOT_CHUNKS 65536            /* 2^30 slots */
typedef struct tk_slots {
    pthread_mutex_t mu;
    void **chunk[TK_SLOT_CHUNKS];
    uint32_t next;                       /* every slot >= next is unused */
    uint32_t *free;                      /* unused slots below next */
    size_t nfree, capfree;
} tk_slots;
void tk_slots_init(tk_slots *s);
void tk_slots_destroy(tk_slots *s);      /* the table only, not the objects */
int64_t tk_slots_add(tk_slots *s, void *p);             /* slot, or -ENOMEM */
/* pread/pwrite until len bytes moved (EINTR retried): bytes read (short at end of
 * file) / 0, or -errno (fuse_taka.c) */
ssize_t tk_pread_full(int fd, void *buf, size_t len, uint64_t off);
int tk_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int tk_slots_place(tk_slots *s, uint32_t slot, void *p); /* restore: before any add */
int tk_slots_seal(tk_slots *s);          /* restore done: gaps below next become free */
void tk_slots_del(tk_slots *s, uint32_t slot);
static inline void *tk_slots_get(tk_slots *s, uint64_t slot) {
    if (slot >= (uint64_t)TK_SLOT_CHUNKS << TK_SLOT_BITS) return NULL;
    void **c = __atomic_load_n(&s->chunk[slot >> TK_SLOT_BITS], __ATOMIC_ACQUIRE);
    return c ? __atomic_load_n(&c[slot & ((1u << TK_SLOT_BITS) - 1)], __ATOMIC_ACQUIRE) : NULL;
}

typedef struct tk_inode {
    uint32_t slot;                /* node ids 2*slot+1 (plaintext), 2*slot+2 (raw) */
    /* Backing object: a kernel file handle, reopened (O_PATH) on demand.  fd is an
     * O_PATH|O_NOFOLLOW fd or -1; NEVER use it directly: borrow it with tk_inode_fd()
     * and give it back with tk_inode_put() (fuse_inode.c: bounded fd cache). */
    int fd;                       /* under fs->fdc_mu unless pinned */
    int pinned;                   /* fd kept until the inode goes (root, no handle) */
    uint32_t fd_users;            /* borrowers right now (fdc_mu); never evicted while > 0 */
    struct file_handle *handle;   /* NULL iff pinned */
    struct tk_inode *lru_prev, *lru_next;  /* fd cache LRU (fdc_mu), when fd >= 0 */
    dev_t dev;
    ino_t ino;
    mode_t type;                  /* S_IFMT bits */
    tk_node node[TK_NVIEWS];
    uint64_t refs;                /* nlookups of both nodes + children naming us + pins */
    struct tk_inode *parent;      /* for policy paths (the most recent name) */
    char *name;
    struct tk_inode *hnext;       /* hash chain, or the stale list when !hashed */
    int hashed;                   /* 0: (dev, ino) was reused by another object */
    pthread_rwlock_t lock;        /* TAKA data + header of this file */
    tk_taka taka;
    /* 1: the stored bytes changed other than through the plaintext node (raw view
     * writes, truncates, new inode): the next plaintext open drops the kernel's page
     * cache of the plaintext node (keep_cache 0).  Atomic. */
    int plain_stale;
    /* live rekey (fuse_rekey.c): the running rekey's dirty tracking (set and cleared
     * under the write lock, read under either lock), and the number of times a rekey
     * swapped the backing object (bumped under the write lock; atomic): a backing fd
     * opened before a swap names the old object, so whoever opened one without the
     * lock checks this under the lock before using it */
    struct tk_rekey *rk;
    uint64_t rk_gen;
    int internal;                 /* 1: pinned by a rekey, never looked up by the kernel:
                                   * no shadow record, not handed over */
    struct tk_oldh *old_handles;  /* handles replaced by a rekey, freed with the inode
                                   * (tk_inode_fd may still read one) */
} tk_inode;

/* Names of the live rekey's temporaries (and of its manager's state file) in the
 * backing directories: a guard point hides them from readdir and refuses lookups (ENOENT)
 * and new entries (EPERM) of such names in every view (docs/guard-points.md, "Live rekey
 * (data path)"). */
#define TK_REKEY_PREFIX ".takakrypt-rekey."
static inline int tk_hidden_name(const char *name) {
    return name[0] == '.' && strncmp(name, TK_REKEY_PREFIX, sizeof TK_REKEY_PREFIX - 1) == 0;
}

/* Open file handle (fi->fh = its slot in fs->fhs + 1). */
enum { TK_FH_FILE = 1, TK_FH_DIR = 2 };
typedef struct {
    int kind;                     /* TK_FH_FILE */
    uint32_t slot;
    int fd;                       /* real fd on the backing file */
    int view;
    int append;                   /* O_APPEND: plaintext appends at the current size */
    int writable;
    tk_inode *ino;
    /* write-behind (fuse_ops.c): the stored range written sequentially and not yet
     * handed to writeback.  Atomics: one handle may serve several threads at once. */
    uint64_t wb_start, wb_end;
    /* read prefetch (fuse_ops.c): the furthest end of the current read stream, +1
     * (0: no read yet).  Atomic. */
    uint64_t ra_next;
} tk_fh;

/* Open directory handle (fi->fh, as tk_fh). */
typedef struct {
    int kind;                     /* TK_FH_DIR */
    uint32_t slot;
    tk_inode *ino;
    DIR *dp;
    off_t offset;
    struct dirent *entry;
} tk_dir;

typedef struct {
    uint32_t uid, gid, pid;
    uint64_t start_time, exe_dev, exe_ino;
    /* non-NULL: a uid/gid-only identity (TK_HINT_NO_PROCESS; tk_ident_for), the request
     * to identify the process from if the decision must be asked for */
    fuse_req_t lazy;
} tk_ident;

/* One identity cache slot: a /proc/<tid> directory fd pins the task it was opened
 * for (lookups under it fail once that task is gone, even if the tid is reused). */
typedef struct tk_idslot {
    pthread_mutex_t mu;
    uint32_t tid;
    int dfd;                      /* O_DIRECTORY fd on /proc/<tid>, or -1 */
    uint64_t start_time;
} tk_idslot;
#define TK_IDC_SLOTS 512

typedef struct tk_szent {
    uint64_t dev, ino, stored, ctime_ns, epoch, plain;
} tk_szent;
/* remembered header sizes (fuse_ops.c): TK_SZC_SETS sets of TK_SZC_WAYS entries, least
 * recently used first out; 262,144 files, 12 MiB of address space touched as it fills */
#define TK_SZC_SETS 65536
#define TK_SZC_WAYS 4

typedef struct {
    char name[TK_KEYID_MAX + 1];
    uint32_t version;
    uint8_t key[32];
} tk_keyent;

struct tk_fs {
    tk_fs_config cfg;
    char *mountpoint, *backing, *key_name;
    tk_callbacks cb;
    struct fuse_session *se;
    int root_fd;
    int proc_fd;
    dev_t mnt_dev;                /* st_dev of the mount (connection id = minor) */
    pthread_t loop_thread;
    int loop_running;             /* 1 from start to loop exit */
    int mounted;
    int init_done;
    pthread_mutex_t state_mu;
    pthread_cond_t state_cv;
    tk_cache *cache;

    /* node ids and file handles by slot (fuse_inode.c) */
    tk_slots nodes, fhs;

    /* handover to a successor process (fuse_handover.c) */
    int ho_quiesce;               /* 1: take no new request (atomic) */
    int ho_done;                  /* 1: handed over: never unmount, abort or serve */
    pthread_mutex_t ho_mu;
    pthread_cond_t ho_cv;
    unsigned ho_in_read;          /* classic readers inside read(2) (atomic) */
    unsigned ho_busy;             /* classic requests read, not yet done (atomic) */
    pthread_t *ho_readers;        /* every classic reader thread (ho_mu) */
    size_t ho_nreaders, ho_capreaders;
    uint8_t *init_req;            /* the kernel's INIT request as read (header + body) */
    size_t init_req_len;
    uint64_t resume_unique;       /* the synthetic INIT of a resume: its reply is not sent */
    int resumed;                  /* 1: this connection was taken over, not mounted */
    struct tk_shadow *sh;         /* fuse_shadow.c, or NULL (no recovery after a kill) */
    int sh_reused;                /* 1: the shadow is a killed predecessor's */
    int restoring;                /* 1: tables being rebuilt (tk_fs_resume) */
    struct tk_inode *lost;        /* what an unknown node id names: fails closed */
    uint64_t (*recovered)[2];     /* (dev, ino) a killed predecessor created for a
                                   * request it did not answer (ho_mu) */
    size_t nrecovered;

    /* inode table */
    pthread_mutex_t itab_mu;
    tk_inode **buckets;
    size_t nbuckets, ninodes;
    tk_inode *root;
    tk_inode *stale;              /* unhashed inodes still known to the kernel */
    int *dead_fds;                /* fds of freed inodes, closed after itab_mu is let go */
    size_t ndead, dead_cap;

    /* fd cache (fuse_inode.c): O_PATH fds of non-pinned inodes, LRU, bounded */
    pthread_mutex_t fdc_mu;       /* lock order: itab_mu before fdc_mu */
    tk_inode *lru_head, *lru_tail;
    size_t fd_cached, fd_cap;
    int handle_fd;                /* O_RDONLY on the backing root: open_by_handle_at mount fd */
    int handle_mnt_id;            /* mount id of the backing root; -1: handles unusable */

    /* keys: fetched once per (name, version) for the mount's lifetime */
    pthread_mutex_t key_mu;
    tk_keyent *keys;
    size_t nkeys, capkeys;
    uint32_t current_version;     /* 0 = ask */
    uint64_t taka_epoch;          /* bumped by tk_fs_invalidate: reload every header */

    /* root's supplementary groups, restored after creating as the caller */
    gid_t *root_groups;
    int nroot_groups;

    uint32_t ring_seq;            /* POLICY_CHECK sequence numbers (atomic, never 0) */

    /* caller identity cache (fuse_impl.c): tid -> its /proc/<tid> directory */
    struct tk_idslot *idc;

    /* plaintext sizes of verified headers, by backing (dev, ino, stored size, ctime):
     * a stat after the kernel forgot the inode needs no header read (fuse_ops.c) */
    pthread_mutex_t szc_mu;
    struct tk_szent *szc;

    /* FUSE over io_uring (fuse_uring.c) */
    uint64_t init_unique;         /* unique of the kernel's INIT request (atomic) */
    uint32_t init_in_flags;       /* what the kernel offered in it (written before unique) */
    int init_replied;             /* 1: our INIT reply is written, -1: it failed (state_mu) */
    int uring_offered;            /* FUSE_OVER_IO_URING was set in the INIT reply */
    int uring_error;              /* errno of a refused ring command (atomic), 0: none */
    int unmounting;               /* tk_fs_unmount began (atomic) */
    struct tk_uring *uring;
    /* the classic channel once every ring entry is registered: one reader at a time,
     * reads at most every TK_CLASSIC_GATE_NS (fuse_uring.c, io_read) */
    int classic_gated;            /* 1: every ring entry registered (atomic) */
    int classic_reader;           /* 1: a thread is reading (atomic) */
    uint64_t classic_next_ns;     /* CLOCK_MONOTONIC time of the next read (atomic) */
    uint64_t classic_gate_ns;     /* set before the ring threads start; 0: no gate */

    /* page-cache invalidations queued for the notifier thread (fuse_impl.c) */
    pthread_mutex_t nq_mu;
    pthread_cond_t nq_cv;
    fuse_ino_t *nq;
    size_t nq_len, nq_cap;
    int nq_stop, nq_started;
    pthread_t nq_thread;

    /* helpers decrypting parts of large reads (fuse_split.c) */
    pthread_mutex_t sp_mu;
    pthread_cond_t sp_done_cv;
    struct tk_split_helper *sp_helpers;  /* one per CPU */
    int sp_stop;
    unsigned sp_nthreads;         /* running helpers (atomic); 0: reads are not split */
    unsigned sp_force_parts;      /* tests: parts per read, 0: one per other CPU */

    /* live rekey (fuse_rekey.c) */
    pthread_mutex_t rk_mu;        /* the swap of a rekey vs. a handover's state */
    pthread_cond_t rk_cv;
    unsigned rk_active;           /* rekey_file calls running (rk_mu) */
    int rk_cancel;                /* set by rekey_cancel(): stop at the next chunk (atomic) */
    int rk_stop;                  /* unmount: every rekey stops (rk_mu + atomic) */
    struct tk_retired *rk_retired;  /* objects a rekey replaced (itab_mu) */
    struct tk_incoming *rk_incoming;  /* objects a rekey is swapping in (itab_mu) */

    tk_fs_stats st;               /* updated with __atomic builtins */
};

/* fi->fh of an open file or directory (its slot in fs->fhs + 1), or NULL: a handle a
 * killed predecessor gave out and this process could not restore (tk_fh_unknown:
 * operations on it fail with EBADF, a RELEASE of it succeeds), or of the other kind */
static inline tk_fh *fh_of(tk_fs *fs, const struct fuse_file_info *fi) {
    tk_fh *fh = (tk_fh *)tk_slots_get(&fs->fhs, fi->fh - 1);
    return fh && fh->kind == TK_FH_FILE ? fh : NULL;
}
static inline tk_dir *dir_of(tk_fs *fs, const struct fuse_file_info *fi) {
    tk_dir *d = (tk_dir *)tk_slots_get(&fs->fhs, fi->fh - 1);
    return d && d->kind == TK_FH_DIR ? d : NULL;
}
tk_fh *tk_fh_new(tk_fs *fs, int fd, int view, int flags, tk_inode *ino);  /* fuse_ops.c */
tk_dir *tk_dir_new(tk_fs *fs, tk_inode *ino, uint64_t slot_plus1, int *rc);

#define TK_INC(fs, field, n) __atomic_fetch_add(&(fs)->st.field, (uint64_t)(n), __ATOMIC_RELAXED)

/* Drop the kernel's cached pages (and attributes) of nodeid, from the notifier thread:
 * never from a request handler, whose thread a locked page's READ may be waiting for. */
void tk_inval_data_async(tk_fs *fs, fuse_ino_t nodeid);

/* fuse_uring.c */
/* The ring's part of a handover (fuse_handover.c): its memfd, the address it is
 * mapped at, its layout, and which entries hold a parked request. */
typedef struct {
    int memfd;                    /* -1: no ring */
    uintptr_t base;
    unsigned nthreads, per;
    size_t cap;
    uint8_t *parked;              /* nthreads flags (malloc'd) */
} tk_ring_state;
/* Lookups of names starting with this in the root are a handover's own requests
 * (fuse_uring.c, tk_uring_park_all): answered ENOENT without a policy check. */
#define TK_PARK_PREFIX ".takakrypt-handover-"
int tk_uring_resume(tk_fs *fs, const tk_ring_state *from);
int tk_uring_park_all(tk_fs *fs, int timeout_ms);
int tk_uring_describe(tk_fs *fs, tk_ring_state *out);  /* 1: a ring, 0: none */
/* fuse_handover.c: a handover's state, decoded */
typedef struct {
    uint32_t slot, parent, type;
    uint64_t dev, ino, nlookup[2];
    int hashed, fd_index;         /* fd_index: a pinned inode's fd in the fd list, or -1 */
    struct file_handle *handle;   /* NULL: pinned (or the root) */
    char *name;
    /* a killed predecessor's rekey swap in flight (fuse_shadow.c): the object that
     * replaces this one; kept if the name holds it (tk_itab_restore) */
    int has_alt;
    uint64_t alt_dev, alt_ino;
    struct file_handle *alt_handle;  /* NULL: pinned */
} tk_ho_inode;
typedef struct {
    uint32_t slot, inode;
    int kind, view, fdflags, append, writable;
} tk_ho_fh;
typedef struct {
    uint32_t flags;
    char *mountpoint, *backing;
    uint64_t root_dev, root_ino;
    uint8_t *init;
    size_t init_len;
    tk_ho_inode *inodes;
    size_t ninodes;
    tk_ho_fh *fhs;
    size_t nfhs;
    tk_ring_state ring;         /* ring.memfd: an index into the fd list, or -1 */
} tk_ho_state;
#define TK_HO_KILLPRIV_V2 1u
#define TK_HO_URING 2u
int tk_ho_decode(const uint8_t *data, size_t len, size_t nfds, tk_ho_state *st,
                 char *err, size_t errlen);
void tk_ho_state_free(tk_ho_state *st);
/* fuse_inode.c: the inode table of a handover (after tk_itab_init) */
int tk_itab_restore(tk_fs *fs, const tk_ho_state *st, const int *fds);
/* fuse_ops.c: an open file or directory of a handover, in its slot */
int tk_fh_restore(tk_fs *fs, const tk_ho_fh *h);
/* fuse_shadow.c: the handover state kept current for a successor after a kill */
int tk_sh_open(tk_fs *fs);
void tk_sh_close(tk_fs *fs);
int tk_sh_fd(tk_fs *fs);
void tk_sh_header(tk_fs *fs, uint32_t flags, const tk_ring_state *ring);
void tk_sh_inode(tk_fs *fs, tk_inode *ino);       /* itab_mu */
void tk_sh_nlookup(tk_fs *fs, tk_inode *ino);     /* itab_mu */
void tk_sh_name(tk_fs *fs, tk_inode *ino);        /* itab_mu */
void tk_sh_inode_gone(tk_fs *fs, uint32_t slot);  /* itab_mu */
/* a rekey's swap (itab_mu): before the exchange, the object that will replace the
 * inode's; after it (or a swap that did not happen), the record names the inode's */
void tk_sh_swap(tk_fs *fs, tk_inode *ino, const struct stat *nst,
                const struct file_handle *h);
void tk_sh_swap_end(tk_fs *fs, tk_inode *ino);
void tk_sh_fh(tk_fs *fs, uint32_t slot, int kind, uint32_t inode, int view, int fdflags,
              int append, int writable);
void tk_sh_fh_gone(tk_fs *fs, uint32_t slot);
uint8_t *tk_sh_journal_buf(tk_fs *fs, unsigned idx, size_t len);
void tk_sh_journal_prefault(tk_fs *fs, unsigned idx);
void tk_sh_journal_reading(tk_fs *fs, unsigned idx);
void tk_sh_journal_busy(tk_fs *fs, unsigned idx, size_t len, uint64_t unique);
struct iovec;
void tk_sh_journal_replying(tk_fs *fs, unsigned idx, const struct iovec *iov, int count);
uint64_t tk_sh_journal_unique(tk_fs *fs, unsigned idx);
uint32_t tk_sh_journal_opcode(tk_fs *fs, unsigned idx);
/* Requests a successor never serves again after a kill: a lost FORGET only leaks. */
static inline int tk_replayable(uint32_t opcode) {
    return opcode != 2 /* FORGET */ && opcode != 42 /* BATCH_FORGET */ &&
           opcode != 36 /* INTERRUPT */ && opcode != 26 /* INIT */;
}
void tk_sh_journal_done(tk_fs *fs, unsigned idx);
/* slots, replies: room for every journal slot (TK_SH_MAX_READERS); receive each
 * entry's slot and whether it is a saved reply (1: write it again) or a request
 * (0: serve it again) */
#define TK_SH_MAX_READERS 64
int tk_sh_load(tk_fs *fs, int memfd, tk_ho_state *st, uint8_t ***reqs, size_t **lens,
               size_t *nreqs, unsigned *slots, uint8_t *replies, char *err, size_t errlen);
int tk_sh_adopt(tk_fs *fs, int memfd);
/* A file this request created (dev, ino): kept where a successor finds it if we are
 * killed before the reply (fuse_uring.c); 1 if `name` in pfd is such a file of a
 * killed predecessor (then forgotten: once only). */
void tk_note_create(tk_fs *fs, uint64_t dev, uint64_t ino);
int tk_recovered_create(tk_fs *fs, int pfd, const char *name);
void tk_add_recovered(tk_fs *fs, uint64_t dev, uint64_t ino);
void tk_sh_journal_note(tk_fs *fs, unsigned idx, uint64_t dev, uint64_t ino);
/* the classic readers' side of a quiesce */
unsigned tk_ho_register_reader(tk_fs *fs);  /* the reader's index (journal slot) */
void tk_ho_wait(tk_fs *fs);
int tk_uring_attach_io(tk_fs *fs);
void tk_fs_abort(tk_fs *fs);        /* fuse_impl.c */
void tk_fs_abort_live(tk_fs *fs);   /* ... only while mounted and not unmounting */
int tk_uring_start(tk_fs *fs);
void tk_uring_stop(tk_fs *fs);
/* Where the reply data of the request this thread is serving may be built in place
 * (its ring entry's payload: the reply then copies nothing), or NULL (classic channel,
 * or more than the entry holds).  Valid until the reply is sent. */
char *tk_uring_reply_space(size_t size);

/* ---- fuse_impl.c ---- */
/* tk_check flags */
#define TK_CHK_PROBE  1           /* choose a view: never audited, never counted as denied */
int tk_check(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name, tk_action act,
             int flags, tk_decision *out);
/* rename and link: the same check, carrying the destination (`target`, relative to
 * the guard point) that the protocol's POLICY_CHECK wants for those actions. */
int tk_check_target(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name,
                    tk_action act, const char *target, tk_decision *out);
/* Same with an identity already read (and a caller path; target NULL but for
 * rename/link). */
int tk_check_path(tk_fs *fs, const tk_ident *id, const char *path, tk_action act,
                  int flags, tk_decision *out);
int tk_check_path_target(tk_fs *fs, const tk_ident *id, const char *path,
                         const char *target, tk_action act, int flags, tk_decision *out);
int tk_ident_get(tk_fs *fs, fuse_req_t req, tk_ident *id);
/* What a check needs: tk_ident_get, or uid/gid alone under TK_HINT_NO_PROCESS. */
int tk_ident_for(tk_fs *fs, fuse_req_t req, tk_ident *id);
void tk_audit(tk_fs *fs, const char *kind, const tk_ident *id, const char *path,
              const char *action, uint32_t effects, const char *detail);
/* An access decision's audit record: tk_audit with the decision's rule and key
 * version and the time it took. */
void tk_audit_decision(tk_fs *fs, const tk_ident *id, const char *path, const char *action,
                       const tk_decision *d, uint64_t latency_ns, const char *detail);
void tk_audit_integrity(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *action,
                        const char *detail);
/* Data key by name/version (0 = current: *vout receives it). */
int tk_key_get(tk_fs *fs, const char *name, uint32_t version, uint32_t *vout,
               uint8_t key[32]);

/* ---- fuse_inode.c ---- */
int tk_itab_init(tk_fs *fs);
void tk_itab_free(tk_fs *fs);
tk_inode *tk_node_inode(tk_fs *fs, fuse_ino_t nodeid, int *view);
fuse_ino_t tk_nodeid(tk_fs *fs, tk_inode *ino, int view);
/* Find or add the inode for (st_dev, st_ino) named `name` in `parent`; takes over
 * fd (an O_PATH fd on the object: cached, or closed).  Adds one kernel lookup to
 * node[view]. */
tk_inode *tk_itab_add(tk_fs *fs, tk_inode *parent, const char *name, int fd,
                      const struct stat *st, int view);
void tk_itab_forget(tk_fs *fs, fuse_ino_t nodeid, uint64_t n);
/* After a rename/link: point the inode now named parent/name at that name. */
void tk_itab_fix_name(tk_fs *fs, tk_inode *parent, const char *name);
/* Policy path of ino (+ "/" name if name), relative to the guard point; malloc'd. */
char *tk_path(tk_fs *fs, tk_inode *ino, const char *name);
void tk_inode_set_name(tk_fs *fs, tk_inode *ino, tk_inode *parent, const char *name);
/* Borrow ino's O_PATH fd (from the cache, or reopened from its file handle): the fd,
 * or -errno (-ENOENT: the object no longer exists).  Every fd >= 0 must be given back
 * with tk_inode_put() once the syscalls using it are done; never close it. */
int tk_inode_fd(tk_fs *fs, tk_inode *ino);
void tk_inode_put(tk_fs *fs, tk_inode *ino);

/* Pin ino for internal use (a rekey): find or add the inode of the object fd (an
 * O_PATH fd, taken over) with stat st, one reference that no kernel lookup holds; NULL
 * with errno set on failure.  tk_itab_unpin drops it. */
tk_inode *tk_itab_pin(tk_fs *fs, int fd, const struct stat *st);
void tk_itab_unpin(tk_fs *fs, tk_inode *ino);
/* The file handle of the object fd names (malloc'd), NULL if handles are not used. */
struct file_handle *tk_handle_of(tk_fs *fs, int fd);
/* A rekey swapped ino's backing object (under ino->lock, write): point ino at the new
 * one -- its stat nst, an O_PATH fd on it (fd, taken over) and its handle (h, taken
 * over; NULL for a pinned inode) -- and remember the old one for a minute as retired, by
 * (dev, ino) and file handle: a lookup that opened it before the swap and adds it after
 * is refused (tk_itab_add: EAGAIN, the lookup opens the name again).  old_fd (an fd on
 * the old object) is taken over: closed, or, for a pinned inode (no handle to tell a
 * reused inode number by), kept with the entry so that the number is not reused. */
void tk_itab_repoint(tk_fs *fs, tk_inode *ino, int fd, const struct stat *nst,
                     struct file_handle *h, int old_fd);
/* Retired objects older than a minute: their fds closed (not under any lock). */
void tk_itab_retired_expire(tk_fs *fs, int all);
/* on: from just before a rekey's exchange until the repoint, the new object (stat
 * nst, file handle h or NULL) is ino's -- a lookup that opens the name in between gets
 * ino, not an inode of its own (two inodes, two locks and two TAKA states for one
 * file) -- and the shadow record names it as the alternate, so that a successor after
 * a kill between the exchange and the repoint takes the object the name holds.  off:
 * forget it; the shadow record names what ino names. */
void tk_itab_incoming(tk_fs *fs, tk_inode *ino, const struct stat *nst,
                      const struct file_handle *h, int on);

/* ---- fuse_rekey.c ---- live rekey (docs/guard-points.md, "Live rekey (data path)") */
void tk_rekey_init(tk_fs *fs);
void tk_rekey_fini(tk_fs *fs);
void tk_rekey_stop_all(tk_fs *fs);    /* unmount: running rekeys end, none starts */
void tk_rekey_handover_wait(tk_fs *fs);  /* handover: no swap is half done */
/* Under ino->lock (write), right after every change of the stored blocks or the size
 * while a rekey runs (ino->rk != NULL): the blocks of [off, off + len) and the old and
 * the new last block were rewritten -- those the rekey already copied are copied again
 * now ("mirrored"); a shrink below the copied part moves the copy back to the cut.
 * Never fails the caller: a mirror that fails makes the rekey "busy". */
void tk_rk_note(tk_inode *ino, uint64_t old_size, uint64_t off, uint64_t len,
                uint64_t new_size);
/* ... a raw-view change: the rekey gives up ("busy") and is tried again later. */
void tk_rk_busy(tk_inode *ino);
static inline void tk_rk_changed(tk_inode *ino, uint64_t old_size, uint64_t off,
                                 uint64_t len, uint64_t new_size) {
    if (ino->rk) tk_rk_note(ino, old_size, off, len, new_size);
}
static inline void tk_rk_raw(tk_inode *ino) {
    if (ino->rk) tk_rk_busy(ino);
}

/* ---- fuse_taka.c ---- (callers hold ino->lock: read for reads, write otherwise) */
int tk_taka_load(tk_fs *fs, tk_inode *ino, int fd);        /* wrlock */
int tk_taka_valid(tk_fs *fs, const tk_taka *t);            /* any lock */
void tk_taka_reset(tk_taka *t);                             /* wrlock */
int tk_taka_create(tk_fs *fs, tk_inode *ino, int fd);      /* wrlock; empty TAKA file */
/* a backing range worth reading ahead (POSIX_FADV_WILLNEED); len 0: none */
typedef struct tk_hint {
    uint64_t off, len;
} tk_hint;
void tk_hint_apply(tk_fs *fs, int fd, const tk_hint *hint);  /* fuse_split.c */
/* hint: given to the backing file while (or before) the blocks are read; may be NULL */
ssize_t tk_taka_read(tk_fs *fs, tk_taka *t, int fd, char *out, size_t len, uint64_t off,
                     uint64_t *bad_block, const tk_hint *hint);  /* rdlock */
int tk_taka_write(tk_fs *fs, tk_taka *t, int fd, const char *data, size_t len,
                  uint64_t off, uint64_t *bad_block);      /* wrlock */
int tk_taka_truncate(tk_fs *fs, tk_taka *t, int fd, uint64_t size,
                     uint64_t *bad_block);                 /* wrlock */
/* Truncate to 0 (O_TRUNC, or a size of 0): an empty file has no block bound to its header,
 * so one whose header names another version than its key's current one (or another key)
 * takes a new header -- new file id, the current version -- at once.  Under ino->lock. */
int tk_taka_truncate0(tk_fs *fs, tk_inode *ino, int fd, uint64_t *bad);
uint64_t tk_taka_stored_size(uint64_t plain, uint32_t bs);
/* A new file's state (not on disk): format fmtv (1 or 2), header with a fresh random
 * file id, key `name` at `version`, block size bs, size 0; per-file keys from the data
 * key. */
int tk_taka_init_new(tk_taka *t, const char *name, uint32_t version, const uint8_t key[32],
                     uint32_t bs, int fmtv);
/* Stored blocks first.. (len bytes) into out with the handle of each block's key
 * version (v2; v1: the one handle).  TK_OK, TK_ERR_AUTH (also: a v2 block version
 * outside the header's range), TK_ERR_SHORT_BLOCK, TK_ERR_CRYPTO, or TK_TAKA_NOKEY (a
 * block's version has no key here); *badrel = the failing block, relative. */
#define TK_TAKA_NOKEY (-100)
int tk_taka_decrypt(tk_fs *fs, tk_taka *t, const uint8_t *raw, size_t len, uint8_t *out,
                    uint64_t first, size_t *written, uint64_t *badrel);  /* any lock */
/* Seal plaintext blocks first.. under t's write version into out. */
int tk_taka_encrypt(const tk_taka *t, const uint8_t *plain, size_t len, uint8_t *out,
                    uint64_t first);
/* Write t's header with size t->size and the encryption count `encryptions`. */
int tk_taka_put_header(tk_taka *t, int fd, uint64_t encryptions);
/* Decrypt blocks first..last (all below size) into out; *outlen = plaintext bytes. */
int tk_taka_read_blocks(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t first,
                        uint64_t last, uint8_t *out, size_t *outlen,
                        uint64_t *bad_block);      /* rdlock */

/* ---- fuse_split.c ---- a large read decrypted in parts on several CPUs */
/* Pin the calling thread to cpu (best effort) and name it <prefix><cpu> (top -H, perf). */
void tk_thread_pin(int cpu, const char *prefix);  /* fuse_impl.c */
void tk_split_start(tk_fs *fs);
void tk_split_stop(tk_fs *fs);
/* tk_taka_read_blocks' contract and result, the range cut into parts for helpers */
int tk_split_read_blocks(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t first,
                         uint64_t last, uint8_t *out, size_t *outlen,
                         uint64_t *bad_block, const tk_hint *hint);  /* rdlock */

/* ---- fuse_ops.c ---- */
extern const struct fuse_lowlevel_ops tk_ops;

/* statx of an fd for fields that are not timestamps.  On a file system with
 * multigrain timestamps (ext4, xfs, btrfs, tmpfs since Linux 6.13) a stat that reports
 * ctime/mtime marks them as seen, and the file's next write then stores a fine-grained
 * time: the inode is dirtied by every write, and an fsync of the backing file writes
 * its inode block too (docs/guard-points.md, "Backing-file stats without timestamps").
 * The engine's own bookkeeping (size, mode, owner) asks for what it needs only. */
static inline int tk_statx_fd(int fd, unsigned mask, struct statx *stx) {
    return statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, mask, stx) < 0 ? -errno : 0;
}

#endif /* TAKAKRYPT_FUSE_INT_H */
