/*
 * fuse_handover.c -- a guard point outlives its process: hand the FUSE connection and
 * the state needed to go on serving it to a successor (docs/guard-points.md,
 * "Restarts without unmounting").
 *
 * The kernel knows a FUSE server by what it handed out: node ids, file handles, and
 * (FUSE over io_uring) the addresses of each ring entry's buffers.  All three are
 * made reproducible: node ids and file handles are slot numbers (fuse_inode.c), and
 * the ring buffers live in a memfd mapped at the same address in both processes
 * (fuse_uring.c).  A handover:
 *
 *   1. quiesce: classic readers stop taking requests (the ones in read(2) are kicked
 *      out with a signal), the requests they hold are finished; every ring entry is
 *      parked holding one unanswered request (idle entries get a lookup of our own);
 *      requests arriving meanwhile wait in the kernel;
 *   2. the state below and the fds (the /dev/fuse fd, the backing root, the ring
 *      memfd, pinned inodes) go to the successor (over a Unix socket, or systemd's
 *      file descriptor store);
 *   3. the successor rebuilds the tables in the same slots, reopens open files by
 *      file handle, replays the kernel's INIT request to its own libfuse session
 *      (the reply is dropped: the kernel negotiated once), answers the parked
 *      requests and takes the ring entries over by committing them;
 *   4. the predecessor lets go without unmounting; or, if the successor failed,
 *      resumes serving (tk_fs_handover_abort).
 *
 * State (little-endian, all lengths bounded and checked on decode; fuzzed):
 *   "TKHO" u32 version | u32 flags | str mountpoint | str backing | u64 root dev, ino
 *   | u32 init_len, init bytes | u32 n, inode records | u32 n, handle records
 *   | ring: i32 fd index, u64 base, u32 nthreads, u32 per, u64 cap, nthreads bytes
 * inode: u32 slot, u32 parent slot (~0: none), u32 type, u64 dev, u64 ino,
 *   u64 nlookup[2], u8 hashed, i32 fd index (-1: by handle), i32 handle type,
 *   u32 handle bytes, bytes, u32 name len (~0: none), name
 * handle: u32 slot, u8 kind, u32 inode slot, u8 view, i32 fd flags, u8 append,
 *   u8 writable
 */
#include "fuse_int.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HO_MAGIC "TKHO"
#define HO_VERSION 1u
#define HO_F_KILLPRIV_V2 TK_HO_KILLPRIV_V2
#define HO_F_URING TK_HO_URING
#define HO_MAX_NAME 4096u
#define HO_MAX_INIT 4096u
#define HO_KICK_SIG (SIGRTMIN + 6)

/* ---- the classic readers' side ------------------------------------------------------ */

unsigned tk_ho_register_reader(tk_fs *fs) {
    pthread_mutex_lock(&fs->ho_mu);
    unsigned idx = (unsigned)fs->ho_nreaders;
    if (fs->ho_nreaders == fs->ho_capreaders) {
        size_t cap = fs->ho_capreaders ? fs->ho_capreaders * 2 : 16;
        pthread_t *p = realloc(fs->ho_readers, cap * sizeof *p);
        if (p) {
            fs->ho_readers = p;
            fs->ho_capreaders = cap;
        }
    }
    if (fs->ho_nreaders < fs->ho_capreaders) fs->ho_readers[fs->ho_nreaders++] = pthread_self();
    else idx = UINT32_MAX;
    pthread_mutex_unlock(&fs->ho_mu);
    return idx;
}

static void unlock_mu(void *mu) {
    pthread_mutex_unlock(mu);
}

void tk_ho_wait(tk_fs *fs) {
    pthread_mutex_lock(&fs->ho_mu);
    pthread_cleanup_push(unlock_mu, &fs->ho_mu);  /* libfuse cancels idle workers */
    while (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST))
        pthread_cond_wait(&fs->ho_cv, &fs->ho_mu);
    pthread_cleanup_pop(1);
}

static void kick_handler(int sig) {
    (void)sig;  /* only to end a read(2) with EINTR */
}

