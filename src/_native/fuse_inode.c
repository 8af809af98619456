/*
 * fuse_inode.c -- the inode table: backing (st_dev, st_ino) -> tk_inode, and the
 * kernel's node ids.
 *
 * Like libfuse's passthrough_ll, all access goes through *at() calls relative to
 * O_PATH fds on the backing objects, never through the mount path.  Unlike it, a
 * regular file has TWO node ids, one per view (plaintext, raw): lookup routes each
 * caller to the node of its view, so the kernel keeps a separate page cache and
 * i_size per view.  A node id is the address of the tk_node inside its tk_inode
 * (FUSE_ROOT_ID is the root's plaintext node).
 *
 * Bounded fds: the kernel may remember any number of inodes (a tree of a million
 * files), but RLIMIT_NOFILE is fixed.  So an inode is identified by a kernel FILE
 * HANDLE (name_to_handle_at; inode number + generation, stable across renames) and
 * (st_dev, st_ino); its O_PATH fd lives in an LRU of at most fd_cap fds and is
 * reopened with open_by_handle_at(handle_fd, ...) (needs CAP_DAC_READ_SEARCH) on a
 * miss.  A handle whose object is gone reopens with ESTALE: the operation gets ENOENT.
 * Operations borrow the fd (tk_inode_fd .. tk_inode_put); a borrowed fd is never
 * evicted, so the LRU may exceed fd_cap by the fds borrowed at that moment (a few per
 * worker thread).  Pinned (fd kept for the inode's lifetime, as before): the root,
 * and objects without a usable handle (a file system without export support, or on
 * another mount below the backing directory).
 *
 * Reuse of inode numbers: while an O_PATH fd is open the object cannot be freed, so a
 * cached (or pinned) fd proves that (st_dev, st_ino) still names the same object.  An
 * inode WITHOUT a cached fd may have been deleted and its number reused by a new
 * object: lookup compares the file handles (the generation differs) and, if they do,
 * unhashes the old tk_inode (it stays valid for the node ids the kernel still holds:
 * their operations get ENOENT) and adds a new one.
 *
 * Lifetime: refs = kernel lookups of both nodes + children whose name points here +
 * 1 for the root.  The kernel never uses a node id after its last forget, so an
 * inode is freed (under itab_mu) when refs reaches zero; its fd, if cached, is closed.
 *
 * Names: each inode remembers its most recent (parent, name) for policy paths;
 * rename and lookup update it.  A hard-linked file is named by its last lookup.
 *
 * Locks: itab_mu (table, names, refs) before fdc_mu (LRU, fd, fd_users).
 */
#include "fuse_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define TK_FD_CACHE_DEFAULT 4096
#define TK_FD_CACHE_MIN     16
#define TK_EVICT_BATCH      8

#define GAUGE(fs, field, v) __atomic_store_n(&(fs)->st.field, (uint64_t)(v), __ATOMIC_RELAXED)

static size_t hash_of(const tk_fs *fs, dev_t dev, ino_t ino) {
    uint64_t h = ((uint64_t)ino * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)dev * 0xff51afd7ed558ccdULL);
    return (size_t)(h ^ (h >> 29)) & (fs->nbuckets - 1);
}

static tk_inode *find_locked(tk_fs *fs, dev_t dev, ino_t ino) {
    for (tk_inode *p = fs->buckets[hash_of(fs, dev, ino)]; p; p = p->hnext)
        if (p->ino == ino && p->dev == dev) return p;
    return NULL;
}

static void grow_locked(tk_fs *fs) {
    size_t nb = fs->nbuckets * 2;
    tk_inode **b = calloc(nb, sizeof *b);
    if (!b) return;  /* keep the old table: longer chains, still correct */
    tk_inode **old = fs->buckets;
    size_t oldn = fs->nbuckets;
    fs->buckets = b;
    fs->nbuckets = nb;
    for (size_t i = 0; i < oldn; i++) {
        tk_inode *p = old[i];
        while (p) {
            tk_inode *next = p->hnext;
            size_t h = hash_of(fs, p->dev, p->ino);
            p->hnext = b[h];
            b[h] = p;
            p = next;
        }
    }
    free(old);
}

/* ---- slot tables ------------------------------------------------------------------ */

#define SLOT_MASK ((1u << TK_SLOT_BITS) - 1)

void tk_slots_init(tk_slots *s) {
    memset(s->chunk, 0, sizeof s->chunk);
    pthread_mutex_init(&s->mu, NULL);
    s->next = 0;
    s->free = NULL;
    s->nfree = s->capfree = 0;
}

void tk_slots_destroy(tk_slots *s) {
    for (size_t i = 0; i < TK_SLOT_CHUNKS; i++) {
        free(s->chunk[i]);
        s->chunk[i] = NULL;
    }
    free(s->free);
    s->free = NULL;
    s->nfree = s->capfree = 0;
    s->next = 0;
    pthread_mutex_destroy(&s->mu);
}

