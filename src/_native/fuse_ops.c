/*
 * fuse_ops.c -- the low-level operations of a guard point.
 *
 * Every operation starts with tk_check() (fuse_impl.c) for the action of the policy
 * language; only forget, release, releasedir, init and destroy do not (they
 * release resources and must never fail).  There is no flush: libfuse answers ENOSYS
 * once and the kernel stops sending it (writes reach the backing file synchronously,
 * a close has nothing to flush; docs/guard-points.md).  Backing access is relative to O_PATH
 * inode fds (fuse_inode.c), BORROWED for the syscalls that use them (tk_inode_fd ..
 * tk_inode_put: the fds live in a bounded cache and are reopened from file handles);
 * plaintext I/O is fuse_taka.c under the inode's rwlock.
 *
 * Kernel caching (docs/guard-points.md): a regular file's entry is not cached (every
 * path walk asks us, so every caller is routed to the node of its own view and sees
 * its own sizes) unless the policy grants no raw view at all (TK_HINT_PLAIN_ONLY);
 * directory entries and attributes, and a file's attributes for a caller permitted
 * getattr, are kept for cfg.meta_timeout.  Plaintext opens use the
 * page cache (mmap, including shared writable, works; kept across opens unless the raw
 * view changed the file), raw opens use FOPEN_DIRECT_IO.  Locks (flock, fcntl) are
 * left to the kernel.
 */
#include "fuse_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fuse.h>  /* fuse_write_in, FUSE_WRITE_KILL_SUIDGID (ABI 7.33) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

void tk_fs_init_done(tk_fs *fs);

#define FS(req) ((tk_fs *)fuse_req_userdata(req))
#define PROCPATH(buf, fd) snprintf((buf), sizeof(buf), "/proc/self/fd/%d", (fd))

static void reply_rc(fuse_req_t req, int rc) {
    if (rc == -EBADMSG || rc == -EKEYREJECTED || rc == -ENOKEY) rc = -EIO;
    fuse_reply_err(req, rc < 0 ? -rc : rc);
}

/* ---- views -------------------------------------------------------------------------- */

/* Which node a caller gets for a regular file: the view of the first permitted of
 * read, write, getattr (never denies by itself: the operations on the node do).
 * *attr_ok: whether the caller may see the node's attributes (getattr permitted), which
 * lets the kernel keep them for meta_timeout. */
static int choose_view(tk_fs *fs, fuse_req_t req, tk_inode *parent, const char *name,
                       int *attr_ok) {
    static const tk_action probes[] = {TK_ACT_READ, TK_ACT_WRITE, TK_ACT_GETATTR};
    tk_ident id;
    tk_decision d;
    *attr_ok = 0;
    /* A transient failure to identify the caller or to get a decision must not route
     * it to the raw node: try again (briefly) before giving up.  Giving up is still
     * safe: grants() refuses the raw node to a caller whose key applies, so the worst
     * outcome of a failure here is EACCES, never ciphertext to an authorised process. */
    int got = -1;
    for (int attempt = 0; attempt < 3 && got != 0; attempt++) {
        if (attempt) usleep(500);
        got = tk_ident_for(fs, req, &id);
    }
    if (got) return TK_VIEW_RAW;
    char *path = tk_path(fs, parent, name);
    if (!path) return TK_VIEW_RAW;
    int view = -1;
    for (int round = 0; round < 2 && view < 0; round++) {
        if (round) usleep(1000);
        for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
            if (tk_check_path(fs, &id, path, probes[i], TK_CHK_PROBE, &d) == 0) {
                view = (d.effects & TK_FX_APPLY_KEY) ? TK_VIEW_PLAIN : TK_VIEW_RAW;
                *attr_ok = probes[i] == TK_ACT_GETATTR ||
                           (fs->cfg.meta_timeout > 0 &&
                            tk_check_path(fs, &id, path, TK_ACT_GETATTR, TK_CHK_PROBE, &d) == 0);
                break;
            }
        }
    }
    free(path);
    return view < 0 ? TK_VIEW_RAW : view;
}

static unsigned hints(tk_fs *fs) {
    return (unsigned)__atomic_load_n(&fs->st.policy_hints, __ATOMIC_ACQUIRE);
}

/* How long the kernel may keep ino's attributes (fuse_impl.h: meta_timeout): a regular
 * file's only when this caller may see them (getattr_ok) and no other caller can reach
 * the node without a lookup of ours, or when everyone may (TK_HINT_GETATTR_ALL). */
static double attr_ttl(tk_fs *fs, mode_t type, int getattr_ok) {
    if (!S_ISREG(type)) return fs->cfg.meta_timeout;
    unsigned h = hints(fs);
    if (h & TK_HINT_PLAIN_ONLY)  /* entries kept: a denied caller would not ask us */
        return (h & TK_HINT_GETATTR_ALL) ? fs->cfg.meta_timeout : 0.0;
    return getattr_ok ? fs->cfg.meta_timeout : 0.0;
}

/* How long the kernel may keep an entry: a regular file's only if every permitted
 * caller gets the same (plaintext) node, else each walk must reach choose_view. */
static double entry_ttl(tk_fs *fs, mode_t type) {
    if (S_ISREG(type) && !(hints(fs) & TK_HINT_PLAIN_ONLY)) return 0.0;
    return fs->cfg.meta_timeout;
}

/* Whether this caller is permitted getattr on ino (or parent/name): a probe, no audit. */
static int may_getattr(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *name) {
    return fs->cfg.meta_timeout > 0 &&
           tk_check(fs, req, ino, name, TK_ACT_GETATTR, TK_CHK_PROBE, NULL) == 0;
}

/* A decision grants a view if it permits and matches it: apply_key for the plaintext
 * node, and NOT apply_key for the raw node.  A caller whose key applies never gets the
 * stored bytes, even if a race routed it to the raw node: it would read ciphertext, or
 * worse, write plaintext straight into the backing store.  Fail closed instead. */
static int grants(const tk_decision *d, int view) {
    int applies = (d->effects & TK_FX_APPLY_KEY) != 0;
    return view == TK_VIEW_RAW ? !applies : applies;
}

/* Check `act` on ino (or on `name` in directory ino) for this caller and require the
 * view of the (regular file's) node. */
static int check_view_at(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *name,
                         int view, tk_action act) {
    tk_decision d;
    int rc = tk_check(fs, req, ino, name, act, 0, &d);
    if (rc == 0 && (name || S_ISREG(ino->type)) && !grants(&d, view)) {
        tk_ident id;
        tk_ident_get(fs, req, &id);
        char *path = tk_path(fs, ino, name);
        tk_audit_decision(fs, &id, path, tk_action_name(act), &d, 0,
                          "view mismatch: the caller's decision does not match this node's "
                          "view");
        free(path);
        TK_INC(fs, denied, 1);
        rc = -EACCES;
    }
    return rc;
}

static int check_view(tk_fs *fs, fuse_req_t req, tk_inode *ino, int view, tk_action act) {
    return check_view_at(fs, req, ino, NULL, view, act);
}

/* A real fd on ino's backing object (open(2) of /proc/self/fd/N of its O_PATH fd):
 * the fd, or -errno.  The caller closes it. */
static int reopen(tk_fs *fs, tk_inode *ino, int flags) {
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) return pfd;
    int fd;
    if (S_ISDIR(ino->type)) {  /* a directory's "." needs no walk through /proc */
        fd = openat(pfd, ".", flags);
    } else {
        char p[64];
        PROCPATH(p, pfd);
        fd = open(p, flags);
    }
    int rc = fd < 0 ? -errno : fd;
    tk_inode_put(fs, ino);
    return rc;
}

/* Make sure ino's TAKA state is loaded; called with the write lock held. */
static int ensure_loaded(tk_fs *fs, fuse_req_t req, tk_inode *ino, int fd) {
    if (tk_taka_valid(fs, &ino->taka)) return 0;
    int own = -1;
    if (fd < 0) {
        fd = own = reopen(fs, ino, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return fd;
    }
    int rc = tk_taka_load(fs, ino, fd);
    if (own >= 0) close(own);
    if (rc == -EBADMSG && req)
        tk_audit_integrity(fs, req, ino, "read", "invalid or unauthenticated TAKA header");
    else if ((rc == -EKEYREJECTED || rc == -ENOKEY) && req)
        tk_audit_integrity(fs, req, ino, "read", "key of the file header unavailable");
    return rc;
}

static void integrity_fail(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *act,
                           uint64_t bad) {
    char d[96];
    snprintf(d, sizeof d, "block %llu failed authentication", (unsigned long long)bad);
    tk_audit_integrity(fs, req, ino, act, d);
}

/* -EBADMSG or -ENOKEY (a TAKA v2 block whose key version is unavailable) from the data
 * path: the audit event that goes with the EIO. */
static void data_fail(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *act, int rc,
                      uint64_t bad) {
    if (rc == -EBADMSG) {
        integrity_fail(fs, req, ino, act, bad);
    } else if (rc == -ENOKEY) {
        char d[96];
        snprintf(d, sizeof d, "the key version of block %llu is unavailable",
                 (unsigned long long)bad);
        tk_audit_integrity(fs, req, ino, act, d);
    }
}

/* ---- plaintext sizes without header reads ---------------------------------------------
 * A stat shows the plaintext size from the file's authenticated header.  Once a header
 * was verified, its size is remembered under the backing file's (dev, ino, stored
 * size, ctime) and the key epoch: any change to the file through us or anyone else
 * changes its ctime (and a size change its stored size), so a stale entry never
 * matches.  This spares the header read (a disk read after the kernel dropped its
 * caches) for files the kernel forgot; opening a file always verifies the header.
 * Set-associative, least recently used out: a direct-mapped table of as many entries
 * lost many of a 56,000-file tree's sizes to collisions, and the cold `ls -lR` after
 * its untar read 24,284 headers from disk (benchmarks/metadata.sh, header_loads). */
static tk_szent *szc_set(tk_fs *fs, const struct stat *st) {
    uint64_t h = ((uint64_t)st->st_ino * 0x9E3779B97F4A7C15ULL) ^ (uint64_t)st->st_dev;
    return &fs->szc[((h >> 17) % TK_SZC_SETS) * TK_SZC_WAYS];
}

/* Move way w of set to the front (most recently used), shifting the ones before it. */
static void szc_front(tk_szent *set, int w) {
    tk_szent e = set[w];
    for (; w > 0; w--) set[w] = set[w - 1];
    set[0] = e;
}

static uint64_t ctime_ns(const struct stat *st) {
    return (uint64_t)st->st_ctim.tv_sec * 1000000000ULL + (uint64_t)st->st_ctim.tv_nsec;
}

static int szc_get(tk_fs *fs, const struct stat *st, uint64_t *plain) {
    uint64_t epoch = __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&fs->szc_mu);
    tk_szent *set = szc_set(fs, st);
    int hit = 0;
    for (int w = 0; w < TK_SZC_WAYS; w++) {
        const tk_szent *e = &set[w];
        if (e->ino != (uint64_t)st->st_ino || e->dev != (uint64_t)st->st_dev || e->ino == 0)
            continue;
        hit = e->stored == (uint64_t)st->st_size && e->ctime_ns == ctime_ns(st) &&
              e->epoch == epoch;
        if (hit) {
            *plain = e->plain;
            szc_front(set, w);
        }
        break;  /* one entry per file */
    }
    pthread_mutex_unlock(&fs->szc_mu);
    return hit;
}