static void kick_install_once(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;  /* no SA_RESTART: read(2) returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(HO_KICK_SIG, &sa, NULL);
}

static void install_kick(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, kick_install_once);
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Stop the classic readers: none in read(2), no request held.  0 or -ETIMEDOUT. */
static int quiesce_classic(tk_fs *fs, int timeout_ms) {
    install_kick();
    uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        if (__atomic_load_n(&fs->ho_in_read, __ATOMIC_SEQ_CST) == 0 &&
            __atomic_load_n(&fs->ho_busy, __ATOMIC_SEQ_CST) == 0)
            return 0;
        if (now_ms() > deadline) return -ETIMEDOUT;
        pthread_mutex_lock(&fs->ho_mu);
        for (size_t i = 0; i < fs->ho_nreaders; i++) pthread_kill(fs->ho_readers[i], HO_KICK_SIG);
        pthread_mutex_unlock(&fs->ho_mu);
        struct timespec d = {0, 1000000};
        nanosleep(&d, NULL);
    }
}

/* ---- creates a killed predecessor may not have answered ----------------------------- */

void tk_add_recovered(tk_fs *fs, uint64_t dev, uint64_t ino) {
    pthread_mutex_lock(&fs->ho_mu);
    uint64_t (*p)[2] = realloc(fs->recovered, (fs->nrecovered + 1) * sizeof *p);
    if (p) {
        fs->recovered = p;
        p[fs->nrecovered][0] = dev;
        p[fs->nrecovered][1] = ino;
        fs->nrecovered++;
    }
    pthread_mutex_unlock(&fs->ho_mu);
}

int tk_recovered_create(tk_fs *fs, int pfd, const char *name) {
    if (!__atomic_load_n(&fs->nrecovered, __ATOMIC_RELAXED)) return 0;
    struct stat st;
    if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) return 0;
    int found = 0;
    pthread_mutex_lock(&fs->ho_mu);
    for (size_t i = 0; i < fs->nrecovered && !found; i++) {
        if (fs->recovered[i][0] == (uint64_t)st.st_dev && fs->recovered[i][1] == (uint64_t)st.st_ino) {
            fs->recovered[i][0] = fs->recovered[fs->nrecovered - 1][0];
            fs->recovered[i][1] = fs->recovered[fs->nrecovered - 1][1];
            fs->nrecovered--;
            found = 1;
        }
    }
    pthread_mutex_unlock(&fs->ho_mu);
    return found;
}

/* ---- encoding ----------------------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t len, cap;
    int oom;
} obuf;

static void put(obuf *b, const void *v, size_t n) {
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, v, n);
    b->len += n;
}
static void put8(obuf *b, uint8_t v) { put(b, &v, 1); }
static void put32(obuf *b, uint32_t v) { put(b, &v, 4); }
static void put64(obuf *b, uint64_t v) { put(b, &v, 8); }
static void putstr(obuf *b, const char *s) {
    if (!s) {
        put32(b, UINT32_MAX);
        return;
    }
    put32(b, (uint32_t)strlen(s));
    put(b, s, strlen(s));
}

typedef struct {
    int *v;
    size_t n, cap;
} fdlist;

static int fd_add(fdlist *l, int fd) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        int *v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n] = fd;
    return (int)l->n++;
}

static void put_inode(obuf *b, tk_fs *fs, tk_inode *ino) {
    put32(b, ino->slot);
    put32(b, ino->parent ? ino->parent->slot : UINT32_MAX);
    put32(b, (uint32_t)ino->type);
    put64(b, (uint64_t)ino->dev);
    put64(b, (uint64_t)ino->ino);
    put64(b, ino->node[0].nlookup);
    put64(b, ino->node[1].nlookup);
    put8(b, (uint8_t)ino->hashed);
    /* a pinned inode (no usable file handle) is found again by its name under its
     * parent (tk_itab_restore): its O_PATH fd is never passed (systemd's fd store
     * refuses O_PATH fds) */
    put32(b, (uint32_t)(ino->pinned && ino != fs->root ? -2 : -1));
    if (ino->handle) {
        put32(b, (uint32_t)ino->handle->handle_type);
        put32(b, ino->handle->handle_bytes);
        put(b, ino->handle->f_handle, ino->handle->handle_bytes);
    } else {
        put32(b, 0);
        put32(b, 0);
    }
    putstr(b, ino->name);
}

