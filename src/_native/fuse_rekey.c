/*
 * fuse_rekey.c -- live re-encryption ("rekey") of one file of a mounted guard point to
 * its key's current version, while applications keep it open, reading and writing
 * (docs/guard-points.md, "Live rekey (data path)").
 *
 * The file is copied, block by block, into a temporary file beside it (a new file id,
 * so new per-file keys, under the target key version), one chunk per hold of the inode's
 * read lock, up to a frontier (rk->next).  Blocks below the frontier that applications
 * change meanwhile are copied again by the writer itself, under the write lock it holds
 * anyway (tk_rk_note: "mirroring"), so the copy never falls behind however hot the file
 * is and whatever the rate; a shrink moves the frontier back.  A short final step under
 * the write lock copies what was appended since, gives the copy the original's size,
 * metadata and times, fsyncs it and swaps it in with renameat2(RENAME_EXCHANGE); then the
 * inode is pointed at the new object (tk_itab_repoint) and every open handle's backing
 * fd is replaced by one on the new file with dup3 (same fd number: nothing else has to
 * know).
 *
 * Crash safety: the name always holds a complete file -- the original until the
 * exchange, the complete and fsynced copy after it -- and a leftover temporary (a crash
 * during the copy or before the old file is unlinked) is only ever a temporary, hidden by
 * the guard point and removed by takakrypt.rekeyfile.remove_leftovers.
 */
#include "fuse_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#define OVH TK_GCM_OVERHEAD
/* stored bytes read per chunk at most (the chunk_blocks argument is cut to fit) */
#define RK_CHUNK_BYTES (8u << 20)
/* what the final step copies under the write lock at most (appended since the copy
 * reached the end; a file outrunning the copy waits for its budget first) */
#define RK_FINAL_BYTES (32u << 20)
#define RK_FINAL_TRIES 4      /* final steps put off for too much work, then "busy" */
#define RK_TEMP_NAME_MAX (sizeof TK_REKEY_PREFIX + 24)

struct rk_ctx;

/* A running rekey of an inode (ino->rk): under the inode's lock. */
struct tk_rekey {
    uint32_t bs;
    uint64_t next;        /* the frontier: blocks below are in the temp, kept current */
    int busy;             /* a raw-view change, or a failed mirror: give up, retry later */
    struct rk_ctx *ctx;
};

static int mirror(struct rk_ctx *c, tk_inode *ino, uint64_t a, uint64_t b);

void tk_rk_note(tk_inode *ino, uint64_t old, uint64_t off, uint64_t len, uint64_t new_size) {
    struct tk_rekey *rk = ino->rk;
    if (!rk || rk->busy) return;
    const uint64_t bs = rk->bs;
    /* a shrink: what the file holds from the cut on when it grows back (holes, new
     * data) is copied again */
    if (new_size < old && new_size / bs < rk->next) rk->next = new_size / bs;
    /* the blocks rewritten: the written ones, and the old and the new last block (an
     * append rewrites the old partial one, a truncate re-encrypts the new one); those
     * below the frontier (and the end: a failed write may have stored more) go again */
    const uint64_t cur = ino->taka.size;  /* (what it is: a failed change may differ) */
    uint64_t lim = (cur + bs - 1) / bs;
    if (lim > rk->next) lim = rk->next;
    uint64_t r[3][2];
    int n = 0;
    if (len) {
        r[n][0] = off / bs;
        r[n++][1] = (off + len - 1) / bs + 1;
    }
    if (old != new_size && old) {
        r[n][0] = (old - 1) / bs;
        r[n++][1] = (old - 1) / bs + 1;
    }
    if (old != new_size && new_size) {
        r[n][0] = (new_size - 1) / bs;
        r[n++][1] = (new_size - 1) / bs + 1;
    }
    for (int i = 0; i < n && !rk->busy; i++) {
        uint64_t a = r[i][0], b = r[i][1] < lim ? r[i][1] : lim;
        int dup = 0;
        for (int j = 0; j < i; j++)  /* a block already copied by an earlier range */
            if (a >= r[j][0] && b <= (r[j][1] < lim ? r[j][1] : lim)) dup = 1;
        if (a < b && !dup && mirror(rk->ctx, ino, a, b) != 0)
            rk->busy = 1;  /* never fails the application's write: the rekey gives up */
    }
}

void tk_rk_busy(tk_inode *ino) {
    if (ino->rk) ino->rk->busy = 1;
}

/* ---- lifecycle -------------------------------------------------------------------- */

void tk_rekey_init(tk_fs *fs) {
    pthread_mutex_init(&fs->rk_mu, NULL);
    pthread_cond_init(&fs->rk_cv, NULL);
    fs->rk_active = 0;
    fs->rk_cancel = fs->rk_stop = 0;
    fs->rk_retired = NULL;
}

void tk_rekey_fini(tk_fs *fs) {
    pthread_mutex_destroy(&fs->rk_mu);
    pthread_cond_destroy(&fs->rk_cv);
}

void tk_rekey_stop_all(tk_fs *fs) {
    pthread_mutex_lock(&fs->rk_mu);
    __atomic_store_n(&fs->rk_stop, 1, __ATOMIC_SEQ_CST);
    while (fs->rk_active) pthread_cond_wait(&fs->rk_cv, &fs->rk_mu);
    pthread_mutex_unlock(&fs->rk_mu);
}

void tk_rekey_handover_wait(tk_fs *fs) {
    /* ho_quiesce is set: a swap that has begun ends before the state is recorded, and
     * none begins after (the final step checks ho_quiesce under rk_mu) */
    pthread_mutex_lock(&fs->rk_mu);
    pthread_mutex_unlock(&fs->rk_mu);
}