static void szc_put(tk_fs *fs, const struct stat *st, uint64_t plain, uint64_t epoch) {
    pthread_mutex_lock(&fs->szc_mu);
    tk_szent *set = szc_set(fs, st);
    int w = 0;  /* this file's entry, else the least recently used */
    while (w < TK_SZC_WAYS - 1 &&
           !(set[w].ino == (uint64_t)st->st_ino && set[w].dev == (uint64_t)st->st_dev))
        w++;
    szc_front(set, w);
    tk_szent *e = &set[0];
    e->dev = (uint64_t)st->st_dev;
    e->ino = (uint64_t)st->st_ino;
    e->stored = (uint64_t)st->st_size;
    e->ctime_ns = ctime_ns(st);
    e->epoch = epoch;
    e->plain = plain;
    pthread_mutex_unlock(&fs->szc_mu);
}

/* stat of ino as seen through `view` (plaintext size from the header). */
static int view_stat(tk_fs *fs, tk_inode *ino, int view, struct stat *st) {
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) return pfd;
    int r = fstatat(pfd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
    tk_inode_put(fs, ino);
    if (r) return r;
    if (view != TK_VIEW_PLAIN || !S_ISREG(st->st_mode)) return 0;
    struct stat raw = *st;
    uint64_t plain = 0, epoch = 0;
    pthread_rwlock_rdlock(&ino->lock);
    int ok = tk_taka_valid(fs, &ino->taka);
    if (ok) {
        plain = ino->taka.size;
        epoch = ino->taka.epoch;
    }
    pthread_rwlock_unlock(&ino->lock);
    if (!ok && szc_get(fs, &raw, &plain)) {
        TK_INC(fs, size_cache_hits, 1);
        st->st_size = (off_t)plain;
        return 0;
    }
    if (!ok) {
        pthread_rwlock_wrlock(&ino->lock);
        /* an invalid file keeps its stored size here: opening it fails with EIO */
        ok = ensure_loaded(fs, NULL, ino, -1) == 0;
        if (ok) {
            plain = ino->taka.size;
            epoch = ino->taka.epoch;
        }
        pthread_rwlock_unlock(&ino->lock);
    }
    if (ok) {
        st->st_size = (off_t)plain;
        szc_put(fs, &raw, plain, epoch);
    }
    return 0;
}

/* Tests only (tests/test_fuse_rekey.py): microseconds a lookup waits between opening
 * the name and adding its inode, to widen the window in which a rekey's swap meets it.
 * Read once; 0 unless TAKAKRYPT_TEST_LOOKUP_DELAY_US is set. */
static long lookup_delay_us = -1;

static void test_lookup_delay(void) {
    long d = __atomic_load_n(&lookup_delay_us, __ATOMIC_RELAXED);
    if (d < 0) {
        const char *e = getenv("TAKAKRYPT_TEST_LOOKUP_DELAY_US");
        d = e ? strtol(e, NULL, 10) : 0;
        if (d < 0 || d > 1000000) d = 0;
        __atomic_store_n(&lookup_delay_us, d, __ATOMIC_RELAXED);
    }
    if (d) usleep((useconds_t)d);
}

/* Entry for parent/name (pfd: parent's borrowed fd), one kernel lookup added to the
 * node of `view`; view < 0: routed by choose_view (regular files).  Directories,
 * symlinks and special files have the plaintext node only. */
static int make_entry_ex(tk_fs *fs, fuse_req_t req, tk_inode *parent, int pfd,
                         const char *name, int view, int fresh, struct fuse_entry_param *e,
                         tk_inode **out) {
    memset(e, 0, sizeof *e);
    int tries = 0;
again:;
    int fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    int attr_ok = 0;
    if (!S_ISREG(st.st_mode) || (view < 0 && (hints(fs) & TK_HINT_PLAIN_ONLY)))
        view = TK_VIEW_PLAIN;  /* the only node a permitted caller can be given */
    else if (view < 0) view = choose_view(fs, req, parent, name, &attr_ok);
    else if (req && !(hints(fs) & TK_HINT_PLAIN_ONLY)) attr_ok = may_getattr(fs, req, parent, name);
    if (S_ISREG(st.st_mode)) test_lookup_delay();
    tk_inode *ino = tk_itab_add(fs, parent, name, fd, &st, view);  /* takes fd */
    if (!ino && errno == EAGAIN && ++tries < 5) goto again;  /* a rekey swapped it */
    if (!ino) return errno == EAGAIN ? -EAGAIN : -ENOMEM;
    /* fresh: a file we just created, still without its header; the caller writes the
     * header and then fills e->attr (no pointless header read of an empty file) */
    int rc = fresh ? (e->attr = st, 0) : view_stat(fs, ino, view, &e->attr);
    if (rc) {
        tk_itab_forget(fs, tk_nodeid(fs, ino, view), 1);
        return rc;
    }
    e->ino = tk_nodeid(fs, ino, view);
    e->generation = 0;
    e->attr_timeout = attr_ttl(fs, st.st_mode, attr_ok);
    e->entry_timeout = entry_ttl(fs, st.st_mode);
    if (out) *out = ino;
    return 0;
}

static int make_entry(tk_fs *fs, fuse_req_t req, tk_inode *parent, int pfd, const char *name,
                      int view, struct fuse_entry_param *e, tk_inode **out) {
    return make_entry_ex(fs, req, parent, pfd, name, view, 0, e, out);
}

static int lookup_view(tk_fs *fs, fuse_req_t req, tk_inode *parent, const char *name,
                       struct fuse_entry_param *e) {
    int pfd = tk_inode_fd(fs, parent);
    if (pfd < 0) return pfd;
    int rc = make_entry(fs, req, parent, pfd, name, -1, e, NULL);
    tk_inode_put(fs, parent);
    return rc;
}

/* Reply with an entry; if the kernel did not take it (interrupted), drop the lookup
 * it would have forgotten. */
static void reply_entry(tk_fs *fs, fuse_req_t req, const struct fuse_entry_param *e) {
    if (fuse_reply_entry(req, e) != 0) tk_itab_forget(fs, e->ino, 1);
}

/* ---- creating as the caller ----------------------------------------------------------
 * The daemon is root.  Objects are created with the caller's fsuid/fsgid and groups on
 * this thread only (raw syscalls: glibc's setgroups would change every thread), so
 * ownership, setgid directories and quotas are right from the first instant. */
typedef struct {
    int active;
} tk_creds;

static int become_caller(tk_fs *fs, fuse_req_t req, tk_creds *c) {
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    gid_t groups[256];
    c->active = 0;
    if (ctx->uid == 0 && ctx->gid == 0) return 0;
    int n = fuse_req_getgroups(req, 256, groups);
    if (n < 0 || n > 256) n = 0;
    if (syscall(SYS_setgroups, n, groups) < 0) return -errno;
    c->active = 1;
    syscall(SYS_setfsgid, ctx->gid);
    syscall(SYS_setfsuid, ctx->uid);
    if ((uid_t)syscall(SYS_setfsuid, -1) != ctx->uid ||
        (gid_t)syscall(SYS_setfsgid, -1) != ctx->gid) {
        (void)fs;
        return -EPERM;
    }
    return 0;
}

static void become_root(tk_fs *fs, tk_creds *c) {
    if (!c->active) return;
    syscall(SYS_setfsuid, geteuid());
    syscall(SYS_setfsgid, getegid());
    syscall(SYS_setgroups, fs->nroot_groups, fs->root_groups);
    c->active = 0;
}