static int encode(tk_fs *fs, obuf *b, fdlist *fds) {
    put(b, HO_MAGIC, 4);
    put32(b, HO_VERSION);
    uint32_t flags = 0;
    if (__atomic_load_n(&fs->st.killpriv_v2, __ATOMIC_RELAXED)) flags |= HO_F_KILLPRIV_V2;
    if (fs->uring_offered) flags |= HO_F_URING;
    put32(b, flags);
    putstr(b, fs->mountpoint);
    putstr(b, fs->backing);
    put64(b, (uint64_t)fs->root->dev);
    put64(b, (uint64_t)fs->root->ino);
    put32(b, (uint32_t)fs->init_req_len);
    put(b, fs->init_req, fs->init_req_len);
    /* inodes (the root too: its name-less record carries nothing but is checked) */
    pthread_mutex_lock(&fs->itab_mu);
    uint32_t n = 0;
    size_t at = b->len;
    put32(b, 0);
    /* (not an inode only a rekey holds: the kernel knows no node of it) */
    for (size_t i = 0; i < fs->nbuckets; i++)
        for (tk_inode *p = fs->buckets[i]; p; p = p->hnext)
            if (!p->internal) {
                put_inode(b, fs, p);
                n++;
            }
    for (tk_inode *p = fs->stale; p; p = p->hnext)
        if (!p->internal) {
            put_inode(b, fs, p);
            n++;
        }
    pthread_mutex_unlock(&fs->itab_mu);
    if (!b->oom) memcpy(b->p + at, &n, 4);
    /* open files and directories */
    n = 0;
    at = b->len;
    put32(b, 0);
    pthread_mutex_lock(&fs->fhs.mu);
    for (uint32_t s = 0; s < fs->fhs.next; s++) {
        void *o = tk_slots_get(&fs->fhs, s);
        if (!o) continue;
        int kind = *(int *)o;
        put32(b, s);
        put8(b, (uint8_t)kind);
        if (kind == TK_FH_FILE) {
            tk_fh *fh = o;
            put32(b, fh->ino->slot);
            put8(b, (uint8_t)fh->view);
            put32(b, (uint32_t)fcntl(fh->fd, F_GETFL));
            put8(b, (uint8_t)fh->append);
            put8(b, (uint8_t)fh->writable);
        } else {
            tk_dir *d = o;
            put32(b, d->ino->slot);
            put8(b, 0);
            put32(b, 0);
            put8(b, 0);
            put8(b, 0);
        }
        n++;
    }
    pthread_mutex_unlock(&fs->fhs.mu);
    if (!b->oom) memcpy(b->p + at, &n, 4);
    /* the ring */
    tk_ring_state r;
    int has = tk_uring_describe(fs, &r);
    if (has < 0) return has;
    put32(b, (uint32_t)(has ? fd_add(fds, r.memfd) : -1));
    put64(b, (uint64_t)r.base);
    put32(b, r.nthreads);
    put32(b, r.per);
    put64(b, (uint64_t)r.cap);
    if (has) put(b, r.parked, r.nthreads);
    free(r.parked);
    return b->oom ? -ENOMEM : 0;
}