void tk_fs_rekey_cancel(tk_fs *fs, int on) {
    __atomic_store_n(&fs->rk_cancel, on ? 1 : 0, __ATOMIC_SEQ_CST);
}

int tk_fs_backing_fd(tk_fs *fs) {
    if (!fs->mounted || fs->root_fd < 0) return -ENOTCONN;
    int fd = openat(fs->root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

/* ---- the copy ---------------------------------------------------------------------- */

typedef struct rk_ctx {
    tk_fs *fs;
    tk_inode *ino;
    const char *relpath;
    char *err;
    size_t errlen;
    struct tk_rekey rk;
    int rfd;              /* the original, read only (O_NOATIME) */
    int tfd;              /* the temporary */
    int dfd;              /* the directory of both */
    char tmpname[RK_TEMP_NAME_MAX];
    const char *base;
    tk_taka nt;           /* the new file's state */
    uint8_t hdr0[TK_HDR_STATIC];  /* the original's static header: its blocks' AAD
                                   * prefix (v2: without the write version, which a
                                   * writer may move meanwhile) */
    uint32_t bs;
    uint64_t sbs, cap;    /* stored block size; blocks per chunk */
    uint64_t tmp_hw;      /* blocks below this may hold data in the temp */
    uint64_t copied, budget;  /* blocks the copier copied; what the file's size makes
                               * reasonable (copy_loop) */
    uint64_t enc;         /* block encryptions under the new file key */
    uint64_t written;     /* bytes written to the temp (under the inode's lock) */
    uint64_t paced;       /* ... by the copy itself, not by writers' mirrors: what the
                           * rate paces and rekey_file returns */
    uint64_t rate, t0;
    uint64_t bad;         /* a block that failed authentication */
    uint8_t *raw, *plain, *out, *zero, *hole;
} rk_ctx;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t boff(const rk_ctx *c, uint64_t k) {
    return TK_HDR_SIZE + k * c->sbs;
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* Tests only: die at a named point of the swap (crash tests); and, right after the
 * exchange, linger (TAKAKRYPT_TEST_REKEY_SWAP_DELAY_MS) to widen the window in which
 * lookups and opens meet a swap half done. */
static void kill_point(const char *where) {
    const char *e = getenv("TAKAKRYPT_TEST_REKEY_KILL_AT");
    if (e && strcmp(e, where) == 0) kill(getpid(), SIGKILL);
    const char *d = strcmp(where, "exchanged") == 0
                        ? getenv("TAKAKRYPT_TEST_REKEY_SWAP_DELAY_MS") : NULL;
    long ms = d ? strtol(d, NULL, 10) : 0;
    if (ms > 0 && ms < 10000) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* Stop for good (cancel, unmount, handed over) or for now (a handover quiescing). */
static int interrupted(tk_fs *fs, int *outcome) {
    if (__atomic_load_n(&fs->rk_cancel, __ATOMIC_SEQ_CST) ||
        __atomic_load_n(&fs->rk_stop, __ATOMIC_SEQ_CST)) {
        *outcome = TK_REKEY_CANCELLED;
        return 1;
    }
    if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST) || fs->ho_done) {
        *outcome = TK_REKEY_BUSY;
        return 1;
    }
    return 0;
}

/*
 * Blocks [a, b) of the original (t: its state, valid; size: its plaintext size; b at
 * most its block count) into c->plain, verified, and which of them are holes (all-zero
 * stored blocks) into c->hole.  Under the inode's lock.  The last block of the file is
 * accepted in its implied or its longer stored form, as every reader does.
 */
static int read_blocks(rk_ctx *c, tk_taka *t, uint64_t size, uint64_t a, uint64_t b) {
    const uint64_t bs = c->bs, sbs = c->sbs, nblk = (size + bs - 1) / bs;
    const uint64_t end = b * bs < size ? b * bs : size;
    const uint64_t last_plain = end - (b - 1) * bs;
    const size_t need = (size_t)((b - 1 - a) * sbs + last_plain + OVH);
    const size_t span = (size_t)((b - a) * sbs);
    ssize_t n = tk_pread_full(c->rfd, c->raw, span, boff(c, a));
    if (n < 0) return (int)n;
    if ((size_t)n < need) {
        c->bad = a + (uint64_t)n / sbs;  /* truncated */
        return -EBADMSG;
    }
    for (uint64_t k = a; k < b; k++)
        c->hole[k - a] = (uint8_t)all_zero(c->raw + (k - a) * sbs,
                                           (size_t)(k == b - 1 ? last_plain + OVH : sbs));
    size_t w = 0;
    uint64_t badrel = 0;
    int st = TK_OK;
    /* all but the last block of the range, then the last one: if it is the file's last
     * block it may be stored longer (a crash inside a growing write) */
    if (b - 1 > a)
        st = tk_taka_decrypt(c->fs, t, c->raw, (size_t)((b - 1 - a) * sbs), c->plain, a, &w,
                             &badrel);
    if (st == TK_OK) {
        size_t at = (size_t)((b - 1 - a) * sbs);
        uint8_t *dst = c->plain + (b - 1 - a) * bs;
        st = tk_taka_decrypt(c->fs, t, c->raw + at, (size_t)(last_plain + OVH), dst, b - 1,
                             &w, &badrel);
        if (st == TK_ERR_AUTH && b == nblk && (size_t)n > need) {
            size_t longer = (size_t)n - at < sbs ? (size_t)n - at : (size_t)sbs;
            st = tk_taka_decrypt(c->fs, t, c->raw + at, longer, c->out, b - 1, &w, &badrel);
            if (st == TK_OK) memcpy(dst, c->out, (size_t)last_plain);
            OPENSSL_cleanse(c->out, (size_t)bs);
        }
        badrel = b - 1 - a;
    }
    if (st != TK_OK) {
        c->bad = a + badrel;
        return st == TK_ERR_AUTH || st == TK_ERR_SHORT_BLOCK ? -EBADMSG
               : st == TK_TAKA_NOKEY ? -ENOKEY : -EIO;
    }
    return 0;
}

/* The blocks read by read_blocks, encrypted under the new file key, into the temp at
 * the same offsets.  Holes stay holes: past what the temp may hold they are not
 * written, below it they are written as zeros (an all-zero stored block is a hole). */
static int write_blocks(rk_ctx *c, uint64_t size, uint64_t a, uint64_t b) {
    const uint64_t bs = c->bs;
    uint64_t k = a;
    while (k < b) {
        uint64_t r = k;
        while (r < b && c->hole[r - a] == c->hole[k - a]) r++;
        uint64_t pend = r * bs < size ? r * bs : size;
        size_t plen = (size_t)(pend - k * bs), slen = plen + (size_t)(r - k) * OVH;
        int rc = 0;
        if (c->hole[k - a]) {
            if (k < c->tmp_hw) {
                uint64_t zr = r < c->tmp_hw ? r : c->tmp_hw;
                uint64_t zend = zr * bs < size ? zr * bs : size;
                size_t zlen = (size_t)(zend - k * bs) + (size_t)(zr - k) * OVH;
                for (size_t at = 0; rc == 0 && at < zlen; at += c->sbs)
                    rc = tk_pwrite_full(c->tfd, c->zero, zlen - at < c->sbs ? zlen - at : c->sbs,
                                     boff(c, k) + at);
                c->written += zlen;
            }
        } else {
            if (tk_taka_encrypt(&c->nt, c->plain + (k - a) * bs, plen, c->out, k) != TK_OK)
                return -EIO;
            rc = tk_pwrite_full(c->tfd, c->out, slen, boff(c, k));
            c->enc += r - k;
            c->written += slen;
            if (r > c->tmp_hw) c->tmp_hw = r;
            TK_INC(c->fs, bytes_encrypted, plen);
        }
        if (rc) return rc;
        k = r;
    }
    return 0;
}

static void rk_cleanse(rk_ctx *c) {
    if (c->plain) OPENSSL_cleanse(c->plain, (size_t)(c->cap * c->bs));
}

/* Copy [a, b) in chunks (under the lock the caller holds: the final step). */
static int copy_range(rk_ctx *c, tk_taka *t, uint64_t size, uint64_t a, uint64_t b) {
    while (a < b) {
        uint64_t e = b - a > c->cap ? a + c->cap : b;
        int rc = read_blocks(c, t, size, a, e);
        if (rc == 0) rc = write_blocks(c, size, a, e);
        rk_cleanse(c);
        if (rc) return rc;
        a = e;
    }
    return 0;
}

/* A writer's blocks [a, b) (below the frontier) copied again: under its write lock. */
static int mirror(struct rk_ctx *c, tk_inode *ino, uint64_t a, uint64_t b) {
    return copy_range(c, &ino->taka, ino->taka.size, a, b);
}

/* Under the write lock: make the inode's TAKA state valid (after an invalidate or a
 * key drop) and check that it is still the file we started with. */
static int ensure_state(rk_ctx *c, int *outcome) {
    tk_inode *ino = c->ino;
    if (!tk_taka_valid(c->fs, &ino->taka)) {
        int rc = tk_taka_load(c->fs, ino, c->rfd);
        if (rc) return rc;
    }
    if (memcmp(ino->taka.aad, c->hdr0, TK_HDR_STATIC) != 0) {
        *outcome = TK_REKEY_BUSY;  /* restored through the raw view meanwhile */
        return 1;
    }
    return 0;
}

static void pace(rk_ctx *c, int *outcome) {
    if (!c->rate) return;
    uint64_t due = c->t0 + (uint64_t)((double)c->paced * 1e9 / (double)c->rate);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= due || interrupted(c->fs, outcome)) return;
        uint64_t d = due - now < 50000000ULL ? due - now : 50000000ULL;
        struct timespec ts = {(time_t)(d / 1000000000ULL), (long)(d % 1000000000ULL)};
        nanosleep(&ts, NULL);
    }
}