/* ---- operations ----------------------------------------------------------------------- */

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    tk_fs *fs = userdata;
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;  /* we own sizes and RMW */
    /* Our own writes keep the page cache right: an mtime they changed, seen in the
     * next GETATTR, must not drop every cached page of the file (auto_inval_data
     * does; PostgreSQL's lseek after each write made that one READ per transaction).
     * Raw-view changes drop the plaintext pages explicitly (mark_plain_stale). */
    conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;
    if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    /* Write-only plaintext opens bypass the page cache (see direct_for) where the
     * kernel drops cached pages of a range before a direct write to it: Linux 6.6,
     * protocol 7.39.  TAKAKRYPT_WRONLY_DIRECT=0 turns it off (A/B benchmarks). */
    const char *wd = getenv("TAKAKRYPT_WRONLY_DIRECT");
    __atomic_store_n(&fs->st.wronly_direct,
                     conn->proto_major == 7 && conn->proto_minor >= 39 && !(wd && !strcmp(wd, "0")),
                     __ATOMIC_RELAXED);
    tk_fs_init_done(fs);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    tk_fs *fs = FS(req);
    struct fuse_entry_param e;
    if (parent == FUSE_ROOT_ID && strncmp(name, TK_PARK_PREFIX, strlen(TK_PARK_PREFIX)) == 0) {
        reply_rc(req, -ENOENT);  /* a handover parking ring entries (fuse_uring.c) */
        return;
    }
    if (tk_hidden_name(name)) {  /* a rekey's temporary (fuse_rekey.c): never seen */
        reply_rc(req, -ENOENT);
        return;
    }
    int rc = lookup_view(fs, req, tk_node_inode(fs, parent, NULL), name, &e);
    if (rc) reply_rc(req, rc);
    else reply_entry(fs, req, &e);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) {
    TK_INC(FS(req), forgets, 1);
    TK_INC(FS(req), forget_messages, 1);
    tk_itab_forget(FS(req), ino, n);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *f) {
    TK_INC(FS(req), forgets, count);
    TK_INC(FS(req), forget_messages, 1);
    for (size_t i = 0; i < count; i++) tk_itab_forget(FS(req), f[i].ino, f[i].nlookup);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t nodeid, struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    int view;
    tk_inode *ino = tk_node_inode(fs, nodeid, &view);
    /* A GETATTR that carries a handle is the kernel refreshing the size for that
     * handle's I/O (a read up to the cached end, lseek SEEK_END, an O_APPEND write):
     * part of the capability checked at open, not asked again.  fstat(2) and stat(2)
     * carry none and are checked as `getattr` for the caller. */
    int rc = fi ? 0 : tk_check(fs, req, ino, NULL, TK_ACT_GETATTR, 0, NULL);
    struct stat st;
    if (rc == 0) rc = view_stat(fs, ino, view, &st);
    if (rc) reply_rc(req, rc);
    else fuse_reply_attr(req, &st, attr_ttl(fs, ino->type, 1));
}

/* ---- the kernel's page cache of the plaintext node -----------------------------------
 * Kept across opens (keep_cache) unless the stored bytes changed other than through
 * that node since the last plaintext open: raw-view writes, truncates and fallocates
 * mark the inode (plaintext writes go through the node's page cache and keep it
 * right).  The backing store has no other writers (in place it is hidden under the
 * mount; a separate backing directory must not be written directly). */
static void mark_plain_stale(tk_fs *fs, tk_inode *ino) {
    __atomic_store_n(&ino->plain_stale, 1, __ATOMIC_RELEASE);
    /* a plaintext node the kernel knows may have pages cached (held open, or kept):
     * drop them now, from the notifier thread */
    if (__atomic_load_n(&ino->node[TK_VIEW_PLAIN].nlookup, __ATOMIC_RELAXED))
        tk_inval_data_async(fs, tk_nodeid(fs, ino, TK_VIEW_PLAIN));
}

static int keep_cache(tk_inode *ino, int view) {
    if (view != TK_VIEW_PLAIN) return 0;  /* raw opens are direct I/O */
    return !__atomic_exchange_n(&ino->plain_stale, 0, __ATOMIC_ACQ_REL);
}

/* ---- write-behind ----------------------------------------------------------------------
 * A sequential stream of writes is handed to the kernel's writeback every 8 MiB of
 * stored bytes (sync_file_range WRITE: starts the I/O, waits for nothing), so a final
 * fsync finds most of it already on disk, as it would for a native file whose writes
 * were not doubled through the FUSE page cache.  Random writes are left alone. */
#define TK_WRITE_BEHIND (8u << 20)

static void write_behind(tk_fh *fh, uint64_t s0, uint64_t s1) {
    uint64_t start = __atomic_load_n(&fh->wb_start, __ATOMIC_RELAXED);
    uint64_t end = __atomic_load_n(&fh->wb_end, __ATOMIC_RELAXED);
    if (s0 > end || s1 < end || s0 < start) start = s0;  /* not a continuation: restart */
    end = s1;
    if (end - start >= TK_WRITE_BEHIND) {
        (void)sync_file_range(fh->fd, (off64_t)start, (off64_t)(end - start),
                              SYNC_FILE_RANGE_WRITE);
        start = end;
    }
    __atomic_store_n(&fh->wb_start, start, __ATOMIC_RELAXED);
    __atomic_store_n(&fh->wb_end, end, __ATOMIC_RELAXED);
}

/* A change of size or contents through one view changes what the other view's node
 * reports: drop the kernel's cached attributes of that node if the kernel knows it
 * (offset -1: attributes only, no page-cache work, safe from a request handler). */
static void inval_other_view(tk_fs *fs, tk_inode *ino, int view) {
    if (fs->cfg.meta_timeout <= 0 || !S_ISREG(ino->type)) return;
    int other = view == TK_VIEW_PLAIN ? TK_VIEW_RAW : TK_VIEW_PLAIN;
    if (__atomic_load_n(&ino->node[other].nlookup, __ATOMIC_RELAXED) == 0) return;
    fuse_lowlevel_notify_inval_inode(fs->se, tk_nodeid(fs, ino, other), -1, 0);
}

/* ---- setuid/setgid on write, truncate, chown (FUSE_HANDLE_KILLPRIV_V2) ----------------
 * With KILLPRIV_V2 negotiated (fuse_uring.c patches it into the INIT reply) the kernel
 * leaves clearing the set-id bits to us and, in return, stops asking for
 * security.capability before every write (one round trip per write(2) otherwise).
 * Rules, as the VFS applies them: a write or truncate by a caller without CAP_FSETID,
 * and every chown, clears S_ISUID, and S_ISGID if the group may execute or the caller
 * is not in the file's group.  The kernel
 * says which writes and truncates need it; opens with O_TRUNC are judged by fsuid 0
 * (libfuse 3.14 hides the open flag).  security.capability itself is dropped by the
 * backing file system when we write, truncate or chown the backing file. */
static int caller_in_group(fuse_req_t req, gid_t g) {
    const struct fuse_ctx *c = fuse_req_ctx(req);
    if (c->uid == 0 || c->gid == g) return 1;  /* fsuid 0: CAP_FSETID */
    gid_t list[64];
    int n = fuse_req_getgroups(req, 64, list);
    for (int i = 0; i < n && i < 64; i++)
        if (list[i] == g) return 1;
    return 0;
}

/* chmod through an fd: an open file's (procpath NULL) with fchmod; a node's O_PATH fd
 * with fchmodat2(fd, "", AT_EMPTY_PATH) (Linux 6.6) rather than
 * chmod("/proc/self/fd/N"), which walks procfs and follows the magic link; that path
 * (procpath) where the kernel lacks fchmodat2.  0 or -errno. */
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
static int no_fchmodat2;

static int chmod_node(int fd, const char *procpath, mode_t mode) {
    if (!procpath) return fchmod(fd, mode) < 0 ? -errno : 0;
    if (!__atomic_load_n(&no_fchmodat2, __ATOMIC_RELAXED)) {
        if (syscall(SYS_fchmodat2, fd, "", mode, AT_EMPTY_PATH) == 0) return 0;
        if (errno != ENOSYS && errno != EINVAL) return -errno;
        __atomic_store_n(&no_fchmodat2, 1, __ATOMIC_RELAXED);
    }
    return chmod(procpath, mode) < 0 ? -errno : 0;
}

/* The mode without the set-id bits this caller's write, truncate or chown clears. */
static int suidgid_mode(fuse_req_t req, int fd, mode_t *m, mode_t *n) {
    struct statx st;  /* no timestamps asked: see tk_statx_fd */
    if (tk_statx_fd(fd, STATX_TYPE | STATX_MODE | STATX_GID, &st) < 0 ||
        !S_ISREG(st.stx_mode))
        return 0;
    *m = st.stx_mode & 07777;
    *n = *m & ~(mode_t)S_ISUID;
    /* setgid goes if the group may execute, or if the caller is not in the group */
    if ((*m & S_ISGID) && ((*m & S_IXGRP) || !caller_in_group(req, st.stx_gid)))
        *n &= ~(mode_t)S_ISGID;
    return *n != *m;
}

/* fd: an open backing fd of ino (a handle's), or -1 for ino's own O_PATH fd.  The
 * common case (no set-id bit) is one statx without a lock; a chmod is made under the
 * file's lock, so that a rekey copying the mode (under the write lock) sees it. */
static void kill_suidgid(tk_fs *fs, fuse_req_t req, tk_inode *ino, int fd) {
    mode_t m, n;
    int pfd = fd >= 0 ? fd : tk_inode_fd(fs, ino);
    if (pfd < 0) return;
    int need = suidgid_mode(req, pfd, &m, &n);
    if (fd < 0) tk_inode_put(fs, ino);
    if (!need) return;
    pthread_rwlock_rdlock(&ino->lock);
    char p[64];
    pfd = fd >= 0 ? fd : tk_inode_fd(fs, ino);
    if (pfd >= 0) {
        if (fd < 0) PROCPATH(p, pfd);
        if (suidgid_mode(req, pfd, &m, &n) && chmod_node(pfd, fd < 0 ? p : NULL, n) == 0)
            TK_INC(fs, suid_kills, 1);
        if (fd < 0) tk_inode_put(fs, ino);
    }
    pthread_rwlock_unlock(&ino->lock);
}

/* Did the kernel ask us to clear the set-id bits with this WRITE?  The request's
 * fuse_write_in sits right before the payload libfuse hands us (classic channel and
 * our io_uring rebuild alike); if it does not look like ours, assume yes unless the
 * caller is root. */
static int write_kills_suidgid(fuse_req_t req, const char *buf, size_t size, off_t off,
                               const struct fuse_file_info *fi) {
    struct fuse_write_in wi;
    memcpy(&wi, buf - sizeof wi, sizeof wi);
    if (wi.size == size && wi.offset == (uint64_t)off && wi.fh == fi->fh)
        return (wi.write_flags & FUSE_WRITE_KILL_SUIDGID) != 0;
    return fuse_req_ctx(req)->uid != 0;
}