/* ---- decoding ----------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t len, at;
    int bad;
} ibuf;

static const uint8_t *get(ibuf *b, size_t n) {
    if (b->bad || n > b->len - b->at) {
        b->bad = 1;
        return NULL;
    }
    const uint8_t *p = b->p + b->at;
    b->at += n;
    return p;
}
static uint8_t get8(ibuf *b) {
    const uint8_t *p = get(b, 1);
    return p ? *p : 0;
}
static uint32_t get32(ibuf *b) {
    uint32_t v = 0;
    const uint8_t *p = get(b, 4);
    if (p) memcpy(&v, p, 4);
    return v;
}
static uint64_t get64(ibuf *b) {
    uint64_t v = 0;
    const uint8_t *p = get(b, 8);
    if (p) memcpy(&v, p, 8);
    return v;
}
/* malloc'd NUL-terminated copy, NULL for "none" (or bad: b->bad is set) */
static char *getstr(ibuf *b) {
    uint32_t n = get32(b);
    if (n == UINT32_MAX || b->bad) return NULL;
    if (n > HO_MAX_NAME) {
        b->bad = 1;
        return NULL;
    }
    const uint8_t *p = get(b, n);
    if (!p || memchr(p, 0, n)) {
        b->bad = 1;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s) {
        b->bad = 1;
        return NULL;
    }
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

void tk_ho_state_free(tk_ho_state *st) {
    if (!st) return;
    for (size_t i = 0; i < st->ninodes; i++) {
        free(st->inodes[i].handle);
        free(st->inodes[i].alt_handle);
        free(st->inodes[i].name);
    }
    free(st->inodes);
    free(st->fhs);
    free(st->mountpoint);
    free(st->backing);
    free(st->init);
    free(st->ring.parked);
    memset(st, 0, sizeof *st);
}

int tk_ho_decode(const uint8_t *data, size_t len, size_t nfds, tk_ho_state *st,
                 char *err, size_t errlen) {
    ibuf b = {data, len, 0, 0};
    memset(st, 0, sizeof *st);
    st->ring.memfd = -1;
    const uint8_t *m = get(&b, 4);
    if (!m || memcmp(m, HO_MAGIC, 4) != 0) {
        snprintf(err, errlen, "not a takakrypt handover state");
        return -EINVAL;
    }
    uint32_t version = get32(&b);
    if (version != HO_VERSION) {
        snprintf(err, errlen, "handover state version %u, this engine reads %u", version,
                 HO_VERSION);
        return -EPROTO;
    }
    st->flags = get32(&b);
    st->mountpoint = getstr(&b);
    st->backing = getstr(&b);
    st->root_dev = get64(&b);
    st->root_ino = get64(&b);
    st->init_len = get32(&b);
    if (st->init_len < 40 + 16 || st->init_len > HO_MAX_INIT) b.bad = 1;
    const uint8_t *ip = b.bad ? NULL : get(&b, st->init_len);
    if (ip && (st->init = malloc(st->init_len))) memcpy(st->init, ip, st->init_len);
    else b.bad = 1;
    uint32_t n = get32(&b);
    if (n > len / 40) b.bad = 1;  /* a record takes more than 40 bytes */
    if (!b.bad && n) {
        st->inodes = calloc(n, sizeof *st->inodes);
        if (!st->inodes) b.bad = 1;
    }
    for (uint32_t i = 0; i < n && !b.bad; i++) {
        tk_ho_inode *r = &st->inodes[i];
        st->ninodes = i + 1;
        r->slot = get32(&b);
        r->parent = get32(&b);
        r->type = get32(&b);
        r->dev = get64(&b);
        r->ino = get64(&b);
        r->nlookup[0] = get64(&b);
        r->nlookup[1] = get64(&b);
        r->hashed = get8(&b);
        r->fd_index = (int32_t)get32(&b);
        int32_t htype = (int32_t)get32(&b);
        uint32_t hbytes = get32(&b);
        if (hbytes > MAX_HANDLE_SZ || r->fd_index < -2 || (r->fd_index >= 0 &&
            (size_t)r->fd_index >= nfds) ||
            (hbytes == 0) != (r->fd_index >= 0 || r->fd_index == -2 || r->slot == 0) ||
            r->slot >= ((uint32_t)1 << 30) || r->hashed > 1) {
            b.bad = 1;
            break;
        }
        const uint8_t *hp = get(&b, hbytes);
        if (hbytes && hp) {
            r->handle = malloc(sizeof *r->handle + hbytes);
            if (!r->handle) {
                b.bad = 1;
                break;
            }
            r->handle->handle_type = htype;
            r->handle->handle_bytes = hbytes;
            memcpy(r->handle->f_handle, hp, hbytes);
        }
        r->name = getstr(&b);
    }
    n = get32(&b);
    if (n > len / 15) b.bad = 1;
    if (!b.bad && n) {
        st->fhs = calloc(n, sizeof *st->fhs);
        if (!st->fhs) b.bad = 1;
    }
    for (uint32_t i = 0; i < n && !b.bad; i++) {
        tk_ho_fh *h = &st->fhs[i];
        st->nfhs = i + 1;
        h->slot = get32(&b);
        h->kind = get8(&b);
        h->inode = get32(&b);
        h->view = get8(&b);
        h->fdflags = (int32_t)get32(&b);
        h->append = get8(&b);
        h->writable = get8(&b);
        if ((h->kind != TK_FH_FILE && h->kind != TK_FH_DIR) || h->view >= TK_NVIEWS ||
            h->slot >= ((uint32_t)1 << 30))
            b.bad = 1;
    }
    int32_t rfd = (int32_t)get32(&b);
    st->ring.base = (uintptr_t)get64(&b);
    st->ring.nthreads = get32(&b);
    st->ring.per = get32(&b);
    st->ring.cap = (size_t)get64(&b);
    if (rfd >= 0) {
        if ((size_t)rfd >= nfds || st->ring.nthreads == 0 || st->ring.nthreads > 65536) {
            b.bad = 1;
        } else {
            const uint8_t *pp = get(&b, st->ring.nthreads);
            st->ring.parked = pp ? malloc(st->ring.nthreads) : NULL;
            if (st->ring.parked) memcpy(st->ring.parked, pp, st->ring.nthreads);
            else b.bad = 1;
            st->ring.memfd = rfd;  /* an index until the caller maps it to an fd */
        }
    } else if (rfd != -1) {
        b.bad = 1;
    }
    if (!b.bad && b.at != len) b.bad = 1;
    if (b.bad || !st->mountpoint || !st->backing) {
        tk_ho_state_free(st);
        snprintf(err, errlen, "handover state is damaged or truncated");
        return -EINVAL;
    }
    return 0;
}

/* ---- begin / abort / done ----------------------------------------------------------- */

int tk_fs_handover_begin(tk_fs *fs, int **fds_out, size_t *nfds_out, uint8_t **state_out,
                         size_t *len_out, char *err, size_t errlen) {
    *fds_out = NULL;
    *state_out = NULL;
    *nfds_out = *len_out = 0;
    if (!tk_fs_is_mounted(fs) || fs->ho_done || !fs->init_req) {
        snprintf(err, errlen, "the guard point is not served by this process");
        return -EINVAL;
    }
    if (__atomic_exchange_n(&fs->ho_quiesce, 1, __ATOMIC_SEQ_CST)) {
        snprintf(err, errlen, "a handover of this guard point is already under way");
        return -EBUSY;
    }
    int rc = quiesce_classic(fs, 10000);
    if (rc == 0) rc = tk_uring_park_all(fs, 10000);
    if (rc == 0) tk_rekey_handover_wait(fs);  /* no rekey swap half done */
    if (rc) {
        snprintf(err, errlen, "requests in progress did not finish within 10 s");
        tk_fs_handover_abort(fs);
        return rc;
    }
    obuf b = {0};
    fdlist fds = {0};
    fd_add(&fds, fuse_session_fd(fs->se));
    /* not the O_PATH root fd: systemd's fd store polls what it keeps and refuses an
     * O_PATH fd (EBADF); a plain directory fd on the same directory serves alike */
    fd_add(&fds, fs->handle_fd >= 0 ? fs->handle_fd : fs->root_fd);
    rc = fds.n == 2 ? encode(fs, &b, &fds) : -ENOMEM;
    if (rc) {
        free(b.p);
        free(fds.v);
        snprintf(err, errlen, "cannot record the guard point's state: %s", strerror(-rc));
        tk_fs_handover_abort(fs);
        return rc;
    }
    *fds_out = fds.v;
    *nfds_out = fds.n;
    *state_out = b.p;
    *len_out = b.len;
    return 0;
}

void tk_fs_handover_abort(tk_fs *fs) {
    pthread_mutex_lock(&fs->ho_mu);
    if (!fs->ho_done) {
        __atomic_store_n(&fs->ho_quiesce, 0, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&fs->ho_cv);
    }
    pthread_mutex_unlock(&fs->ho_mu);
}

void tk_fs_handover_done(tk_fs *fs) {
    pthread_mutex_lock(&fs->ho_mu);
    if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST)) fs->ho_done = 1;
    pthread_cond_broadcast(&fs->ho_cv);  /* parked ring threads end */
    pthread_mutex_unlock(&fs->ho_mu);
}