/* The copy, chunk by chunk, each read, encrypted and written under the read lock (a
 * writer's mirror, under the write lock, never overlaps it: the temp gets every block
 * in the order the original got it).  0 and outcome -1: on to the final step; 0 and an
 * outcome: stop with it; or -errno. */
static int copy_loop(rk_ctx *c, int *outcome) {
    tk_inode *ino = c->ino;
    struct tk_rekey *rk = &c->rk;
    const uint64_t final_max = RK_FINAL_BYTES / c->sbs;
    for (;;) {
        /* a file appended to (or cut and grown) faster than it is copied: past the
         * budget the final step takes what is left if that fits under the write lock;
         * far past it, try again later */
        if (c->copied > 4 * c->budget) {
            *outcome = TK_REKEY_BUSY;
            return 0;
        }
        if (interrupted(c->fs, outcome)) return 0;
        pthread_rwlock_rdlock(&ino->lock);
        if (!tk_taka_valid(c->fs, &ino->taka) ||
            memcmp(ino->taka.aad, c->hdr0, TK_HDR_STATIC) != 0) {
            pthread_rwlock_unlock(&ino->lock);
            pthread_rwlock_wrlock(&ino->lock);
            int rc = ensure_state(c, outcome);
            pthread_rwlock_unlock(&ino->lock);
            if (rc) return rc > 0 ? 0 : rc;
            continue;
        }
        if (rk->busy) {
            pthread_rwlock_unlock(&ino->lock);
            *outcome = TK_REKEY_BUSY;
            return 0;
        }
        const uint64_t size = ino->taka.size, nblk = (size + c->bs - 1) / c->bs;
        const uint64_t tail = nblk > rk->next ? nblk - rk->next : 0;
        if (tail == 0 || (c->copied > c->budget && tail <= final_max)) {
            pthread_rwlock_unlock(&ino->lock);
            *outcome = -1;  /* the final step */
            return 0;
        }
        const uint64_t a = rk->next, b = tail > c->cap ? a + c->cap : nblk;
        const uint64_t w0 = c->written;
        int rc = read_blocks(c, &ino->taka, size, a, b);
        if (rc == 0) rc = write_blocks(c, size, a, b);
        if (rc == 0) {
            rk->next = b;
            c->copied += b - a;
            c->paced += c->written - w0;
        }
        rk_cleanse(c);  /* under the lock: a writer's mirror uses the same buffers */
        pthread_rwlock_unlock(&ino->lock);
        if (rc) return rc;
        kill_point("copy");
        pace(c, outcome);
    }
}