static int truncate_node(tk_fs *fs, fuse_req_t req, tk_inode *ino, int view, tk_fh *fh,
                         uint64_t size) {
    int fd = fh ? fh->fd : -1, own = -1, rc = 0;
    uint64_t gen = __atomic_load_n(&ino->rk_gen, __ATOMIC_ACQUIRE);
    if (fd < 0) {
        fd = own = reopen(fs, ino, O_RDWR | O_CLOEXEC);
        if (fd < 0) return fd;
    }
    pthread_rwlock_wrlock(&ino->lock);
    if (own >= 0 && __atomic_load_n(&ino->rk_gen, __ATOMIC_ACQUIRE) != gen) {
        close(own);  /* a rekey swapped the file meanwhile: this fd names the old one */
        fd = own = reopen(fs, ino, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            pthread_rwlock_unlock(&ino->lock);
            return fd;
        }
    }
    if (view == TK_VIEW_PLAIN) {
        uint64_t bad = 0;
        rc = ensure_loaded(fs, req, ino, fd);
        if (rc == 0) {
            uint64_t old = ino->taka.size;
            rc = size ? tk_taka_truncate(fs, &ino->taka, fd, size, &bad)
                      : tk_taka_truncate0(fs, ino, fd, &bad);
            /* a failure may have changed part of it: what was asked counts too */
            tk_rk_changed(ino, old, 0, 0, ino->taka.size);
            if (size != ino->taka.size) tk_rk_changed(ino, old, 0, 0, size);
        }
        data_fail(fs, req, ino, "truncate", rc, bad);
    } else {
        if (ftruncate(fd, (off_t)size) < 0) rc = -errno;
        tk_rk_raw(ino);
        tk_taka_reset(&ino->taka);  /* the raw bytes changed under any cached header */
        mark_plain_stale(fs, ino);
    }
    pthread_rwlock_unlock(&ino->lock);
    if (own >= 0) close(own);
    if (rc == 0) inval_other_view(fs, ino, view);
    return rc;
}

static void op_setattr(fuse_req_t req, fuse_ino_t nodeid, struct stat *attr, int to_set,
                       struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    int view, rc = 0;
    tk_inode *ino = tk_node_inode(fs, nodeid, &view);
    tk_fh *fh = fi ? fh_of(fs, fi) : NULL;
    char p[64];
    if (to_set & FUSE_SET_ATTR_SIZE)
        rc = check_view(fs, req, ino, view, TK_ACT_TRUNCATE);
    /* the set-id clearing that comes with a truncate is part of the truncate */
    if (rc == 0 && (to_set & ~(FUSE_SET_ATTR_SIZE | FATTR_KILL_SUIDGID)))
        rc = tk_check(fs, req, ino, NULL, TK_ACT_SETATTR, 0, NULL);
    /* Mode, owner and times change under the file's lock, with its fd borrowed inside
     * it: a rekey copies them to the new file and swaps it in under the write lock, so
     * a change lands either before the copy or on the new file. */
    int pfd = -1;
    if (rc == 0 && (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))) {
        pthread_rwlock_rdlock(&ino->lock);
        pfd = tk_inode_fd(fs, ino);
        if (pfd < 0) rc = pfd;
        else PROCPATH(p, pfd);
        if (rc == 0 && (to_set & FUSE_SET_ATTR_MODE)) {
            if (S_ISLNK(ino->type)) rc = -EOPNOTSUPP;
            else rc = fh ? chmod_node(fh->fd, NULL, attr->st_mode)
                         : chmod_node(pfd, p, attr->st_mode);
        }
        if (rc == 0 && (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))) {
            uid_t u = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
            gid_t g = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
            if (fchownat(pfd, "", u, g, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) rc = -errno;
        }
        if (pfd >= 0) tk_inode_put(fs, ino);
        pthread_rwlock_unlock(&ino->lock);
    }
    if (rc == 0 && (to_set & FUSE_SET_ATTR_SIZE)) {
        if (!S_ISREG(ino->type)) rc = -EINVAL;
        else rc = truncate_node(fs, req, ino, view, fh, (uint64_t)attr->st_size);
    }
    if (rc == 0 && (to_set & FATTR_KILL_SUIDGID) && S_ISREG(ino->type))
        kill_suidgid(fs, req, ino, -1);  /* after a chown, which may reset the mode */
    if (rc == 0 && (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME))) {
        struct timespec tv[2];
        tv[0].tv_sec = tv[1].tv_sec = 0;
        tv[0].tv_nsec = tv[1].tv_nsec = UTIME_OMIT;
        if (to_set & FUSE_SET_ATTR_ATIME_NOW) tv[0].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_ATIME) tv[0] = attr->st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) tv[1].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_MTIME) tv[1] = attr->st_mtim;
        pthread_rwlock_rdlock(&ino->lock);
        pfd = tk_inode_fd(fs, ino);
        if (pfd < 0) {
            rc = pfd;
        } else {
            PROCPATH(p, pfd);
            /* through the O_PATH fd itself (AT_EMPTY_PATH, as for symlinks), not a
             * procfs path; the path where the kernel refuses the flag for this type */
            int r = fh ? futimens(fh->fd, tv) : utimensat(pfd, "", tv, AT_EMPTY_PATH);
            if (r < 0 && errno == EINVAL && !fh && !S_ISLNK(ino->type))
                r = utimensat(AT_FDCWD, p, tv, 0);
            if (r < 0) rc = -errno;
            tk_inode_put(fs, ino);
        }
        pthread_rwlock_unlock(&ino->lock);
    }
    struct stat st;
    if (rc == 0) rc = view_stat(fs, ino, view, &st);
    if (rc) reply_rc(req, rc);
    else fuse_reply_attr(req, &st, attr_ttl(fs, ino->type, 1));
}

static void op_readlink(fuse_req_t req, fuse_ino_t nodeid) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_READ, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    char buf[PATH_MAX + 1];
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) { reply_rc(req, pfd); return; }
    ssize_t n = readlinkat(pfd, "", buf, sizeof buf);
    int e = errno;
    tk_inode_put(fs, ino);
    if (n < 0) { reply_rc(req, -e); return; }
    if (n >= (ssize_t)sizeof buf) { reply_rc(req, -ENAMETOOLONG); return; }
    buf[n] = 0;
    fuse_reply_readlink(req, buf);
}

/* Create a directory entry of any kind as the caller; then reply with its entry. */
static void make_node(fuse_req_t req, fuse_ino_t parent_id, const char *name, mode_t mode,
                      dev_t rdev, const char *link, tk_action act) {
    tk_fs *fs = FS(req);
    tk_inode *parent = tk_node_inode(fs, parent_id, NULL);
    tk_decision d;
    if (tk_hidden_name(name)) { reply_rc(req, -EPERM); return; }  /* the rekey's names */
    int rc = tk_check(fs, req, parent, name, act, 0, &d);
    if (rc) { reply_rc(req, rc); return; }
    int view = (d.effects & TK_FX_APPLY_KEY) ? TK_VIEW_PLAIN : TK_VIEW_RAW;
    int pfd = tk_inode_fd(fs, parent);
    if (pfd < 0) { reply_rc(req, pfd); return; }
    tk_creds c;
    rc = become_caller(fs, req, &c);
    if (rc == 0) {
        int r;
        if (link) r = symlinkat(link, pfd, name);
        else if (S_ISDIR(mode)) r = mkdirat(pfd, name, mode & 07777);
        else r = mknodat(pfd, name, mode, rdev);
        if (r < 0) rc = -errno;
    }
    become_root(fs, &c);
    struct fuse_entry_param e;
    tk_inode *ino = NULL;
    int ev = S_ISREG(mode) ? view : TK_VIEW_PLAIN;
    if (rc) {
        /* nothing made */
    } else if (S_ISREG(mode) && view == TK_VIEW_PLAIN) {
        /* a regular file made in the plaintext view is an empty TAKA file */
        int fd = openat(pfd, name, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) rc = -errno;
        if (rc == 0) rc = make_entry_ex(fs, req, parent, pfd, name, ev, 1, &e, &ino);
        if (rc == 0) {
            pthread_rwlock_wrlock(&ino->lock);
            rc = tk_taka_create(fs, ino, fd);
            pthread_rwlock_unlock(&ino->lock);
            if (rc == 0) rc = view_stat(fs, ino, ev, &e.attr);
            if (rc) tk_itab_forget(fs, e.ino, 1);
        }
        if (fd >= 0) close(fd);
        if (rc) unlinkat(pfd, name, 0);
    } else {
        rc = make_entry(fs, req, parent, pfd, name, ev, &e, NULL);
    }
    tk_inode_put(fs, parent);
    if (rc) reply_rc(req, rc);
    else reply_entry(fs, req, &e);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                     dev_t rdev) {
    make_node(req, parent, name, mode, rdev, NULL, TK_ACT_CREATE);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
    make_node(req, parent, name, S_IFDIR | mode, 0, NULL, TK_ACT_MKDIR);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) {
    make_node(req, parent, name, S_IFLNK | 0777, 0, link, TK_ACT_CREATE);
}