static int slot_set_locked(tk_slots *s, uint32_t slot, void *p) {
    size_t c = slot >> TK_SLOT_BITS;
    if (c >= TK_SLOT_CHUNKS) return -ENOSPC;
    if (!s->chunk[c]) {
        void **chunk = calloc((size_t)1 << TK_SLOT_BITS, sizeof *chunk);
        if (!chunk) return -ENOMEM;
        __atomic_store_n(&s->chunk[c], chunk, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&s->chunk[c][slot & SLOT_MASK], p, __ATOMIC_RELEASE);
    return 0;
}

int64_t tk_slots_add(tk_slots *s, void *p) {
    pthread_mutex_lock(&s->mu);
    uint32_t slot;
    int from_free = s->nfree > 0;
    if (from_free) slot = s->free[--s->nfree];
    else if (s->next == UINT32_MAX) {
        pthread_mutex_unlock(&s->mu);
        return -ENOSPC;
    } else slot = s->next;
    int rc = slot_set_locked(s, slot, p);
    if (rc) {
        if (from_free) s->nfree++;
    } else if (!from_free) {
        s->next++;
    }
    pthread_mutex_unlock(&s->mu);
    return rc ? rc : (int64_t)slot;
}

int tk_slots_place(tk_slots *s, uint32_t slot, void *p) {
    pthread_mutex_lock(&s->mu);
    int rc = tk_slots_get(s, slot) ? -EEXIST : slot_set_locked(s, slot, p);
    if (rc == 0 && slot >= s->next) s->next = slot + 1;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int tk_slots_seal(tk_slots *s) {
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    for (uint32_t i = s->next; i-- > 0;) {
        if (tk_slots_get(s, i)) continue;
        if (s->nfree == s->capfree) {
            size_t cap = s->capfree ? s->capfree * 2 : 64;
            uint32_t *f = realloc(s->free, cap * sizeof *f);
            if (!f) {
                rc = -ENOMEM;  /* the gap stays unused: harmless */
                break;
            }
            s->free = f;
            s->capfree = cap;
        }
        s->free[s->nfree++] = i;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void tk_slots_del(tk_slots *s, uint32_t slot) {
    pthread_mutex_lock(&s->mu);
    void **c = s->chunk[slot >> TK_SLOT_BITS];
    if (c && c[slot & SLOT_MASK]) {
        __atomic_store_n(&c[slot & SLOT_MASK], NULL, __ATOMIC_RELEASE);
        if (s->nfree == s->capfree) {
            size_t cap = s->capfree ? s->capfree * 2 : 64;
            uint32_t *f = realloc(s->free, cap * sizeof *f);
            if (f) {
                s->free = f;
                s->capfree = cap;
            }
        }
        if (s->nfree < s->capfree) s->free[s->nfree++] = slot;  /* else: never reused */
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- file handles ---------------------------------------------------------------- */

/* The file handle of the object fd refers to, malloc'd; NULL if it has none usable
 * with handle_fd (no export support, another mount, handles disabled). */
static struct file_handle *handle_of(tk_fs *fs, int fd) {
    if (fs->handle_mnt_id < 0) return NULL;
    uint64_t buf[(sizeof(struct file_handle) + MAX_HANDLE_SZ) / sizeof(uint64_t) + 1];
    struct file_handle *h = (struct file_handle *)buf;
    int mnt = -1;
    h->handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(fd, "", h, &mnt, AT_EMPTY_PATH) < 0 || mnt != fs->handle_mnt_id)
        return NULL;
    size_t n = sizeof *h + h->handle_bytes;
    struct file_handle *out = malloc(n);
    if (out) memcpy(out, h, n);
    return out;
}

static int same_handle(const struct file_handle *a, const struct file_handle *b) {
    return a->handle_type == b->handle_type && a->handle_bytes == b->handle_bytes &&
           memcmp(a->f_handle, b->f_handle, a->handle_bytes) == 0;
}

/* ---- fd cache (fdc_mu) ------------------------------------------------------------- */

static void lru_unlink_locked(tk_fs *fs, tk_inode *ino) {
    if (ino->lru_prev) ino->lru_prev->lru_next = ino->lru_next;
    else fs->lru_head = ino->lru_next;
    if (ino->lru_next) ino->lru_next->lru_prev = ino->lru_prev;
    else fs->lru_tail = ino->lru_prev;
    ino->lru_prev = ino->lru_next = NULL;
}

static void lru_push_locked(tk_fs *fs, tk_inode *ino) {
    ino->lru_prev = NULL;
    ino->lru_next = fs->lru_head;
    if (fs->lru_head) fs->lru_head->lru_prev = ino;
    else fs->lru_tail = ino;
    fs->lru_head = ino;
}

/* Give ino (not pinned, fd < 0) the fd and make it the most recent. */
static void cache_fd_locked(tk_fs *fs, tk_inode *ino, int fd) {
    ino->fd = fd;
    lru_push_locked(fs, ino);
    fs->fd_cached++;
    GAUGE(fs, fds_cached, fs->fd_cached);
}

/* Take up to TK_EVICT_BATCH least recently used fds that nobody borrows while the
 * cache is over its bound; they go to out[] (closed by the caller outside the locks:
 * the last close of a deleted object frees it on disk). */
static int evict_locked(tk_fs *fs, int *out) {
    int n = 0;
    tk_inode *p = fs->lru_tail;
    while (p && fs->fd_cached > fs->fd_cap && n < TK_EVICT_BATCH) {
        tk_inode *prev = p->lru_prev;
        if (p->fd_users == 0) {
            lru_unlink_locked(fs, p);
            out[n++] = p->fd;
            p->fd = -1;
            fs->fd_cached--;
        }
        p = prev;
    }
    if (n) {
        TK_INC(fs, fd_evictions, n);
        GAUGE(fs, fds_cached, fs->fd_cached);
    }
    return n;
}

static void close_all(const int *fds, int n) {
    for (int i = 0; i < n; i++) close(fds[i]);
}

int tk_inode_fd(tk_fs *fs, tk_inode *ino) {
    if (ino->pinned) return ino->fd;  /* immutable until the inode is freed */
    pthread_mutex_lock(&fs->fdc_mu);
    if (ino->fd >= 0) {
        ino->fd_users++;
        if (fs->lru_head != ino) {
            lru_unlink_locked(fs, ino);
            lru_push_locked(fs, ino);
        }
        int fd = ino->fd;
        pthread_mutex_unlock(&fs->fdc_mu);
        return fd;
    }
    pthread_mutex_unlock(&fs->fdc_mu);

    /* miss: reopen outside the lock.  A rekey may replace the handle meanwhile (under
     * fdc_mu; the old one stays allocated): an fd opened from a replaced handle names
     * the old object and is not kept. */
    struct file_handle *h;
    int fd;
again:
    h = __atomic_load_n(&ino->handle, __ATOMIC_ACQUIRE);
    fd = open_by_handle_at(fs->handle_fd, h, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ESTALE && __atomic_load_n(&ino->handle, __ATOMIC_ACQUIRE) != h) goto again;
        if (e == ESTALE) {
            TK_INC(fs, stale_handles, 1);
            return -ENOENT;  /* deleted (its number may already name another object) */
        }
        return -e;
    }
    TK_INC(fs, fd_reopens, 1);
    int drop[TK_EVICT_BATCH + 1], ndrop;
    pthread_mutex_lock(&fs->fdc_mu);
    if (ino->handle != h) {
        pthread_mutex_unlock(&fs->fdc_mu);
        close(fd);
        goto again;
    }
    ndrop = 0;
    if (ino->fd >= 0) drop[ndrop++] = fd;  /* another thread reopened it meanwhile */
    else cache_fd_locked(fs, ino, fd);
    ino->fd_users++;
    fd = ino->fd;
    ndrop += evict_locked(fs, drop + ndrop);
    pthread_mutex_unlock(&fs->fdc_mu);
    close_all(drop, ndrop);
    return fd;
}

void tk_inode_put(tk_fs *fs, tk_inode *ino) {
    if (ino->pinned) return;
    pthread_mutex_lock(&fs->fdc_mu);
    if (ino->fd_users) ino->fd_users--;
    pthread_mutex_unlock(&fs->fdc_mu);
}

/* ---- inodes (itab_mu) -------------------------------------------------------------- */

static void unref_locked(tk_fs *fs, tk_inode *ino, uint64_t n);

static void unhash_locked(tk_fs *fs, tk_inode *ino) {
    tk_inode **pp = &fs->buckets[hash_of(fs, ino->dev, ino->ino)];
    while (*pp && *pp != ino) pp = &(*pp)->hnext;
    if (*pp) *pp = ino->hnext;
    ino->hashed = 0;
    fs->ninodes--;
}

/* A file handle a rekey replaced (tk_itab_repoint): tk_inode_fd may still be reading
 * it, so it lives as long as the inode. */
struct tk_oldh {
    struct tk_oldh *next;
    struct file_handle *h;
};

static void destroy_inode(tk_inode *ino) {
    free(ino->name);
    free(ino->handle);
    for (struct tk_oldh *o = ino->old_handles; o;) {
        struct tk_oldh *next = o->next;
        free(o->h);
        free(o);
        o = next;
    }
    tk_taka_reset(&ino->taka);
    pthread_rwlock_destroy(&ino->lock);
    free(ino);
}

/* The last close of a deleted file or directory frees it on disk (ext4: its blocks,
 * a discard, a journal update -- 100 us and more): never under itab_mu, which every
 * lookup needs.  Freed inodes' fds wait here; itab_unlock() closes them. */
static void defer_close_locked(tk_fs *fs, int fd) {
    if (fs->ndead == fs->dead_cap) {
        size_t cap = fs->dead_cap ? fs->dead_cap * 2 : 64;
        int *p = realloc(fs->dead_fds, cap * sizeof *p);
        if (!p) {
            close(fd);  /* no memory: close it now, slowly but correctly */
            return;
        }
        fs->dead_fds = p;
        fs->dead_cap = cap;
    }
    fs->dead_fds[fs->ndead++] = fd;
}

static void itab_unlock(tk_fs *fs) {
    int *fds = fs->dead_fds;
    size_t n = fs->ndead;
    if (n) {
        fs->dead_fds = NULL;
        fs->ndead = fs->dead_cap = 0;
    }
    pthread_mutex_unlock(&fs->itab_mu);
    if (n) {
        for (size_t i = 0; i < n; i++) close(fds[i]);
        free(fds);
    }
}

static void free_inode_locked(tk_fs *fs, tk_inode *ino) {
    if (ino->hashed) {
        unhash_locked(fs, ino);
    } else {
        tk_inode **pp = &fs->stale;
        while (*pp && *pp != ino) pp = &(*pp)->hnext;
        if (*pp) *pp = ino->hnext;
    }
    GAUGE(fs, inodes, fs->ninodes);
    int fd = -1;
    if (ino->pinned) {
        fd = ino->fd;
        __atomic_fetch_sub(&fs->st.fds_pinned, 1, __ATOMIC_RELAXED);
    } else {
        /* nobody borrows it: the kernel sends no more requests on a forgotten node,
         * and children name their parent through refs (so this is not a parent) */
        pthread_mutex_lock(&fs->fdc_mu);
        if (ino->fd >= 0) {
            lru_unlink_locked(fs, ino);
            fd = ino->fd;
            ino->fd = -1;
            fs->fd_cached--;
            GAUGE(fs, fds_cached, fs->fd_cached);
        }
        pthread_mutex_unlock(&fs->fdc_mu);
    }
    if (fd >= 0) defer_close_locked(fs, fd);
    tk_slots_del(&fs->nodes, ino->slot);
    tk_sh_inode_gone(fs, ino->slot);
    tk_inode *parent = ino->parent;
    destroy_inode(ino);
    if (parent) unref_locked(fs, parent, 1);
}

static void unref_locked(tk_fs *fs, tk_inode *ino, uint64_t n) {
    /* iterative over the parent chain would be nicer; depth is bounded by the tree */
    ino->refs -= n;
    if (ino->refs == 0) free_inode_locked(fs, ino);
}

/* A new inode; handle NULL: pinned on fd.  Does not take over fd. */
static tk_inode *new_inode(const struct stat *st, struct file_handle *handle) {
    tk_inode *ino = calloc(1, sizeof *ino);
    if (!ino) return NULL;
    ino->fd = -1;
    ino->handle = handle;
    ino->pinned = handle == NULL;
    ino->dev = st->st_dev;
    ino->ino = st->st_ino;
    ino->type = st->st_mode & S_IFMT;
    ino->plain_stale = 1;
    for (int v = 0; v < TK_NVIEWS; v++) {
        ino->node[v].ino = ino;
        ino->node[v].view = v;
    }
    pthread_rwlock_init(&ino->lock, NULL);
    return ino;
}

static size_t fd_cap_of(const tk_fs *fs) {
    size_t cap = fs->cfg.fd_cache;
    if (!cap) {
        const char *e = getenv("TAKAKRYPT_FD_CACHE");
        char *end;
        unsigned long long v = e && *e ? strtoull(e, &end, 10) : 0;
        cap = e && *e && !*end && v ? (size_t)v : TK_FD_CACHE_DEFAULT;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        cap > rl.rlim_cur / 4)
        cap = (size_t)(rl.rlim_cur / 4);
    return cap < TK_FD_CACHE_MIN ? TK_FD_CACHE_MIN : cap;
}

int tk_itab_init(tk_fs *fs) {
    struct stat st;
    fs->fd_cap = fd_cap_of(fs);
    fs->fd_cached = 0;
    fs->lru_head = fs->lru_tail = NULL;
    fs->stale = NULL;
    fs->handle_fd = -1;
    fs->handle_mnt_id = -1;
    fs->nbuckets = 1024;
    fs->buckets = calloc(fs->nbuckets, sizeof *fs->buckets);
    if (!fs->buckets) return -ENOMEM;
    if (fstatat(fs->root_fd, "", &st, AT_EMPTY_PATH) < 0) return -errno;
    /* open_by_handle_at needs a mount fd that is not O_PATH; "." of the root fd is the
     * backing directory itself, also for an in-place guard point mounted over it */
    fs->handle_fd = openat(fs->root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const char *nh = getenv("TAKAKRYPT_TEST_NO_HANDLES");  /* tests: every inode pinned */
    if (fs->handle_fd >= 0 && !(nh && !strcmp(nh, "1"))) {
        /* usable only if the root has a handle that opens again (export support,
         * CAP_DAC_READ_SEARCH): else every inode keeps a pinned fd, as before */
        uint64_t buf[(sizeof(struct file_handle) + MAX_HANDLE_SZ) / sizeof(uint64_t) + 1];
        struct file_handle *h = (struct file_handle *)buf;
        int mnt = -1;
        h->handle_bytes = MAX_HANDLE_SZ;
        if (name_to_handle_at(fs->root_fd, "", h, &mnt, AT_EMPTY_PATH) == 0) {
            int fd = open_by_handle_at(fs->handle_fd, h, O_PATH | O_CLOEXEC);
            if (fd >= 0) {
                struct stat st2;
                if (fstat(fd, &st2) == 0 && st2.st_dev == st.st_dev && st2.st_ino == st.st_ino)
                    fs->handle_mnt_id = mnt;
                close(fd);
            }
        }
    }
    fs->root = new_inode(&st, NULL);
    if (!fs->root) return -ENOMEM;
    tk_slots_destroy(&fs->nodes);
    tk_slots_init(&fs->nodes);
    if (tk_slots_place(&fs->nodes, 0, fs->root) != 0) return -ENOMEM;  /* node id 1 */
    fs->root->slot = 0;
    struct stat lst;
    memset(&lst, 0, sizeof lst);
    lst.st_mode = S_IFREG;
    fs->lost = new_inode(&lst, NULL);  /* pinned on no fd: every access fails */
    if (!fs->lost) return -ENOMEM;
    fs->lost->slot = UINT32_MAX;
    fs->lost->refs = 1;
    fs->root->fd = fs->root_fd;  /* pinned; closed by the owner */
    fs->root->refs = 1;  /* pinned */
    fs->root->node[0].nlookup = 1;
    fs->root->hashed = 1;
    tk_sh_inode(fs, fs->root);
    fs->buckets[hash_of(fs, st.st_dev, st.st_ino)] = fs->root;
    fs->ninodes = 1;
    GAUGE(fs, inodes, 1);
    GAUGE(fs, fds_pinned, 1);
    GAUGE(fs, fds_cached, 0);
    return 0;
}

static void free_one(tk_fs *fs, tk_inode *p) {
    if (p != fs->root && p->fd >= 0) close(p->fd);
    destroy_inode(p);
}

void tk_itab_free(tk_fs *fs) {
    if (fs->buckets) {
        for (size_t i = 0; i < fs->nbuckets; i++) {
            tk_inode *p = fs->buckets[i];
            while (p) {
                tk_inode *next = p->hnext;
                free_one(fs, p);
                p = next;
            }
        }
    }
    for (tk_inode *p = fs->stale; p;) {
        tk_inode *next = p->hnext;
        free_one(fs, p);
        p = next;
    }
    free(fs->buckets);
    fs->buckets = NULL;
    fs->stale = NULL;
    tk_itab_retired_expire(fs, 1);
    for (size_t i = 0; i < fs->ndead; i++) close(fs->dead_fds[i]);
    free(fs->dead_fds);
    fs->dead_fds = NULL;
    fs->ndead = fs->dead_cap = 0;
    fs->lru_head = fs->lru_tail = NULL;
    fs->fd_cached = 0;
    fs->ninodes = 0;
    if (fs->handle_fd >= 0) close(fs->handle_fd);
    fs->handle_fd = -1;
    fs->handle_mnt_id = -1;
    fs->root = NULL;  /* root_fd is closed by the owner */
    if (fs->lost) destroy_inode(fs->lost);
    fs->lost = NULL;
    tk_slots_destroy(&fs->nodes);
    tk_slots_init(&fs->nodes);
}

tk_inode *tk_node_inode(tk_fs *fs, fuse_ino_t nodeid, int *view) {
    /* the kernel only sends node ids we handed out (or a predecessor did: a handover
     * restores them in the same slots) and has not been told to forget */
    if (view) *view = (int)((nodeid - 1) & 1);
    tk_inode *ino = tk_slots_get(&fs->nodes, (nodeid - 1) >> 1);
    /* none: state lost with a killed predecessor -- an inode whose every access
     * fails (EPERM), never a crash */
    return ino ? ino : fs->lost;
}

fuse_ino_t tk_nodeid(tk_fs *fs, tk_inode *ino, int view) {
    (void)fs;
    return ((fuse_ino_t)ino->slot << 1) + (fuse_ino_t)view + 1;  /* root: FUSE_ROOT_ID */
}

static void set_name_locked(tk_fs *fs, tk_inode *ino, tk_inode *parent, const char *name) {
    if (ino == fs->root || !parent || !name) return;
    if (ino->parent == parent && ino->name && strcmp(ino->name, name) == 0) return;
    char *dup = strdup(name);
    if (!dup) return;  /* keep the old name */
    free(ino->name);
    ino->name = dup;
    tk_inode *old = NULL;
    if (ino->parent != parent) {
        parent->refs++;
        old = ino->parent;
        ino->parent = parent;
    }
    tk_sh_name(fs, ino);
    if (old) unref_locked(fs, old, 1);
}

void tk_inode_set_name(tk_fs *fs, tk_inode *ino, tk_inode *parent, const char *name) {
    pthread_mutex_lock(&fs->itab_mu);
    set_name_locked(fs, ino, parent, name);
    itab_unlock(fs);
}

/* ---- objects a rekey replaced (itab_mu) ---------------------------------------------
 * A lookup opens the name first and adds the inode later (its policy checks in
 * between may take seconds).  If a rekey swapped the file in between, the lookup holds
 * the old object, whose (dev, ino) no inode has any more: it must not become a new
 * inode (writes to it would be lost with it).  Such objects are remembered for a minute
 * by (dev, ino) and file handle -- the generation in it tells the old object from a new
 * one that got its inode number -- and tk_itab_add refuses them (EAGAIN: the lookup
 * opens the name again).  Without handles (pinned inodes) an fd on the old object keeps
 * its number from being reused instead. */
#define TK_RETIRED_NS  (60ULL * 1000000000ULL)
#define TK_RETIRED_MAX 256

struct tk_retired {
    struct tk_retired *next;      /* newest first */
    dev_t dev;
    ino_t ino;
    struct file_handle *handle;   /* NULL: fd holds the object */
    int fd;
    uint64_t at_ns;
};

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Is the object fd (with stat st) one a rekey replaced? */
static int retired_locked(tk_fs *fs, const struct stat *st, int fd) {
    for (struct tk_retired *r = fs->rk_retired; r; r = r->next) {
        if (r->ino != st->st_ino || r->dev != st->st_dev) continue;
        if (!r->handle) return 1;
        struct file_handle *h = handle_of(fs, fd);
        int same = h && same_handle(h, r->handle);
        free(h);
        return same;
    }
    return 0;
}

void tk_itab_retired_expire(tk_fs *fs, int all) {
    uint64_t now = mono_ns();
    struct tk_retired *gone = NULL;
    pthread_mutex_lock(&fs->itab_mu);
    size_t n = 0;
    for (struct tk_retired **pp = &fs->rk_retired; *pp;) {
        struct tk_retired *r = *pp;
        if (all || now - r->at_ns > TK_RETIRED_NS || ++n > TK_RETIRED_MAX) {
            *pp = r->next;
            r->next = gone;
            gone = r;
        } else {
            pp = &r->next;
        }
    }
    pthread_mutex_unlock(&fs->itab_mu);
    while (gone) {  /* the last close of a replaced file frees its blocks: no lock held */
        struct tk_retired *next = gone->next;
        if (gone->fd >= 0) close(gone->fd);
        free(gone->handle);
        free(gone);
        gone = next;
    }
}

struct tk_incoming {
    struct tk_incoming *next;
    dev_t dev;
    ino_t ino;
    tk_inode *to;                 /* pinned by the rekey while listed */
};

void tk_itab_incoming(tk_fs *fs, tk_inode *ino, const struct stat *nst,
                      const struct file_handle *h, int on) {
    struct tk_incoming *n = on ? malloc(sizeof *n) : NULL, *gone = NULL;
    pthread_mutex_lock(&fs->itab_mu);
    if (!ino->internal) {
        if (on) tk_sh_swap(fs, ino, nst, h);
        else tk_sh_swap_end(fs, ino);
    }
    if (n) {
        n->dev = nst->st_dev;
        n->ino = nst->st_ino;
        n->to = ino;
        n->next = fs->rk_incoming;
        fs->rk_incoming = n;
    }
    for (struct tk_incoming **pp = &fs->rk_incoming; !on && *pp;) {
        if ((*pp)->to == ino) {
            gone = *pp;
            *pp = gone->next;
            free(gone);
        } else {
            pp = &(*pp)->next;
        }
    }
    pthread_mutex_unlock(&fs->itab_mu);
}

static tk_inode *incoming_locked(tk_fs *fs, const struct stat *st) {
    for (struct tk_incoming *n = fs->rk_incoming; n; n = n->next)
        if (n->ino == st->st_ino && n->dev == st->st_dev) return n->to;
    return NULL;
}

static tk_inode *add_inode(tk_fs *fs, tk_inode *parent, const char *name, int fd,
                           const struct stat *st, int view) {
    int drop[TK_EVICT_BATCH + 1], ndrop = 0, fd_is_new = 0;
    struct file_handle *h = NULL;
    pthread_mutex_lock(&fs->itab_mu);
    if (fs->rk_retired && retired_locked(fs, st, fd)) {
        itab_unlock(fs);
        close(fd);
        errno = EAGAIN;  /* opened just before a rekey swapped it: open the name again */
        return NULL;
    }
    tk_inode *ino = find_locked(fs, st->st_dev, st->st_ino);
    tk_inode *inc = ino || !fs->rk_incoming ? NULL : incoming_locked(fs, st);
    if (inc) {  /* the object a rekey is swapping in for inc: inc it is */
        ino = inc;
        drop[ndrop++] = fd;
        fd = -1;
    } else if (ino && !ino->pinned) {
        pthread_mutex_lock(&fs->fdc_mu);
        int cached = ino->fd >= 0;
        pthread_mutex_unlock(&fs->fdc_mu);
        if (cached) {
            /* its open fd keeps the object alive: (dev, ino) cannot have been reused */
            drop[ndrop++] = fd;
            fd = -1;
        } else {
            h = handle_of(fs, fd);
            if (h && !same_handle(h, ino->handle)) {
                /* the object was deleted and its number reused: the old tk_inode
                 * stays for the node ids the kernel holds (they now get ENOENT) */
                unhash_locked(fs, ino);
                ino->hnext = fs->stale;
                fs->stale = ino;
                tk_sh_name(fs, ino);
                ino = NULL;
            } else {
                free(h);
                h = NULL;
                pthread_mutex_lock(&fs->fdc_mu);
                if (ino->fd < 0) {
                    cache_fd_locked(fs, ino, fd);  /* keep the fd we just opened */
                    ndrop += evict_locked(fs, drop + ndrop);
                } else {
                    drop[ndrop++] = fd;
                }
                pthread_mutex_unlock(&fs->fdc_mu);
                fd = -1;
            }
        }
    } else if (ino) {
        drop[ndrop++] = fd;  /* pinned: the known fd stays */
        fd = -1;
    }
    if (!ino) {
        if (!h) h = handle_of(fs, fd);
        ino = new_inode(st, h);
        int64_t slot = ino ? tk_slots_add(&fs->nodes, ino) : -ENOMEM;
        if (slot < 0) {
            if (ino) {
                ino->handle = NULL;
                destroy_inode(ino);
            }
            itab_unlock(fs);
            free(h);
            close(fd);
            errno = ENOMEM;
            return NULL;
        }
        ino->slot = (uint32_t)slot;
        fd_is_new = 1;
        size_t hb = hash_of(fs, st->st_dev, st->st_ino);
        ino->hnext = fs->buckets[hb];
        ino->hashed = 1;
        fs->buckets[hb] = ino;
        if (++fs->ninodes > 2 * fs->nbuckets) grow_locked(fs);
        GAUGE(fs, inodes, fs->ninodes);
        if (ino->pinned) {
            ino->fd = fd;
            TK_INC(fs, fds_pinned, 1);
        } else {
            pthread_mutex_lock(&fs->fdc_mu);
            cache_fd_locked(fs, ino, fd);
            ndrop += evict_locked(fs, drop + ndrop);
            pthread_mutex_unlock(&fs->fdc_mu);
        }
        fd = -1;
    }
    ino->refs++;
    set_name_locked(fs, ino, parent, name);
    if (view < 0) {  /* an internal pin: nothing the kernel knows, nothing to recover */
        if (fd_is_new) ino->internal = 1;
    } else {
        ino->node[view].nlookup++;
        if (fd_is_new || ino->internal) tk_sh_inode(fs, ino);
        else tk_sh_nlookup(fs, ino);
        ino->internal = 0;
    }
    itab_unlock(fs);
    close_all(drop, ndrop);
    return ino;
}

tk_inode *tk_itab_add(tk_fs *fs, tk_inode *parent, const char *name, int fd,
                      const struct stat *st, int view) {
    return add_inode(fs, parent, name, fd, st, view);
}

tk_inode *tk_itab_pin(tk_fs *fs, int fd, const struct stat *st) {
    return add_inode(fs, NULL, NULL, fd, st, -1);
}

void tk_itab_unpin(tk_fs *fs, tk_inode *ino) {
    pthread_mutex_lock(&fs->itab_mu);
    unref_locked(fs, ino, 1);
    itab_unlock(fs);
}

struct file_handle *tk_handle_of(tk_fs *fs, int fd) {
    return handle_of(fs, fd);
}

void tk_itab_repoint(tk_fs *fs, tk_inode *ino, int fd, const struct stat *nst,
                     struct file_handle *h, int old_fd) {
    struct tk_retired *r = malloc(sizeof *r);
    struct tk_oldh *o = h ? malloc(sizeof *o) : NULL;
    pthread_mutex_lock(&fs->itab_mu);
    if (r) {
        r->dev = ino->dev;
        r->ino = ino->ino;
        r->fd = -1;
        r->handle = NULL;
        if (ino->handle) {  /* a copy: the entry may outlive the inode */
            size_t n = sizeof *ino->handle + ino->handle->handle_bytes;
            if ((r->handle = malloc(n))) memcpy(r->handle, ino->handle, n);
        }
        if (!r->handle) {
            r->fd = old_fd;
            old_fd = -1;
        }
        r->at_ns = mono_ns();
        r->next = fs->rk_retired;
        fs->rk_retired = r;
    }
    if (ino->hashed) {
        unhash_locked(fs, ino);
    } else {  /* cannot be (our fds keep its number), but never leave it listed twice */
        tk_inode **pp = &fs->stale;
        while (*pp && *pp != ino) pp = &(*pp)->hnext;
        if (*pp) *pp = ino->hnext;
    }
    /* an inode of a deleted object whose number the new file got: stale now */
    tk_inode *other = find_locked(fs, nst->st_dev, nst->st_ino);
    if (other) {
        unhash_locked(fs, other);
        other->hnext = fs->stale;
        fs->stale = other;
        tk_sh_name(fs, other);
    }
    ino->dev = nst->st_dev;
    ino->ino = nst->st_ino;
    size_t hb = hash_of(fs, ino->dev, ino->ino);
    ino->hnext = fs->buckets[hb];
    ino->hashed = 1;
    fs->buckets[hb] = ino;
    if (++fs->ninodes > 2 * fs->nbuckets) grow_locked(fs);
    GAUGE(fs, inodes, fs->ninodes);
    pthread_mutex_lock(&fs->fdc_mu);
    /* the fd number borrowers may hold now names the new object (dup3 is atomic) */
    if (ino->fd >= 0) {
        (void)dup3(fd, ino->fd, O_CLOEXEC);
    } else if (ino->pinned) {
        ino->fd = fd;
        fd = -1;
        TK_INC(fs, fds_pinned, 1);
    }
    if (h && !ino->pinned) {
        if (o) {
            o->h = ino->handle;
            o->next = ino->old_handles;
            ino->old_handles = o;
            o = NULL;
        }  /* else: the old handle is leaked, never freed under a reader */
        __atomic_store_n(&ino->handle, h, __ATOMIC_RELEASE);
        h = NULL;
    }
    pthread_mutex_unlock(&fs->fdc_mu);
    if (!ino->internal) tk_sh_inode(fs, ino);
    itab_unlock(fs);
    free(o);
    free(h);
    if (fd >= 0) close(fd);
    if (old_fd >= 0) close(old_fd);
}

/* A restored inode without a file handle: opened again by its name under its parent
 * (O_PATH, not following a symlink) and kept only if it is the same object (device
 * and inode number); else it stays without an fd (its operations fail closed). */
static void resolve_pinned_locked(tk_fs *fs, tk_inode *ino, int depth) {
    if (!ino->pinned || ino->fd >= 0 || !ino->parent || !ino->name || depth > 4096) return;
    tk_inode *p = ino->parent;
    resolve_pinned_locked(fs, p, depth + 1);
    int pfd = p->pinned ? p->fd : tk_inode_fd(fs, p);
    if (pfd < 0) return;
    int fd = openat(pfd, ino->name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (!p->pinned) tk_inode_put(fs, p);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == ino->dev && st.st_ino == ino->ino) {
        ino->fd = fd;
        TK_INC(fs, fds_pinned, 1);
    } else if (fd >= 0) {
        close(fd);
    }
}

/* A killed predecessor was swapping r's object for its rekeyed copy (r->has_alt,
 * tk_itab_incoming): 1 if the name under its parent holds the copy (the exchange was
 * done, the repoint was not), 0 if it still holds r's object or cannot be looked at. */
static int alt_at_name(tk_fs *fs, const tk_ho_state *st, const int *fds,
                       const tk_ho_inode *r) {
    if (!r->has_alt || !r->name || r->parent == UINT32_MAX) return 0;
    int pfd = -1, own = 0;
    if (r->parent == 0) {
        pfd = fs->root_fd;
    } else {
        for (size_t i = 0; i < st->ninodes; i++) {
            const tk_ho_inode *p = &st->inodes[i];
            if (p->slot != r->parent) continue;
            if (p->handle) {
                pfd = open_by_handle_at(fs->handle_fd, p->handle, O_PATH | O_CLOEXEC);
                own = pfd >= 0;
            } else if (p->fd_index >= 0) {
                pfd = fds[p->fd_index];
            }
            break;
        }
    }
    if (pfd < 0) return 0;
    struct stat sb;
    int at = fstatat(pfd, r->name, &sb, AT_SYMLINK_NOFOLLOW) == 0 &&
             (uint64_t)sb.st_dev == r->alt_dev && (uint64_t)sb.st_ino == r->alt_ino;
    if (own) close(pfd);
    return at;
}

int tk_itab_restore(tk_fs *fs, const tk_ho_state *st, const int *fds) {
    if ((uint64_t)fs->root->dev != st->root_dev || (uint64_t)fs->root->ino != st->root_ino)
        return -ESTALE;  /* another directory than the predecessor's */
    int rc = 0;
    pthread_mutex_lock(&fs->itab_mu);
    for (size_t i = 0; i < st->ninodes && rc == 0; i++) {
        const tk_ho_inode *r = &st->inodes[i];
        if (r->slot == 0) continue;  /* the root: tk_itab_init made it */
        struct stat sst;
        memset(&sst, 0, sizeof sst);
        sst.st_dev = (dev_t)r->dev;
        sst.st_ino = (ino_t)r->ino;
        sst.st_mode = (mode_t)(r->type & S_IFMT);
        const struct file_handle *src = r->handle;
        int fd_index = r->fd_index;
        if (alt_at_name(fs, st, fds, r)) {  /* killed between a rekey's exchange and
                                              * its repoint: the name holds the copy */
            sst.st_dev = (dev_t)r->alt_dev;
            sst.st_ino = (ino_t)r->alt_ino;
            src = r->alt_handle;
            fd_index = src ? -1 : -2;  /* pinned: found again by name (below) */
            TK_INC(fs, handover_swaps_finished, 1);
        }
        struct file_handle *h = NULL;
        if (src) {
            size_t n = sizeof *h + src->handle_bytes;
            if (!(h = malloc(n))) {
                rc = -ENOMEM;
                break;
            }
            memcpy(h, src, n);
        }
        tk_inode *ino = new_inode(&sst, h);
        if (!ino) {
            free(h);
            rc = -ENOMEM;
            break;
        }
        if (ino->pinned) {
            /* fd_index -2: known to the kernel, but a killed predecessor left no way
             * to reopen it (pinned on an fd that died with it): fails closed */
            ino->fd = fd_index >= 0 ? fcntl(fds[fd_index], F_DUPFD_CLOEXEC, 3) : -1;
            if (ino->fd < 0 && fd_index != -2) {
                destroy_inode(ino);
                rc = -EBADF;
                break;
            }
            if (ino->fd >= 0) TK_INC(fs, fds_pinned, 1);
        }
        ino->slot = r->slot;
        if ((rc = tk_slots_place(&fs->nodes, r->slot, ino)) != 0) {
            if (ino->pinned) close(ino->fd);
            destroy_inode(ino);
            break;
        }
        ino->node[0].nlookup = r->nlookup[0];
        ino->node[1].nlookup = r->nlookup[1];
        ino->refs = r->nlookup[0] + r->nlookup[1];
        if (r->hashed && !find_locked(fs, ino->dev, ino->ino)) {
            size_t hb = hash_of(fs, ino->dev, ino->ino);
            ino->hnext = fs->buckets[hb];
            ino->hashed = 1;
            fs->buckets[hb] = ino;
            if (++fs->ninodes > 2 * fs->nbuckets) grow_locked(fs);
        } else {
            ino->hnext = fs->stale;
            fs->stale = ino;
        }
    }
    /* names and parents, once every inode is in its slot */
    for (size_t i = 0; i < st->ninodes && rc == 0; i++) {
        const tk_ho_inode *r = &st->inodes[i];
        tk_inode *ino = tk_slots_get(&fs->nodes, r->slot);
        if (r->slot == 0 || !ino) continue;
        if (r->parent != UINT32_MAX) {
            tk_inode *parent = tk_slots_get(&fs->nodes, r->parent);
            if (!parent || parent == ino) {
                rc = -EINVAL;
                break;
            }
            ino->parent = parent;
            parent->refs++;
        }
        if (r->name && !(ino->name = strdup(r->name))) rc = -ENOMEM;
        tk_sh_inode(fs, ino);
        if (r->has_alt) tk_sh_swap_end(fs, ino);  /* names the object kept above */
    }
    for (size_t i = 0; i < st->ninodes && rc == 0; i++) {
        tk_inode *ino = tk_slots_get(&fs->nodes, st->inodes[i].slot);
        if (ino && ino != fs->root) resolve_pinned_locked(fs, ino, 0);
    }
    GAUGE(fs, inodes, fs->ninodes);
    pthread_mutex_unlock(&fs->itab_mu);
    if (rc == 0) rc = tk_slots_seal(&fs->nodes);
    return rc;
}

void tk_itab_forget(tk_fs *fs, fuse_ino_t nodeid, uint64_t n) {
    int view;
    pthread_mutex_lock(&fs->itab_mu);
    tk_inode *ino = tk_node_inode(fs, nodeid, &view);
    if ((ino == fs->root && nodeid == FUSE_ROOT_ID) || ino == fs->lost) {
        itab_unlock(fs);
        return;
    }
    tk_node *nd = &ino->node[view];
    if (n > nd->nlookup) n = nd->nlookup;
    nd->nlookup -= n;
    tk_sh_nlookup(fs, ino);
    unref_locked(fs, ino, n);
    itab_unlock(fs);
}

void tk_itab_fix_name(tk_fs *fs, tk_inode *parent, const char *name) {
    struct stat st;
    int pfd = tk_inode_fd(fs, parent);
    if (pfd < 0) return;
    int r = fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW);
    tk_inode_put(fs, parent);
    if (r < 0) return;
    pthread_mutex_lock(&fs->itab_mu);
    tk_inode *ino = find_locked(fs, st.st_dev, st.st_ino);
    if (ino) set_name_locked(fs, ino, parent, name);
    itab_unlock(fs);
}

char *tk_path(tk_fs *fs, tk_inode *ino, const char *name) {
    pthread_mutex_lock(&fs->itab_mu);
    size_t len = name ? strlen(name) + 1 : 0;
    int depth = 0;
    for (tk_inode *p = ino; p && p != fs->root; p = p->parent) {
        len += (p->name ? strlen(p->name) : 1) + 1;
        if (++depth > 4096) break;  /* a cycle would be a bug; never loop forever */
    }
    char *out = malloc(len + 1);
    if (!out) {
        itab_unlock(fs);
        return NULL;
    }
    size_t pos = len;
    out[pos] = 0;
    if (name) {
        size_t n = strlen(name);
        pos -= n;
        memcpy(out + pos, name, n);
        out[--pos] = '/';
    }
    depth = 0;
    for (tk_inode *p = ino; p && p != fs->root && depth++ <= 4096; p = p->parent) {
        const char *nm = p->name ? p->name : "?";
        size_t n = strlen(nm);
        pos -= n;
        memcpy(out + pos, nm, n);
        out[--pos] = '/';
    }
    itab_unlock(fs);
    /* out[pos] is the leading '/' (or pos == len for the root): drop it */
    char *res = strdup(pos < len ? out + pos + 1 : "");
    free(out);
    return res;
}