/* ---- metadata ---------------------------------------------------------------------- */

/* xattr names of fd (a malloc'd list, *len bytes), or -errno */
static ssize_t list_xattrs(int fd, char **out) {
    *out = NULL;
    for (int tries = 0; tries < 8; tries++) {
        ssize_t n = flistxattr(fd, NULL, 0);
        if (n < 0) return errno == ENOTSUP ? 0 : -errno;
        char *l = malloc((size_t)n + 1);
        if (!l) return -ENOMEM;
        ssize_t m = flistxattr(fd, l, (size_t)n);
        if (m >= 0) {
            *out = l;
            return m;
        }
        free(l);
        if (errno != ERANGE) return -errno;
    }
    return -ERANGE;
}

static int has_name(const char *list, ssize_t len, const char *name) {
    for (ssize_t i = 0; i < len; i += (ssize_t)strlen(list + i) + 1)
        if (strcmp(list + i, name) == 0) return 1;
    return 0;
}

/* Owner, xattrs (all namespaces: ACLs, labels, capabilities), mode, then the times --
 * after the last write to the temp, since the plaintext did not change. */
static int copy_meta(rk_ctx *c, const struct stat *st) {
    int rc = 0;
    char *from = NULL, *to = NULL, *val = NULL;
    if (fchown(c->tfd, st->st_uid, st->st_gid) < 0) {
        snprintf(c->err, c->errlen, "cannot give the copy the owner %u:%u: %s",
                 (unsigned)st->st_uid, (unsigned)st->st_gid, strerror(errno));
        return -errno;
    }
    ssize_t nf = list_xattrs(c->rfd, &from);
    ssize_t nt = nf < 0 ? 0 : list_xattrs(c->tfd, &to);
    if (nf < 0 || nt < 0) {
        rc = nf < 0 ? (int)nf : (int)nt;
        snprintf(c->err, c->errlen, "cannot list extended attributes: %s", strerror(-rc));
        goto out;
    }
    for (ssize_t i = 0; rc == 0 && i < nf; i += (ssize_t)strlen(from + i) + 1) {
        const char *name = from + i;
        ssize_t vl = fgetxattr(c->rfd, name, NULL, 0);
        char *v = vl >= 0 ? realloc(val, (size_t)vl + 1) : NULL;
        if (vl >= 0 && !v) rc = -ENOMEM;
        else if (vl >= 0) val = v;
        if (vl >= 0 && rc == 0) vl = fgetxattr(c->rfd, name, val, (size_t)vl);
        if (vl < 0 || rc) {
            if (rc == 0) rc = -errno;
        } else if (fsetxattr(c->tfd, name, val, (size_t)vl, 0) < 0) {
            rc = -errno;
        }
        if (rc)
            snprintf(c->err, c->errlen, "cannot copy extended attribute %s: %s", name,
                     strerror(-rc));
    }
    /* what the temp got at creation (a directory's default ACL) but the original lacks */
    for (ssize_t i = 0; rc == 0 && i < nt; i += (ssize_t)strlen(to + i) + 1) {
        const char *name = to + i;
        if (!has_name(from, nf, name) && fremovexattr(c->tfd, name) < 0 &&
            strncmp(name, "security.", 9) != 0) {
            rc = -errno;
            snprintf(c->err, c->errlen, "cannot remove extended attribute %s: %s", name,
                     strerror(errno));
        }
    }
    if (rc == 0 && fchmod(c->tfd, st->st_mode & 07777) < 0) rc = -errno;
    struct timespec tv[2] = {st->st_atim, st->st_mtim};
    if (rc == 0 && futimens(c->tfd, tv) < 0) rc = -errno;
out:
    free(from);
    free(to);
    free(val);
    return rc;
}

/* ---- the final step ---------------------------------------------------------------- */

typedef struct {
    tk_fh *fh;
    int newfd;
} rk_handle;

/* Open handles of ino (under its write lock: none is added or released meanwhile).
 * A raw handle open for writing makes the rekey busy (-EBUSY). */