static void remove_entry(fuse_req_t req, fuse_ino_t parent_id, const char *name, int dir) {
    tk_fs *fs = FS(req);
    tk_inode *parent = tk_node_inode(fs, parent_id, NULL);
    int rc = tk_check(fs, req, parent, name, dir ? TK_ACT_RMDIR : TK_ACT_DELETE, 0, NULL);
    int pfd = rc ? -1 : tk_inode_fd(fs, parent);
    if (rc == 0 && pfd < 0) rc = pfd;
    if (rc == 0) {
        if (unlinkat(pfd, name, dir ? AT_REMOVEDIR : 0) < 0) rc = -errno;
        tk_inode_put(fs, parent);
    }
    reply_rc(req, rc);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
    remove_entry(req, parent, name, 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) {
    remove_entry(req, parent, name, 1);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent_id, const char *name,
                      fuse_ino_t newparent_id, const char *newname, unsigned int flags) {
    tk_fs *fs = FS(req);
    tk_inode *parent = tk_node_inode(fs, parent_id, NULL);
    tk_inode *newparent = tk_node_inode(fs, newparent_id, NULL);
    if (tk_hidden_name(name) || tk_hidden_name(newname)) {  /* the rekey's names */
        reply_rc(req, tk_hidden_name(name) ? -ENOENT : -EPERM);
        return;
    }
    /* both paths are checked; each check carries the destination as the protocol's
     * `target` (so a miss goes through the ring like any other) */
    char *dest = tk_path(fs, newparent, newname);
    int rc = dest ? tk_check_target(fs, req, parent, name, TK_ACT_RENAME, dest, NULL) : -ENOMEM;
    if (rc == 0) rc = tk_check_target(fs, req, newparent, newname, TK_ACT_RENAME, dest, NULL);
    free(dest);
    if (rc == 0 && (flags & ~(unsigned)(RENAME_NOREPLACE | RENAME_EXCHANGE))) rc = -EINVAL;
    if (rc == 0) {
        int pfd = tk_inode_fd(fs, parent);
        int npfd = pfd < 0 ? pfd : tk_inode_fd(fs, newparent);
        if (pfd < 0) rc = pfd;
        else if (npfd < 0) rc = npfd;
        else if (renameat2(pfd, name, npfd, newname, flags) < 0) rc = -errno;
        if (npfd >= 0) tk_inode_put(fs, newparent);
        if (pfd >= 0) tk_inode_put(fs, parent);
    }
    if (rc == 0) {
        tk_itab_fix_name(fs, newparent, newname);
        if (flags & RENAME_EXCHANGE) tk_itab_fix_name(fs, parent, name);
    }
    reply_rc(req, rc);
}

static void op_link(fuse_req_t req, fuse_ino_t nodeid, fuse_ino_t newparent_id,
                    const char *newname) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    tk_inode *newparent = tk_node_inode(fs, newparent_id, NULL);
    if (tk_hidden_name(newname)) { reply_rc(req, -EPERM); return; }  /* the rekey's names */
    char *dest = tk_path(fs, newparent, newname);
    int rc = dest ? tk_check_target(fs, req, ino, NULL, TK_ACT_LINK, dest, NULL) : -ENOMEM;
    if (rc == 0) rc = tk_check_target(fs, req, newparent, newname, TK_ACT_LINK, dest, NULL);
    free(dest);
    if (rc == 0) {
        /* under the file's lock: a rekey's swap (under the write lock) never leaves the
         * new name on the replaced object, and sees the link count it makes */
        pthread_rwlock_rdlock(&ino->lock);
        int fd = tk_inode_fd(fs, ino);
        int npfd = fd < 0 ? fd : tk_inode_fd(fs, newparent);
        char p[64];
        if (fd >= 0) PROCPATH(p, fd);
        if (fd < 0) rc = fd;
        else if (npfd < 0) rc = npfd;
        else if (linkat(AT_FDCWD, p, npfd, newname, AT_SYMLINK_FOLLOW) < 0) rc = -errno;
        if (npfd >= 0) tk_inode_put(fs, newparent);
        if (fd >= 0) tk_inode_put(fs, ino);
        pthread_rwlock_unlock(&ino->lock);
    }
    struct fuse_entry_param e;
    if (rc == 0) rc = lookup_view(fs, req, newparent, newname, &e);
    if (rc) reply_rc(req, rc);
    else reply_entry(fs, req, &e);
}

/* ---- files ---------------------------------------------------------------------------- */

/* File handles are slots of fs->fhs (fi->fh = slot + 1): a successor process restores
 * them under the same numbers (fuse_handover.c). */
static void fh_forget(tk_fs *fs, void *p, uint32_t slot) {
    tk_sh_fh_gone(fs, slot);
    tk_slots_del(&fs->fhs, slot);
    free(p);
}

tk_fh *tk_fh_new(tk_fs *fs, int fd, int view, int flags, tk_inode *ino) {
    tk_fh *fh = calloc(1, sizeof *fh);
    if (!fh) return NULL;
    fh->kind = TK_FH_FILE;
    fh->fd = fd;
    fh->view = view;
    fh->append = (flags & O_APPEND) != 0;
    fh->writable = (flags & O_ACCMODE) != O_RDONLY;
    fh->ino = ino;
    int64_t slot = tk_slots_add(&fs->fhs, fh);
    if (slot < 0) {
        free(fh);
        return NULL;
    }
    fh->slot = (uint32_t)slot;
    tk_sh_fh(fs, fh->slot, TK_FH_FILE, ino->slot, view, fcntl(fd, F_GETFL), fh->append,
             fh->writable);
    return fh;
}

#define new_fh(fd, view, flags, ino) tk_fh_new(fs, fd, view, flags, ino)

int tk_fh_restore(tk_fs *fs, const tk_ho_fh *h) {
    tk_inode *ino = tk_slots_get(&fs->nodes, h->inode);
    if (!ino) return -ESTALE;
    int rc = 0;
    if (h->kind == TK_FH_DIR) return tk_dir_new(fs, ino, (uint64_t)h->slot + 1, &rc) ? 0 : rc;
    /* the predecessor's backing fd, opened again through the file handle (an open
     * file that was deleted meanwhile still opens: the predecessor holds it) */
    int keep = O_ACCMODE | O_APPEND | O_DIRECT | O_NOATIME | O_SYNC | O_DSYNC;
    int fd = reopen(fs, ino, (h->fdflags & keep) | O_CLOEXEC);
    if (fd < 0) return fd;
    tk_fh *fh = calloc(1, sizeof *fh);
    if (!fh) {
        close(fd);
        return -ENOMEM;
    }
    fh->kind = TK_FH_FILE;
    fh->fd = fd;
    fh->view = h->view;
    fh->append = h->append;
    fh->writable = h->writable;
    fh->ino = ino;
    fh->slot = h->slot;
    if ((rc = tk_slots_place(&fs->fhs, h->slot, fh)) != 0) {
        close(fd);
        free(fh);
    } else {
        tk_sh_fh(fs, fh->slot, TK_FH_FILE, ino->slot, fh->view, fcntl(fd, F_GETFL),
                 fh->append, fh->writable);
    }
    return rc;
}

/* Direct I/O for an open: always for the raw view (the page cache never mixes views);
 * for the plaintext view when the open is write-only.  A write-only handle can neither
 * read nor map the file, so the page cache gives its writes nothing but splits: the
 * kernel ends a write-through WRITE at every partial page it does not hold (a tar
 * record of 10 KiB at an unaligned offset became two or three requests, each with its
 * merge of a partial block), and copies every byte into pages no one may read again.
 * Direct, each write(2) is one WRITE; the kernel (6.6+) drops the range's cached
 * pages before it, so other openers re-read it from us. */
static int direct_for(tk_fs *fs, int view, int flags) {
    if (view == TK_VIEW_RAW) return 1;
    if ((flags & O_ACCMODE) != O_WRONLY ||
        !__atomic_load_n(&fs->st.wronly_direct, __ATOMIC_RELAXED))
        return 0;
    TK_INC(fs, direct_opens, 1);
    return 1;
}

static int raw_flags(int flags) {
    /* O_DIRECT would impose alignment on our buffers; O_NOFOLLOW/O_CREAT are ours */
    return (flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_NOFOLLOW | O_DIRECT)) | O_CLOEXEC;
}

/* Checks for an open with `flags` of ino (or of `name` in directory ino, a file being
 * created): read, write/append, truncate as requested.  The handle's reads and writes
 * are not asked again (see op_read). */
static int check_open_at(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *name,
                         int view, int flags) {
    int acc = flags & O_ACCMODE, rc = 0;
    if (acc != O_WRONLY) rc = check_view_at(fs, req, ino, name, view, TK_ACT_READ);
    if (rc == 0 && acc != O_RDONLY)
        rc = check_view_at(fs, req, ino, name, view,
                           (flags & O_APPEND) ? TK_ACT_APPEND : TK_ACT_WRITE);
    if (rc == 0 && (flags & O_TRUNC))
        rc = check_view_at(fs, req, ino, name, view, TK_ACT_TRUNCATE);
    return rc;
}

static int check_open(tk_fs *fs, fuse_req_t req, tk_inode *ino, int view, int flags) {
    return check_open_at(fs, req, ino, NULL, view, flags);
}

/* A handle closed: under the file's lock, so that a rekey (which points every open
 * handle of the file at the new file with dup3, under the write lock) never lands on a
 * descriptor number that was closed and given to something else. */
static void fh_drop(tk_fs *fs, tk_fh *fh) {
    tk_inode *ino = fh->ino;
    pthread_rwlock_rdlock(&ino->lock);
    close(fh->fd);
    fh_forget(fs, fh, fh->slot);
    pthread_rwlock_unlock(&ino->lock);
}

/* Open the backing file of ino for `view` and register the handle (*fhp); plaintext:
 * verify the header, O_TRUNC.  The handle is registered under the file's lock, with a
 * backing fd of the file's current object: a rekey swapping the file meanwhile (under
 * the write lock) either finds the handle and moves it or happened before the fd
 * (opened again then). */