static int handles_of(tk_fs *fs, tk_inode *ino, rk_handle **out, size_t *n) {
    size_t cap = 0;
    int rc = 0;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&fs->fhs.mu);  /* other inodes' handles may go meanwhile */
    for (uint32_t s = 0; s < fs->fhs.next && rc == 0; s++) {
        tk_fh *fh = tk_slots_get(&fs->fhs, s);
        if (!fh || fh->kind != TK_FH_FILE || fh->ino != ino) continue;
        if (fh->view == TK_VIEW_RAW && fh->writable) {
            rc = -EBUSY;
            break;
        }
        if (*n == cap) {
            size_t nc = cap ? cap * 2 : 8;
            rk_handle *p = realloc(*out, nc * sizeof *p);
            if (!p) {
                rc = -ENOMEM;
                break;
            }
            *out = p;
            cap = nc;
        }
        (*out)[*n].fh = fh;
        (*out)[(*n)++].newfd = -1;
    }
    pthread_mutex_unlock(&fs->fhs.mu);
    return rc;
}

static int reopen_proc(int fd, int flags) {
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    int r = open(p, flags | O_CLOEXEC);
    return r < 0 ? -errno : r;
}

/* Everything under the write lock, from the last copy to the swap.  0 and *outcome. */
static int final_step(rk_ctx *c, uint64_t key_epoch, int *outcome) {
    tk_fs *fs = c->fs;
    tk_inode *ino = c->ino;
    struct tk_rekey *rk = &c->rk;
    rk_handle *hs = NULL;
    size_t nh = 0;
    int npath = -1, rc = 0, locked_mu = 0, incoming = 0;
    struct file_handle *h = NULL;
    struct stat nst;
    const uint64_t final_max = RK_FINAL_BYTES / c->sbs;

    if (interrupted(fs, outcome)) return 0;
    if (rk->busy) {
        *outcome = TK_REKEY_BUSY;
        return 0;
    }
    if ((rc = ensure_state(c, outcome)) != 0) return rc > 0 ? 0 : rc;
    const uint64_t size = ino->taka.size, nblk = (size + c->bs - 1) / c->bs;
    if (nblk > rk->next && nblk - rk->next > final_max) {
        *outcome = -1;  /* grew too much since: copy on under the read lock first */
        return 0;
    }
    /* what was added since the copy reached the end */
    const uint64_t w0 = c->written;
    if (nblk > rk->next) {
        rc = copy_range(c, &ino->taka, size, rk->next, nblk);
        if (rc == 0) rk->next = nblk;
    }
    if (rc) return rc;
    /* the stored length exact, and the header with the size and the count */
    if (ftruncate(c->tfd, (off_t)tk_taka_stored_size(size, c->bs)) < 0) return -errno;
    c->nt.size = size;
    if ((rc = tk_taka_put_header(&c->nt, c->tfd, c->enc))) return rc;
    c->written += TK_HDR_SIZE;
    c->paced += c->written - w0;
    struct stat ost, xst;
    if (fstat(c->rfd, &ost) < 0) return -errno;
    if (ost.st_nlink > 1) {  /* a link made during the copy */
        *outcome = TK_REKEY_HARDLINK;
        return 0;
    }
    if ((rc = copy_meta(c, &ost))) return rc;
    /* new backing fds for every open handle, opened before the swap so that nothing
     * can fail after it */
    rc = handles_of(fs, ino, &hs, &nh);
    if (rc == -EBUSY) {
        *outcome = TK_REKEY_BUSY;
        rc = 0;
        goto out;
    }
    int keep = O_ACCMODE | O_APPEND | O_DIRECT | O_NOATIME | O_SYNC | O_DSYNC;
    for (size_t i = 0; rc == 0 && i < nh; i++) {
        int fl = fcntl(hs[i].fh->fd, F_GETFL);
        if (fl < 0 || (hs[i].newfd = reopen_proc(c->tfd, fl & keep)) < 0)
            rc = fl < 0 ? -errno : hs[i].newfd;
    }
    if (rc == 0 && (npath = reopen_proc(c->tfd, O_PATH)) < 0) rc = npath;
    if (rc == 0 && fstat(npath, &nst) < 0) rc = -errno;
    if (rc == 0 && !ino->pinned && !(h = tk_handle_of(fs, npath))) rc = -EIO;
    if (rc == 0 && fsync(c->tfd) < 0) rc = -errno;
    if (rc) goto out;
    kill_point("synced");

    pthread_mutex_lock(&fs->rk_mu);
    locked_mu = 1;
    if (interrupted(fs, outcome)) goto out;
    tk_itab_incoming(fs, ino, &nst, h, 1);  /* a lookup of the name from now on: ino */
    incoming = 1;
    if (renameat2(c->dfd, c->tmpname, c->dfd, c->base, RENAME_EXCHANGE) < 0) {
        if (errno == ENOENT) *outcome = TK_REKEY_BUSY;  /* renamed away meanwhile */
        else rc = -errno;
        goto out;
    }
    /* the temp name must now hold the original: else the name was given to another
     * file meanwhile (a rename): put it back */
    if (fstatat(c->dfd, c->tmpname, &xst, AT_SYMLINK_NOFOLLOW) < 0 ||
        xst.st_dev != ost.st_dev || xst.st_ino != ost.st_ino) {
        if (renameat2(c->dfd, c->tmpname, c->dfd, c->base, RENAME_EXCHANGE) < 0) {
            rc = -errno;
            snprintf(c->err, c->errlen, "the name was replaced during the swap and could "
                     "not be swapped back (%s): %s holds the rekeyed copy, the temporary "
                     "%s the other file", strerror(errno), c->relpath, c->tmpname);
            c->tmpname[0] = 0;  /* never remove it */
        } else {
            *outcome = TK_REKEY_BUSY;
        }
        goto out;
    }
    kill_point("exchanged");

    /* the inode names the new object from now on (its shadow record too: right after
     * the exchange, so a successor after a kill reopens the right file); the old one is
     * retired */
    tk_itab_repoint(fs, ino, npath, &nst, h, c->rfd);
    npath = -1;
    h = NULL;
    c->rfd = -1;
    (void)fsync(c->dfd);
    kill_point("dir-synced");
    tk_taka_reset(&ino->taka);
    ino->taka = c->nt;
    memset(&c->nt, 0, sizeof c->nt);
    ino->taka.state = 1;
    ino->taka.epoch = key_epoch;  /* a key drop since then: loaded again at next use */
    ino->taka.phys_ok = 1;
    ino->taka.enc_used = c->enc;
    /* every open handle's fd number now names the new file (dup3 replaces atomically;
     * a request using the number meanwhile holds its own reference to the old one) */
    for (size_t i = 0; i < nh; i++) {
        (void)dup3(hs[i].newfd, hs[i].fh->fd, O_CLOEXEC);
        close(hs[i].newfd);
        hs[i].newfd = -1;
    }
    ino->rk = NULL;
    __atomic_fetch_add(&ino->rk_gen, 1, __ATOMIC_RELEASE);
    *outcome = TK_REKEY_DONE;
out:
    if (incoming) tk_itab_incoming(fs, ino, &nst, NULL, 0);  /* (hashed under it by now) */
    if (locked_mu) pthread_mutex_unlock(&fs->rk_mu);
    for (size_t i = 0; i < nh; i++)
        if (hs[i].newfd >= 0) close(hs[i].newfd);
    free(hs);
    if (npath >= 0) close(npath);
    free(h);
    return rc;
}

/* ---- one file ---------------------------------------------------------------------- */

static int bad_relpath(const char *p) {
    size_t len = strlen(p);
    if (len == 0 || len >= PATH_MAX || p[0] == '/' || p[len - 1] == '/') return 1;
    for (const char *s = p; *s;) {
        const char *e = strchr(s, '/');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n == 0 || n > NAME_MAX || (n == 1 && s[0] == '.') ||
            (n == 2 && s[0] == '.' && s[1] == '.') ||
            (s[0] == '.' && strncmp(s, TK_REKEY_PREFIX, sizeof TK_REKEY_PREFIX - 1) == 0))
            return 1;
        s += n + (e ? 1 : 0);
    }
    return 0;
}

/* The directory of relpath, beneath the backing root, no symlink followed: an fd (read
 * only: fsync needs one) and the last component in *base. */
static int open_dir(tk_fs *fs, char *path, const char **base) {
    char *slash = strrchr(path, '/');
    int dfd = openat(fs->root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return -errno;
    if (!slash) {
        *base = path;
        return dfd;
    }
    *slash = 0;
    *base = slash + 1;
    for (char *s = path; s && *s;) {
        char *e = strchr(s, '/');
        if (e) *e = 0;
        int nfd = openat(dfd, s, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int err = errno;
        close(dfd);
        if (nfd < 0) return err == ELOOP ? -ENOTDIR : -err;
        dfd = nfd;
        s = e ? e + 1 : NULL;
    }
    return dfd;
}

/* The target data key: `version`, or the current one (as new files get it: the same
 * tk_key_get for the guard point's key). */
static int target_key(tk_fs *fs, const char *name, uint32_t version, uint32_t *vout,
                      uint8_t key[32]) {
    if (version || strcmp(name, fs->key_name) == 0)
        return tk_key_get(fs, name, version, vout, key);
    /* another key's current version: only its backend knows it */
    if (!fs->cb.get_key) return -ENOKEY;
    uint32_t got = 0;
    int rc = fs->cb.get_key(fs->cb.ctx, name, 0, &got, key);
    if (rc == 0 && got == 0) rc = -ENOKEY;
    if (rc) OPENSSL_cleanse(key, 32);
    *vout = got;
    return rc;
}

static int rekey_one(tk_fs *fs, const char *relpath, uint32_t version, uint64_t rate,
                     uint32_t chunk_blocks, int *outcome, uint64_t *bytes, char *err,
                     size_t errlen) {
    rk_ctx cc, *c = &cc;
    memset(c, 0, sizeof *c);
    c->fs = fs;
    c->relpath = relpath;
    c->err = err;
    c->errlen = errlen;
    c->rfd = c->tfd = -1;
    c->rate = rate;
    int rc = 0, pinned_rk = 0;
    char *path = strdup(relpath);
    if (!path) return -ENOMEM;
    c->dfd = open_dir(fs, path, &c->base);
    if (c->dfd < 0) {
        rc = c->dfd;
        snprintf(err, errlen, "%s: %s", relpath, strerror(-rc));
        free(path);
        return rc;
    }
    struct stat st;
    int pfd = openat(c->dfd, c->base, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (pfd < 0 || fstat(pfd, &st) < 0) {
        rc = -errno;
        if (pfd >= 0) close(pfd);
        snprintf(err, errlen, "%s: %s", relpath, strerror(-rc));
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        close(pfd);
        *outcome = TK_REKEY_NOT_REGULAR;
        goto done;
    }
    if (st.st_nlink > 1) {  /* another name would keep the old file */
        close(pfd);
        *outcome = TK_REKEY_HARDLINK;
        goto done;
    }
    c->ino = tk_itab_pin(fs, pfd, &st);  /* takes pfd */
    if (!c->ino) {
        rc = errno == EAGAIN ? 0 : -ENOMEM;
        if (errno == EAGAIN) *outcome = TK_REKEY_BUSY;  /* swapped by another rekey */
        goto done;
    }
    tk_inode *ino = c->ino;

    /* the original: its header verified (its key got) under the write lock */
    char name[TK_KEYID_MAX + 1];
    uint32_t fver = 0;
    pthread_rwlock_wrlock(&ino->lock);
    if (ino->rk) {
        *outcome = TK_REKEY_BUSY;  /* another rekey of it runs */
    } else {
        int fd = tk_inode_fd(fs, ino);
        if (fd >= 0) {
            char p[64];
            snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
            c->rfd = open(p, O_RDONLY | O_NOATIME | O_CLOEXEC);
            if (c->rfd < 0 && errno == EPERM) c->rfd = open(p, O_RDONLY | O_CLOEXEC);
            rc = c->rfd < 0 ? -errno : 0;
            tk_inode_put(fs, ino);
        } else {
            rc = fd;
        }
        if (rc == 0 && !tk_taka_valid(fs, &ino->taka)) rc = tk_taka_load(fs, ino, c->rfd);
        if (rc == 0) {
            memcpy(c->hdr0, ino->taka.aad, TK_HDR_STATIC);
            c->bs = ino->taka.bs;
            /* the oldest version any block may have: v1's one version, v2's lower end */
            fver = ino->taka.oldest;
        }
    }
    pthread_rwlock_unlock(&ino->lock);
    if (rc == -EBADMSG) {
        snprintf(err, errlen, "%s: the TAKA header does not verify: the file is left as "
                 "it is", relpath);
        TK_INC(fs, integrity_failures, 1);
        tk_ident none = {0};
        tk_audit(fs, "integrity", &none, relpath, "rekey",
                 0, "invalid or unauthenticated TAKA header");
        rc = -EIO;
    } else if (rc == -EKEYREJECTED || rc == -ENOKEY) {
        snprintf(err, errlen, "%s: the key of its header is unavailable", relpath);
        rc = -ENOKEY;
    } else if (rc) {
        snprintf(err, errlen, "%s: %s", relpath, strerror(-rc));
    }
    if (rc || *outcome != TK_REKEY_DONE) goto done;
    memcpy(name, c->hdr0 + 33, c->hdr0[32]);
    name[c->hdr0[32]] = 0;

    /* the target key; already there (or newer): nothing to do */
    uint8_t key[32];
    uint32_t tver = 0;
    uint64_t key_epoch = __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
    rc = target_key(fs, name, version, &tver, key);
    if (rc) {
        snprintf(err, errlen, "%s: key %s version %s%u is unavailable", relpath, name,
                 version ? "" : "current ", version);
        rc = rc == -EACCES ? -EACCES : -ENOKEY;
        goto done;
    }
    if (fver >= tver) {
        OPENSSL_cleanse(key, sizeof key);
        *outcome = TK_REKEY_CURRENT;
        goto done;
    }
    /* the copy is made in the guard point's format (a v1 file becomes v2 under
     * format 2: docs/file-format.md, "Version 2") */
    rc = tk_taka_init_new(&c->nt, name, tver, key, c->bs,
                          fs->cfg.format_version == 2 ? 2 : 1);
    OPENSSL_cleanse(key, sizeof key);
    if (rc) goto done;

    /* buffers for one chunk */
    c->sbs = c->bs + OVH;
    c->cap = chunk_blocks ? chunk_blocks : 256;
    if (c->cap * c->sbs > RK_CHUNK_BYTES)
        c->cap = RK_CHUNK_BYTES / c->sbs ? RK_CHUNK_BYTES / c->sbs : 1;
    c->raw = malloc((size_t)(c->cap * c->sbs));
    c->plain = malloc((size_t)(c->cap * c->bs));
    c->out = malloc((size_t)(c->cap * c->sbs));
    c->zero = calloc(1, (size_t)c->sbs);
    c->hole = malloc((size_t)c->cap);
    if (!c->raw || !c->plain || !c->out || !c->zero || !c->hole) {
        rc = -ENOMEM;
        goto done;
    }

    /* the temporary, beside the file */
    for (int tries = 0; tries < 8 && c->tfd < 0; tries++) {
        uint64_t r = 0;
        if (getrandom(&r, sizeof r, 0) != sizeof r) {
            rc = -EIO;
            goto done;
        }
        snprintf(c->tmpname, sizeof c->tmpname, TK_REKEY_PREFIX "tmp.%016llx",
                 (unsigned long long)r);
        c->tfd = openat(c->dfd, c->tmpname,
                        O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (c->tfd < 0 && errno != EEXIST) break;
    }
    if (c->tfd < 0) {
        rc = -errno;
        c->tmpname[0] = 0;
        snprintf(err, errlen, "%s: cannot create a temporary file beside it: %s", relpath,
                 strerror(-rc));
        goto done;
    }

    /* start tracking changes: from here on the paths that change blocks mark them */
    pthread_rwlock_wrlock(&ino->lock);
    int st0 = 0;
    rc = ino->rk ? 0 : ensure_state(c, &st0);
    if (ino->rk) {
        *outcome = TK_REKEY_BUSY;
    } else if (rc > 0) {
        *outcome = st0;
        rc = 0;
    } else if (rc == 0) {
        rk_handle *hs = NULL;
        size_t nh = 0;
        int hr = handles_of(fs, ino, &hs, &nh);
        free(hs);
        if (hr == -EBUSY) {
            *outcome = TK_REKEY_BUSY;  /* a raw writer has it open */
        } else if (hr) {
            rc = hr;
        } else {
            c->rk.bs = c->bs;
            c->rk.ctx = c;
            ino->rk = &c->rk;
            pinned_rk = 1;
        }
    }
    pthread_rwlock_unlock(&ino->lock);
    if (rc || *outcome != TK_REKEY_DONE) goto done;

    c->t0 = now_ns();
    pthread_rwlock_rdlock(&ino->lock);
    c->budget = 2 * ((ino->taka.size + c->bs - 1) / c->bs) + 64;
    pthread_rwlock_unlock(&ino->lock);
    for (int tries = 0;;) {
        int oc = -1;
        rc = copy_loop(c, &oc);
        if (rc || oc != -1) {
            if (oc != -1) *outcome = oc;
            break;
        }
        pthread_rwlock_wrlock(&ino->lock);
        rc = final_step(c, key_epoch, &oc);
        if (rc || oc != -1) {  /* over (done: final_step cleared it with the swap) */
            ino->rk = NULL;
            pinned_rk = 0;
        }
        rk_cleanse(c);
        pthread_rwlock_unlock(&ino->lock);
        if (rc == 0 && oc == -1) {  /* too much changed meanwhile: more rounds first */
            if (++tries < RK_FINAL_TRIES) continue;
            *outcome = TK_REKEY_BUSY;  /* (tracking ends below) */
            break;
        }
        if (rc == 0) *outcome = oc;
        break;
    }

done:
    if (rc == -EBADMSG) {
        char d[96];
        snprintf(d, sizeof d, "block %llu failed authentication", (unsigned long long)c->bad);
        snprintf(err, errlen, "%s: %s: the file is left as it is", relpath, d);
        TK_INC(fs, integrity_failures, 1);
        tk_ident none = {0};
        tk_audit(fs, "integrity", &none, relpath, "rekey", 0, d);
        rc = -EIO;
    } else if (rc && !err[0]) {
        snprintf(err, errlen, "%s: %s", relpath, strerror(-rc));
    }
    if (pinned_rk) {
        pthread_rwlock_wrlock(&c->ino->lock);
        c->ino->rk = NULL;
        pthread_rwlock_unlock(&c->ino->lock);
    }
    int swapped = rc == 0 && *outcome == TK_REKEY_DONE;
    if (c->tfd >= 0) close(c->tfd);
    /* the temp name: the copy (given up), or the old file (swapped) */
    if (c->tmpname[0]) unlinkat(c->dfd, c->tmpname, 0);
    if (swapped) {
        *bytes = c->paced;  /* the copy's own bytes: not the writes mirrored for
                             * applications (they are counted in rekey_bytes) */
        TK_INC(fs, rekey_files, 1);
        TK_INC(fs, rekey_bytes, c->written);
        /* the raw node's bytes changed: drop its cached pages; the plaintext did not
         * change, only its attributes (inode number, ctime) */
        if (__atomic_load_n(&c->ino->node[TK_VIEW_RAW].nlookup, __ATOMIC_RELAXED))
            tk_inval_data_async(fs, tk_nodeid(fs, c->ino, TK_VIEW_RAW));
        if (fs->cfg.meta_timeout > 0 &&
            __atomic_load_n(&c->ino->node[TK_VIEW_PLAIN].nlookup, __ATOMIC_RELAXED))
            fuse_lowlevel_notify_inval_inode(fs->se, tk_nodeid(fs, c->ino, TK_VIEW_PLAIN),
                                             -1, 0);
    }
    if (c->rfd >= 0) close(c->rfd);
    if (c->plain) OPENSSL_cleanse(c->plain, (size_t)(c->cap * c->bs));
    free(c->raw);
    free(c->plain);
    free(c->out);
    free(c->zero);
    free(c->hole);
    tk_taka_reset(&c->nt);
    if (c->ino) tk_itab_unpin(fs, c->ino);
    close(c->dfd);
    free(path);
    if (swapped) {  /* the final step's bytes count for the rate too (no lock held) */
        int ignored;
        pace(c, &ignored);
    }
    return rc;
}

int tk_fs_rekey_file(tk_fs *fs, const char *relpath, uint32_t version, uint64_t rate,
                     uint32_t chunk_blocks, int *outcome, uint64_t *bytes, char *err,
                     size_t errlen) {
    *outcome = TK_REKEY_DONE;
    *bytes = 0;
    err[0] = 0;
    if (bad_relpath(relpath)) {
        snprintf(err, errlen, "%s: not a path relative to the backing directory (no "
                 "leading /, no . or .. or empty components, no " TK_REKEY_PREFIX
                 " names)", relpath);
        return -EINVAL;
    }
    pthread_mutex_lock(&fs->rk_mu);
    if (!fs->mounted || __atomic_load_n(&fs->rk_stop, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&fs->rk_mu);
        snprintf(err, errlen, "the guard point is not mounted");
        return -ENOTCONN;
    }
    if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST) || fs->ho_done) {
        pthread_mutex_unlock(&fs->rk_mu);
        *outcome = TK_REKEY_BUSY;
        return 0;
    }
    if (__atomic_load_n(&fs->rk_cancel, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&fs->rk_mu);
        *outcome = TK_REKEY_CANCELLED;  /* paused or stopping: not even begun */
        return 0;
    }
    fs->rk_active++;
    pthread_mutex_unlock(&fs->rk_mu);
    tk_itab_retired_expire(fs, 0);
    int rc = rekey_one(fs, relpath, version, rate, chunk_blocks, outcome, bytes, err, errlen);
    pthread_mutex_lock(&fs->rk_mu);
    fs->rk_active--;
    pthread_cond_broadcast(&fs->rk_cv);
    pthread_mutex_unlock(&fs->rk_mu);
    return rc;
}