static int open_backing(tk_fs *fs, fuse_req_t req, tk_inode *ino, int view, int flags,
                        tk_fh **fhp) {
    int acc = flags & O_ACCMODE, fd, rc = 0;
    int bflags = view == TK_VIEW_PLAIN  /* partial blocks need read-modify-write */
                     ? (acc == O_RDONLY && !(flags & O_TRUNC) ? O_RDONLY : O_RDWR) | O_CLOEXEC
                     : raw_flags(flags);
    uint64_t gen = __atomic_load_n(&ino->rk_gen, __ATOMIC_ACQUIRE);
    fd = reopen(fs, ino, bflags);
    if (fd < 0) return fd;
    pthread_rwlock_wrlock(&ino->lock);
    if (__atomic_load_n(&ino->rk_gen, __ATOMIC_ACQUIRE) != gen) {
        close(fd);  /* opened on the object a rekey has just replaced */
        fd = reopen(fs, ino, bflags);
        if (fd < 0) {
            pthread_rwlock_unlock(&ino->lock);
            return fd;
        }
    }
    if (view == TK_VIEW_PLAIN) {
        rc = ensure_loaded(fs, req, ino, fd);
        struct stat est;
        if (rc == -EBADMSG && acc != O_RDONLY && fstat(fd, &est) == 0 && est.st_size == 0) {
            /* an empty file, no header: created by a server killed before it wrote
             * the header (nothing to protect): it becomes the empty file it was to be */
            tk_taka_reset(&ino->taka);
            rc = tk_taka_create(fs, ino, fd);
        }
        uint64_t bad = 0, old = ino->taka.size;
        if (rc == 0 && (flags & O_TRUNC)) {
            rc = tk_taka_truncate0(fs, ino, fd, &bad);
            tk_rk_changed(ino, old, 0, 0, 0);
        }
    } else {
        if (acc != O_RDONLY || (flags & O_TRUNC)) tk_rk_raw(ino);  /* a raw writer */
        if (flags & O_TRUNC) {
            tk_taka_reset(&ino->taka);
            mark_plain_stale(fs, ino);
        }
    }
    tk_fh *fh = NULL;
    if (rc == 0 && !(fh = new_fh(fd, view, flags, ino))) rc = -ENOMEM;
    pthread_rwlock_unlock(&ino->lock);
    if (rc) {
        close(fd);
        return rc;
    }
    if ((flags & O_TRUNC) && fuse_req_ctx(req)->uid != 0 &&
        __atomic_load_n(&fs->st.killpriv_v2, __ATOMIC_RELAXED))
        kill_suidgid(fs, req, ino, fh->fd);
    *fhp = fh;
    return 0;
}

static void op_open(fuse_req_t req, fuse_ino_t nodeid, struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    int view;
    tk_inode *ino = tk_node_inode(fs, nodeid, &view);
    tk_fh *fh = NULL;
    int rc = check_open(fs, req, ino, view, fi->flags);
    if (rc == 0) rc = open_backing(fs, req, ino, view, fi->flags, &fh);
    if (rc) { reply_rc(req, rc); return; }
    fi->fh = (uint64_t)fh->slot + 1;
    fi->direct_io = direct_for(fs, view, fi->flags);
    fi->keep_cache = keep_cache(ino, view);
    if (fuse_reply_open(req, fi) != 0)  /* interrupted: the kernel will not release */
        fh_drop(fs, fh);
}

static void op_create(fuse_req_t req, fuse_ino_t parent_id, const char *name, mode_t mode,
                      struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_inode *parent = tk_node_inode(fs, parent_id, NULL);
    tk_decision d;
    if (tk_hidden_name(name)) { reply_rc(req, -EPERM); return; }  /* the rekey's names */
    int rc = tk_check(fs, req, parent, name, TK_ACT_CREATE, 0, &d);
    if (rc) { reply_rc(req, rc); return; }
    int view = (d.effects & TK_FX_APPLY_KEY) ? TK_VIEW_PLAIN : TK_VIEW_RAW;
    /* the new file's handle is the creator's capability: its access mode is checked
     * now, on the new path (a new file has nothing to truncate) */
    rc = check_open_at(fs, req, parent, name, view, fi->flags & ~O_TRUNC);
    if (rc) { reply_rc(req, rc); return; }
    int flags = view == TK_VIEW_PLAIN ? O_RDWR | O_CLOEXEC : raw_flags(fi->flags);
    int pfd = tk_inode_fd(fs, parent);
    if (pfd < 0) { reply_rc(req, pfd); return; }
    tk_creds c;
    int fd = -1;
    rc = become_caller(fs, req, &c);
    if (rc == 0) {
        fd = openat(pfd, name, flags | O_CREAT | O_EXCL | O_NOFOLLOW, mode);
        if (fd < 0) rc = -errno;
    }
    become_root(fs, &c);
    struct stat cst;
    int have_cst = fd >= 0 && fstat(fd, &cst) == 0;
    if (have_cst)  /* for a successor, should we be killed now */
        tk_note_create(fs, (uint64_t)cst.st_dev, (uint64_t)cst.st_ino);
    struct fuse_entry_param e;
    tk_inode *ino = NULL;
    tk_fh *fh = NULL;
    /* EEXIST for O_EXCL, unless the file is the one a killed predecessor created for
     * this very request (served again: its reply never arrived) */
    if (rc == -EEXIST && (!(fi->flags & O_EXCL) || tk_recovered_create(fs, pfd, name))) {
        /* raced with another creator: open the existing file like open(2) would */
        rc = make_entry(fs, req, parent, pfd, name, -1, &e, NULL);
        if (rc == 0) {
            ino = tk_node_inode(fs, e.ino, &view);
            rc = check_open(fs, req, ino, view, fi->flags);
            if (rc == 0) rc = open_backing(fs, req, ino, view, fi->flags, &fh);
            if (rc == 0) rc = view_stat(fs, ino, view, &e.attr);
            if (rc) {
                if (fh) fh_drop(fs, fh);
                fh = NULL;
                tk_itab_forget(fs, e.ino, 1);
            }
        }
    } else if (rc == 0) {
        rc = make_entry_ex(fs, req, parent, pfd, name, view, view == TK_VIEW_PLAIN, &e, &ino);
        if (rc == 0 && view == TK_VIEW_PLAIN) {
            pthread_rwlock_wrlock(&ino->lock);
            rc = tk_taka_create(fs, ino, fd);
            pthread_rwlock_unlock(&ino->lock);
            if (rc == 0) rc = view_stat(fs, ino, view, &e.attr);
            if (rc) tk_itab_forget(fs, e.ino, 1);
        }
        if (rc == 0) {
            /* registered under the file's lock with an fd on its current object (a
             * rekey may have swapped even a new file since it was created) */
            pthread_rwlock_rdlock(&ino->lock);
            if (!have_cst || cst.st_dev != ino->dev || cst.st_ino != ino->ino) {
                close(fd);
                fd = reopen(fs, ino, flags);
                if (fd < 0) rc = fd;
            }
            if (rc == 0 && !(fh = new_fh(fd, view, fi->flags, ino))) rc = -ENOMEM;
            pthread_rwlock_unlock(&ino->lock);
            if (rc) tk_itab_forget(fs, e.ino, 1);
        }
        if (rc) {
            if (fd >= 0) close(fd);
            fd = -1;
            unlinkat(pfd, name, 0);
        }
    }
    tk_inode_put(fs, parent);
    if (rc) { reply_rc(req, rc); return; }
    fi->fh = (uint64_t)fh->slot + 1;
    fi->direct_io = direct_for(fs, view, fi->flags);
    fi->keep_cache = keep_cache(ino, view);
    if (fuse_reply_create(req, &e, fi) != 0) {  /* interrupted: no release, no forget */
        fh_drop(fs, fh);
        tk_itab_forget(fs, e.ino, 1);
    }
}

/* An open file description is a capability (docs/guard-points.md, "The chokepoint"):
 * the policy decides at open -- which view, whether reading and writing are allowed --
 * and READ, WRITE, FSYNC and FALLOCATE on the handle are not asked again, whoever sends
 * them (the opener, a child that inherited the fd, a process it was passed to, the
 * kernel's writeback of a shared mapping).  Asking per request could not be kept
 * anyway: a read answered from the page cache, an mmap'ed page and a store into a
 * shared mapping never reach us. */
/* ---- read prefetch --------------------------------------------------------------------
 * The kernel reads a guard point's file ahead in requests of up to 1 MiB (readahead
 * 2 MiB, guard.py), but each request's pread of the backing file only gets the backing
 * device's own readahead (128 KiB by default): the disk then idles while the engine
 * decrypts and replies.  When a handle's reads are sequential and large, the engine
 * asks the backing file for the stored bytes of the next four requests
 * (POSIX_FADV_WILLNEED: the I/O is started, not waited for), so the disk works on the
 * next range while this one is decrypted.  Small reads and jumps are never hinted.
 * For the plaintext view the hint goes with the read to tk_taka_read, which gives it
 * to the helper decrypting a part of it (fuse_split.c): starting the I/O allocates the
 * backing's page cache, work better done off the reader's CPU. */
#define TK_PREFETCH_MIN (64u << 10)

/* The backing range to hint for this read, in *hint (len 0: none). */
static void read_prefetch(tk_fh *fh, uint64_t off, size_t size, uint32_t bs,
                          tk_hint *hint) {
    hint->off = hint->len = 0;
    if (size < TK_PREFETCH_MIN) return;
    const uint64_t end = off + size, span = 4 * (uint64_t)size;
    /* ra_next - 1 is the head of the stream: the furthest end read so far.  Requests
     * of one readahead window are served by several threads in any order, so a read
     * within four requests of the head counts as sequential.  The first read and a
     * jump start a new stream at their own end, unhinted. */
    uint64_t prev = __atomic_load_n(&fh->ra_next, __ATOMIC_RELAXED);
    const uint64_t head = prev ? prev - 1 : 0;
    if (!prev || off + span < head || off > head + span) {
        __atomic_store_n(&fh->ra_next, end + 1, __ATOMIC_RELAXED);
        return;
    }
    while (end + 1 > prev &&
           !__atomic_compare_exchange_n(&fh->ra_next, &prev, end + 1, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    uint64_t from = end > head ? end : head, to = from + span;
    if (bs) {  /* plaintext offsets -> the stored blocks holding them */
        from = tk_taka_stored_size(from / bs * bs, bs);
        to = tk_taka_stored_size((to + bs - 1) / bs * bs, bs);
    }
    hint->off = from;
    hint->len = to - from;
}

static void op_read(fuse_req_t req, fuse_ino_t nodeid, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_fh *fh = fh_of(fs, fi);
    (void)nodeid;
    (void)fi;
    if (!fh) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    char *ring = tk_uring_reply_space(size);  /* decrypt straight into the reply */
    char *buf = ring ? ring : malloc(size ? size : 1);
    if (!buf) { reply_rc(req, -ENOMEM); return; }
    ssize_t n;
    tk_hint hint;
    if (fh->view == TK_VIEW_RAW) {
        read_prefetch(fh, (uint64_t)off, size, 0, &hint);
        tk_hint_apply(fs, fh->fd, &hint);
        n = pread(fh->fd, buf, size, off);
        if (n < 0) n = -errno;
    } else {
        tk_inode *ino = fh->ino;
        uint64_t bad = 0;
        pthread_rwlock_rdlock(&ino->lock);
        if (!tk_taka_valid(fs, &ino->taka)) {  /* reload after invalidate / raw write */
            pthread_rwlock_unlock(&ino->lock);
            pthread_rwlock_wrlock(&ino->lock);
            n = ensure_loaded(fs, req, ino, fh->fd);
            if (n == 0)
                n = tk_taka_read(fs, &ino->taka, fh->fd, buf, size, (uint64_t)off, &bad, NULL);
        } else {
            read_prefetch(fh, (uint64_t)off, size, ino->taka.bs, &hint);
            n = tk_taka_read(fs, &ino->taka, fh->fd, buf, size, (uint64_t)off, &bad, &hint);
        }
        pthread_rwlock_unlock(&ino->lock);
        data_fail(fs, req, ino, "read", (int)n, bad);
    }
    if (n < 0) reply_rc(req, (int)n);
    else fuse_reply_buf(req, buf, (size_t)n);
    if (!ring) free(buf);
}

/* A raw-view change of the stored bytes (a pwrite of buf, or a fallocate with `mode`
 * when buf is NULL) as one step between the plaintext engine's operations: under the
 * inode's write lock, after which the engine forgets what it knew of the file (header,
 * size, stored length) and reads it afresh, and the plaintext pages are dropped.  The
 * bytes written or -errno. */
static ssize_t raw_change(tk_fs *fs, tk_inode *ino, int fd, const char *buf, size_t size,
                          off_t off, int mode) {
    pthread_rwlock_wrlock(&ino->lock);
    ssize_t n = buf ? pwrite(fd, buf, size, off) : fallocate(fd, mode, off, (off_t)size);
    if (n < 0) n = -errno;
    tk_rk_raw(ino);  /* a rekey copying the file gives up: tried again later */
    tk_taka_reset(&ino->taka);
    pthread_rwlock_unlock(&ino->lock);
    mark_plain_stale(fs, ino);
    return n;
}

static void op_write(fuse_req_t req, fuse_ino_t nodeid, const char *buf, size_t size,
                     off_t off, struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_fh *fh = fh_of(fs, fi);
    (void)nodeid;
    int rc;
    if (!fh) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    tk_inode *ino = fh->ino;
    if (__atomic_load_n(&fs->st.killpriv_v2, __ATOMIC_RELAXED) &&
        write_kills_suidgid(req, buf, size, off, fi))
        kill_suidgid(fs, req, ino, fh->fd);
    if (fh->view == TK_VIEW_RAW) {
        ssize_t n = raw_change(fs, ino, fh->fd, buf, size, off, 0);
        if (n < 0) { reply_rc(req, (int)n); return; }
        write_behind(fh, (uint64_t)off, (uint64_t)off + (uint64_t)n);
        inval_other_view(fs, ino, TK_VIEW_RAW);  /* before the reply: then fh may go */
        fuse_reply_write(req, (size_t)n);
        return;
    }
    uint64_t bad = 0, bs = 0;
    pthread_rwlock_wrlock(&ino->lock);
    rc = ensure_loaded(fs, req, ino, fh->fd);
    if (rc == 0) {
        bs = ino->taka.bs;
        /* O_APPEND: append at OUR size, atomically under the inode lock */
        uint64_t at = fh->append && !fi->writepage ? ino->taka.size : (uint64_t)off;
        uint64_t old = ino->taka.size;
        rc = tk_taka_write(fs, &ino->taka, fh->fd, buf, size, at, &bad);
        tk_rk_changed(ino, old, at, size, ino->taka.size);  /* also after a failure */
    }
    pthread_rwlock_unlock(&ino->lock);
    data_fail(fs, req, ino, "write", rc, bad);
    if (rc) reply_rc(req, rc);
    else {
        /* before the reply: once it is sent a RELEASE may free fh (and the inode) */
        inval_other_view(fs, ino, TK_VIEW_PLAIN);
        write_behind(fh, tk_taka_stored_size((uint64_t)off / bs * bs, (uint32_t)bs),
                     tk_taka_stored_size((uint64_t)off + size, (uint32_t)bs));
        fuse_reply_write(req, size);
    }
}

static void op_release(fuse_req_t req, fuse_ino_t nodeid, struct fuse_file_info *fi) {
    tk_fh *fh = fh_of(FS(req), fi);
    (void)nodeid;
    if (!fh) {  /* released already: a killed predecessor did it, the reply was lost */
        fuse_reply_err(req, 0);
        return;
    }
    if (fh->writable && fh->view == TK_VIEW_PLAIN) {
        /* remember the size a writer left (a file written and never stat'ed: cp -r,
         * a database's new segment), so a stat after the kernel forgets it reads no
         * header; the kernel does not wait for RELEASE */
        struct stat st;
        (void)view_stat(FS(req), fh->ino, TK_VIEW_PLAIN, &st);
    }
    fh_drop(FS(req), fh);
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t nodeid, int datasync,
                     struct fuse_file_info *fi) {
    tk_fh *fh = fh_of(FS(req), fi);
    (void)nodeid;
    int rc = 0;
    if (!fh) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    if ((datasync ? fdatasync(fh->fd) : fsync(fh->fd)) < 0) rc = -errno;
    reply_rc(req, rc);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t nodeid, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_fh *fh = fh_of(fs, fi);
    (void)nodeid;
    int rc;
    if (!fh) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    if (fh->view == TK_VIEW_RAW) {
        rc = (int)raw_change(fs, fh->ino, fh->fd, NULL, (size_t)len, off, mode);
        if (rc == 0) inval_other_view(fs, fh->ino, TK_VIEW_RAW);
        reply_rc(req, rc);
        return;
    }
    /* plaintext: mode 0 and KEEP_SIZE only.  Growing is a truncate up (a hole); the
     * stored range is reserved best effort (reserved zeros still read as holes). */
    if (mode & ~FALLOC_FL_KEEP_SIZE) { reply_rc(req, -EOPNOTSUPP); return; }
    if (off < 0 || len <= 0) { reply_rc(req, -EINVAL); return; }
    tk_inode *ino = fh->ino;
    uint64_t bad = 0, end = (uint64_t)off + (uint64_t)len;
    pthread_rwlock_wrlock(&ino->lock);
    rc = ensure_loaded(fs, req, ino, fh->fd);
    if (rc == 0 && !(mode & FALLOC_FL_KEEP_SIZE) && end > ino->taka.size) {
        uint64_t old = ino->taka.size;
        rc = tk_taka_truncate(fs, &ino->taka, fh->fd, end, &bad);
        tk_rk_changed(ino, old, 0, 0, end);
    }
    if (rc == 0) {
        uint64_t bs = ino->taka.bs;
        uint64_t s0 = tk_taka_stored_size((uint64_t)off / bs * bs, (uint32_t)bs);
        uint64_t s1 = tk_taka_stored_size((end + bs - 1) / bs * bs, (uint32_t)bs);
        if (fallocate(fh->fd, FALLOC_FL_KEEP_SIZE, (off_t)s0, (off_t)(s1 - s0)) < 0) {
            /* best effort: the data semantics hold without the reservation */
        }
    }
    pthread_rwlock_unlock(&ino->lock);
    data_fail(fs, req, ino, "write", rc, bad);
    if (rc == 0) inval_other_view(fs, ino, fh->view);
    reply_rc(req, rc);
}

/* ---- directories ---------------------------------------------------------------------- */

/* A directory handle on ino (a new one in a free slot, or restored in `slot` when
 * slot_plus1 is its slot + 1); NULL with *rc = -errno. */
tk_dir *tk_dir_new(tk_fs *fs, tk_inode *ino, uint64_t slot_plus1, int *rc) {
    tk_dir *d = calloc(1, sizeof *d);
    if (!d) {
        *rc = -ENOMEM;
        return NULL;
    }
    d->kind = TK_FH_DIR;
    d->ino = ino;
    int fd = reopen(fs, ino, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || !(d->dp = fdopendir(fd))) {
        *rc = fd < 0 ? fd : -errno;
        if (fd >= 0) close(fd);
        free(d);
        return NULL;
    }
    int64_t slot = slot_plus1 ? tk_slots_place(&fs->fhs, (uint32_t)(slot_plus1 - 1), d)
                              : tk_slots_add(&fs->fhs, d);
    if (slot_plus1 && slot == 0) slot = (int64_t)(slot_plus1 - 1);
    if (slot < 0) {
        closedir(d->dp);
        free(d);
        *rc = (int)slot;
        return NULL;
    }
    d->slot = (uint32_t)slot;
    tk_sh_fh(fs, d->slot, TK_FH_DIR, ino->slot, 0, 0, 0, 0);
    return d;
}

static void op_opendir(fuse_req_t req, fuse_ino_t nodeid, struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_LIST, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    tk_dir *d = tk_dir_new(fs, ino, 0, &rc);
    if (!d) { reply_rc(req, rc); return; }
    fi->fh = (uint64_t)d->slot + 1;
    if (fuse_reply_open(req, fi) != 0) {
        closedir(d->dp);
        fh_forget(fs, d, d->slot);
    }
}

static mode_t dtype_mode(unsigned char t) {
    switch (t) {
    case DT_DIR: return S_IFDIR;
    case DT_LNK: return S_IFLNK;
    case DT_CHR: return S_IFCHR;
    case DT_BLK: return S_IFBLK;
    case DT_FIFO: return S_IFIFO;
    case DT_SOCK: return S_IFSOCK;
    default: return S_IFREG;
    }
}

static void do_readdir(fuse_req_t req, fuse_ino_t nodeid, size_t size, off_t off,
                       struct fuse_file_info *fi, int plus) {
    tk_fs *fs = FS(req);
    tk_inode *dir = tk_node_inode(fs, nodeid, NULL);
    tk_dir *d = dir_of(fs, fi);
    if (!d) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    int rc = tk_check(fs, req, dir, NULL, TK_ACT_LIST, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    char *buf = calloc(1, size ? size : 1);
    if (!buf) { reply_rc(req, -ENOMEM); return; }
    size_t rem = size;
    char *p = buf;
    int dfd = -1;              /* dir's fd, borrowed for the first full entry */
    fuse_ino_t *added = NULL;  /* lookups handed out: dropped if the reply fails */
    size_t nadded = 0, capadded = 0;
    if (off != d->offset) {
        seekdir(d->dp, off);
        d->entry = NULL;
        d->offset = off;
    }
    for (;;) {
        if (!d->entry) {
            errno = 0;
            d->entry = readdir(d->dp);
            if (!d->entry) {
                if (errno) rc = -errno;
                break;
            }
        }
        off_t next = d->entry->d_off;
        const char *name = d->entry->d_name;
        size_t n;
        if (tk_hidden_name(name)) {  /* a rekey's temporary (fuse_rekey.c) */
            d->entry = NULL;
            d->offset = next;
            continue;
        }
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.attr.st_ino = d->entry->d_ino;
        e.attr.st_mode = dtype_mode(d->entry->d_type);
        int is_dot = strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
        if (!plus) {
            n = fuse_add_direntry(req, p, rem, name, &e.attr, next);
        } else if (is_dot || d->entry->d_type == DT_UNKNOWN ||
                   (d->entry->d_type == DT_REG && !(hints(fs) & TK_HINT_PLAIN_ONLY))) {
            /* node id 0: the kernel looks regular files up itself, so each caller is
             * routed to the node of its view (with TK_HINT_PLAIN_ONLY there is one) */
            n = fuse_add_direntry_plus(req, p, rem, name, &e, next);
        } else {
            if (nadded == capadded) {  /* room first: never hand out an untracked lookup */
                size_t nc = capadded ? capadded * 2 : 32;
                fuse_ino_t *na = realloc(added, nc * sizeof *na);
                if (!na) {
                    rc = -ENOMEM;
                    break;
                }
                added = na;
                capadded = nc;
            }
            if (dfd < 0) dfd = tk_inode_fd(fs, dir);
            if (dfd < 0 || make_entry(fs, req, dir, dfd, name, TK_VIEW_PLAIN, &e, NULL) != 0) {
                memset(&e, 0, sizeof e);  /* vanished meanwhile: list it without attrs */
                e.attr.st_ino = d->entry->d_ino;
                e.attr.st_mode = dtype_mode(d->entry->d_type);
            }
            n = fuse_add_direntry_plus(req, p, rem, name, &e, next);
            if (n > rem && e.ino) tk_itab_forget(fs, e.ino, 1);
            else if (e.ino) added[nadded++] = e.ino;
        }
        if (n > rem) break;
        p += n;
        rem -= n;
        d->entry = NULL;
        d->offset = next;
    }
    if (dfd >= 0) tk_inode_put(fs, dir);
    /* an error after some entries: return what we have (the next call reports it) */
    if (rc && rem != size) rc = 0;
    if (rc) reply_rc(req, rc);
    else if (fuse_reply_buf(req, buf, size - rem) != 0)  /* the kernel took no entry */
        for (size_t i = 0; i < nadded; i++) tk_itab_forget(fs, added[i], 1);
    free(added);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t nodeid, size_t size, off_t off,
                       struct fuse_file_info *fi) {
    do_readdir(req, nodeid, size, off, fi, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t nodeid, size_t size, off_t off,
                           struct fuse_file_info *fi) {
    do_readdir(req, nodeid, size, off, fi, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t nodeid, struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_dir *d = dir_of(fs, fi);
    (void)nodeid;
    if (!d) {  /* released already (see op_release) */
        fuse_reply_err(req, 0);
        return;
    }
    closedir(d->dp);
    fh_forget(fs, d, d->slot);
    fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t nodeid, int datasync,
                        struct fuse_file_info *fi) {
    tk_fs *fs = FS(req);
    tk_dir *d = dir_of(fs, fi);
    if (!d) { reply_rc(req, -EBADF); return; }  /* see tk_fh_unknown */
    int rc = tk_check(fs, req, tk_node_inode(fs, nodeid, NULL), NULL, TK_ACT_LIST, 0, NULL);
    int fd = dirfd(d->dp);
    if (rc == 0 && (datasync ? fdatasync(fd) : fsync(fd)) < 0) rc = -errno;
    reply_rc(req, rc);
}

static void op_statfs(fuse_req_t req, fuse_ino_t nodeid) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_GETATTR, 0, NULL);
    struct statvfs sv;
    if (rc == 0) {
        int pfd = tk_inode_fd(fs, ino);
        if (pfd < 0) rc = pfd;
        else if (fstatvfs(pfd, &sv) < 0) rc = -errno;
        if (pfd >= 0) tk_inode_put(fs, ino);
    }
    if (rc) reply_rc(req, rc);
    else fuse_reply_statfs(req, &sv);
}

static void op_access(fuse_req_t req, fuse_ino_t nodeid, int mask) {
    /* with default_permissions the kernel checks modes itself and never sends this */
    tk_fs *fs = FS(req);
    (void)mask;
    reply_rc(req, tk_check(fs, req, tk_node_inode(fs, nodeid, NULL), NULL, TK_ACT_GETATTR, 0,
                           NULL));
}

/* ---- xattrs: user.* only -------------------------------------------------------------- */

static int user_xattr(const char *name) { return strncmp(name, "user.", 5) == 0; }

static void op_setxattr(fuse_req_t req, fuse_ino_t nodeid, const char *name,
                        const char *value, size_t size, int flags) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    if (!user_xattr(name)) { reply_rc(req, -EOPNOTSUPP); return; }
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_SETXATTR, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    pthread_rwlock_rdlock(&ino->lock);  /* see op_setattr */
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) {
        rc = pfd;
    } else {
        char p[64];
        PROCPATH(p, pfd);
        if (setxattr(p, name, value, size, flags) < 0) rc = -errno;
        tk_inode_put(fs, ino);
    }
    pthread_rwlock_unlock(&ino->lock);
    reply_rc(req, rc);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t nodeid, const char *name, size_t size) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    TK_INC(fs, getxattr_requests, 1);
    /* other namespaces are not supported (set/remove say so too): EOPNOTSUPP, not
     * ENODATA, lets tools stop asking (ls -l probes SELinux labels and ACLs once per
     * file system instead of twice per file) */
    if (!user_xattr(name)) { reply_rc(req, -EOPNOTSUPP); return; }
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_GETXATTR, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    char *buf = size ? malloc(size) : NULL;
    if (size && !buf) { reply_rc(req, -ENOMEM); return; }
    int pfd = tk_inode_fd(fs, ino);
    ssize_t n = pfd;
    if (pfd >= 0) {
        char p[64];
        PROCPATH(p, pfd);
        n = getxattr(p, name, buf, size);
        if (n < 0) n = -errno;
        tk_inode_put(fs, ino);
    }
    if (n < 0) reply_rc(req, (int)n);
    else if (size == 0) fuse_reply_xattr(req, (size_t)n);
    else fuse_reply_buf(req, buf, (size_t)n);
    free(buf);
}

/* listxattr of ino, only user.* names: a malloc'd list in *out, or -errno. */
static ssize_t user_xattrs(tk_fs *fs, tk_inode *ino, char **out) {
    *out = NULL;
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) return pfd;
    char p[64];
    PROCPATH(p, pfd);
    ssize_t n = 0;
    char *all = NULL, *keep = NULL;
    for (int tries = 0; tries < 8; tries++) {  /* the list may grow between the calls */
        n = listxattr(p, NULL, 0);
        if (n < 0) { n = -errno; break; }
        free(all);
        all = malloc((size_t)n + 1);
        if (!all) { n = -ENOMEM; break; }
        n = listxattr(p, all, (size_t)n);
        if (n >= 0 || errno != ERANGE) {
            if (n < 0) n = -errno;
            break;
        }
    }
    tk_inode_put(fs, ino);
    if (n >= 0) keep = malloc((size_t)n + 1);
    if (n >= 0 && !keep) n = -ENOMEM;
    if (n < 0) {
        free(all);
        return n;
    }
    size_t len = 0;
    for (ssize_t i = 0; i < n;) {
        size_t l = strnlen(all + i, (size_t)(n - i)) + 1;
        if (user_xattr(all + i)) {
            memcpy(keep + len, all + i, l);
            len += l;
        }
        i += (ssize_t)l;
    }
    free(all);
    *out = keep;
    return (ssize_t)len;
}

static void op_listxattr(fuse_req_t req, fuse_ino_t nodeid, size_t size) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_GETXATTR, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    char *out;
    ssize_t len = user_xattrs(fs, ino, &out);
    if (len < 0) reply_rc(req, (int)len);
    else if (size == 0) fuse_reply_xattr(req, (size_t)len);
    else if ((size_t)len > size) reply_rc(req, -ERANGE);
    else fuse_reply_buf(req, out, (size_t)len);
    free(out);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t nodeid, const char *name) {
    tk_fs *fs = FS(req);
    tk_inode *ino = tk_node_inode(fs, nodeid, NULL);
    if (!user_xattr(name)) { reply_rc(req, -EOPNOTSUPP); return; }
    int rc = tk_check(fs, req, ino, NULL, TK_ACT_SETXATTR, 0, NULL);
    if (rc) { reply_rc(req, rc); return; }
    pthread_rwlock_rdlock(&ino->lock);  /* see op_setattr */
    int pfd = tk_inode_fd(fs, ino);
    if (pfd < 0) {
        rc = pfd;
    } else {
        char p[64];
        PROCPATH(p, pfd);
        if (removexattr(p, name) < 0) rc = -errno;
        tk_inode_put(fs, ino);
    }
    pthread_rwlock_unlock(&ino->lock);
    reply_rc(req, rc);
}

const struct fuse_lowlevel_ops tk_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readlink = op_readlink,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .symlink = op_symlink,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .rename = op_rename,
    .link = op_link,
    .open = op_open,
    .create = op_create,
    .read = op_read,
    .write = op_write,
    .release = op_release,
    .fsync = op_fsync,
    .fallocate = op_fallocate,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .access = op_access,
    .setxattr = op_setxattr,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .removexattr = op_removexattr,
};
