/*
 * fuse_shadow.c -- what a successor needs after this process was KILLED (a watchdog
 * SIGKILL, an OOM kill, a crash): the handover state of fuse_handover.c, kept up to
 * date as it changes, in a memfd that systemd's file descriptor store holds with the
 * /dev/fuse fd (docs/guard-points.md, "Restarts without unmounting").
 *
 * One sparse memfd, mapped once (pages exist only where written):
 *   [0, 4 KiB)            header: magic, mountpoint, backing, root, the INIT request,
 *                         flags, the ring's layout
 *   [4 KiB, 64 MiB)       request journal: per classic reader, the request it is
 *                         serving (state, length, bytes) -- replayed by a successor if
 *                         the kill came before the reply (not FORGETs: a lost forget
 *                         only leaks)
 *   [64 MiB, +32 GiB)     open files and directories by slot (32 bytes each)
 *   [32 GiB + 64 MiB, ..) inodes by slot (768 bytes each)
 * Records are written where the engine changes the same fields (under the same locks);
 * a record's `valid` word is written last (creation) or first (deletion), a name is
 * written to the unused one of two buffers before `name_sel` flips, so a kill at any
 * instant leaves each record old or new, never torn.
 *
 * Nothing secret is here: names, handles, sizes of nothing -- keys never.
 */
#include "fuse_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SH_MAGIC 0x48534b54u          /* "TKSH" */
#define SH_VERSION 2u
#define SH_VALID 0x56494c44u          /* "DLIV" */
#define SH_JOURNAL_OFF ((size_t)4096)
#define SH_JOURNAL_END ((size_t)64 << 20)
#define SH_FH_OFF SH_JOURNAL_END
#define SH_FH_REC 32u
#define SH_MAX_SLOTS ((size_t)1 << 30)
#define SH_INO_OFF (SH_FH_OFF + SH_MAX_SLOTS * SH_FH_REC)
#define SH_INO_REC 768u
#define SH_SPAN (SH_INO_OFF + SH_MAX_SLOTS * SH_INO_REC)
#define SH_NAME_MAX 255u            /* NAME_MAX */
#define SH_REPLY_MAX 4096u          /* a saved reply (journal) */

typedef struct {
    uint32_t magic, version, flags, init_len;
    uint64_t root_dev, root_ino;
    uint64_t ring_base;
    uint32_t ring_nthreads, ring_per;
    uint64_t ring_cap;
    uint32_t journal_slots, journal_cap;
    uint32_t ino_next, fh_next;       /* every record at or above is unused */
    char mountpoint[1024];
    char backing[1024];
    uint8_t init[1800];
} sh_header;
_Static_assert(sizeof(sh_header) <= 4096, "shadow header fits its page");

typedef struct {
    uint32_t valid, kind, inode, view;
    int32_t fdflags;
    uint8_t append, writable, pad[10];
} sh_fh;
_Static_assert(sizeof(sh_fh) == SH_FH_REC, "fh record");

typedef struct {
    uint32_t valid, type;
    uint64_t dev, ino;
    uint64_t nlookup[2];
    uint32_t parent, name_sel;        /* parent slot (~0: none); which name is current */
    uint32_t hashed;
    int32_t htype;
    uint32_t hbytes, has_name[2];
    uint8_t handle[64];
    char name[2][SH_NAME_MAX + 1];
    /* a rekey's swap in flight (fuse_rekey.c): the object that replaces this one at its
     * name.  Set (alt_valid last) before the exchange, cleared once dev/ino/handle above
     * name the new object: a successor after a kill in between keeps whichever of the
     * two its name holds.  Zero in a shadow written before these fields existed. */
    uint32_t alt_valid;
    int32_t alt_htype;
    uint32_t alt_hbytes, alt_pad;
    uint64_t alt_dev, alt_ino;
    uint8_t alt_handle[64];
} sh_inode;
_Static_assert(sizeof(sh_inode) <= SH_INO_REC, "inode record");

/* A classic reader's journal slot.  States, and what a successor does after a kill:
 *   0        idle: nothing
 *   READING  in read(2), the request's header zeroed first: if the kernel copied a
 *            request in (the thread may die on its way back from the syscall, before
 *            any instruction of ours runs), serve it again
 *   BUSY     being served: serve it again
 *   REPLYING the reply is being written: it was saved here first (if it fits
 *            SH_REPLY_MAX), so send the same reply again (the kernel refuses it with
 *            ENOENT if it had it: nothing is executed twice); a larger reply (READ,
 *            READDIR, xattr data: operations without side effects) is served again */
typedef struct {
    uint32_t state;
    uint32_t len;
    uint64_t unique;
    uint64_t created[2];              /* (dev, ino) the request created, or zeros */
    uint32_t rlen;                    /* REPLYING: bytes of the saved reply, 0: none */
    uint8_t pad[28];
    uint8_t reply[SH_REPLY_MAX];
    uint8_t data[];
} sh_jslot;
#define SH_JBUSY 1u
#define SH_JREADING 2u
#define SH_JREPLYING 3u

struct tk_shadow {
    int memfd;
    uint8_t *base;
};

static sh_header *hdr(tk_fs *fs) { return (sh_header *)fs->sh->base; }
static sh_fh *fhrec(tk_fs *fs, uint32_t slot) {
    return (sh_fh *)(fs->sh->base + SH_FH_OFF + (size_t)slot * SH_FH_REC);
}
static sh_inode *inorec(tk_fs *fs, uint32_t slot) {
    return (sh_inode *)(fs->sh->base + SH_INO_OFF + (size_t)slot * SH_INO_REC);
}

int tk_sh_open(tk_fs *fs) {
    if (fs->sh) return 0;
    const char *off = getenv("TAKAKRYPT_SHADOW");  /* "0": none (A/B benchmarks) */
    if (off && !strcmp(off, "0")) return -ENOTSUP;
    struct tk_shadow *sh = calloc(1, sizeof *sh);
    if (!sh) return -ENOMEM;
    sh->memfd = memfd_create("takakrypt-state", MFD_CLOEXEC);
    if (sh->memfd < 0 || ftruncate(sh->memfd, (off_t)SH_SPAN) < 0) {
        int rc = -errno;
        if (sh->memfd >= 0) close(sh->memfd);
        free(sh);
        return rc;
    }
    sh->base = mmap(NULL, SH_SPAN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                    sh->memfd, 0);
    if (sh->base == MAP_FAILED) {
        int rc = -errno;
        close(sh->memfd);
        free(sh);
        return rc;
    }
    /* 800 GiB of address space, nearly all holes: never in a core dump */
    (void)madvise(sh->base, SH_SPAN, MADV_DONTDUMP);
    fs->sh = sh;
    sh_header *h = hdr(fs);
    h->version = SH_VERSION;
    snprintf(h->mountpoint, sizeof h->mountpoint, "%s", fs->mountpoint);
    snprintf(h->backing, sizeof h->backing, "%s", fs->backing);
    h->journal_cap = (uint32_t)(((size_t)1 << 20) + 8192);
    h->journal_slots =
        (uint32_t)((SH_JOURNAL_END - SH_JOURNAL_OFF) / (sizeof(sh_jslot) + h->journal_cap));
    return 0;
}

/* After a kill: go on writing the predecessor's shadow (the one in the fd store), so
 * that what the store holds is never older than what the kernel knows, however soon
 * this process is killed too.  Its records stay as they are (a restored inode or
 * handle is not written again: rewriting would leave it invalid for an instant). */
int tk_sh_adopt(tk_fs *fs, int memfd) {
    if (fs->sh) return 0;
    struct tk_shadow *sh = calloc(1, sizeof *sh);
    if (!sh) return -ENOMEM;
    sh->memfd = fcntl(memfd, F_DUPFD_CLOEXEC, 3);
    sh->base = sh->memfd < 0 ? MAP_FAILED
                             : mmap(NULL, SH_SPAN, PROT_READ | PROT_WRITE,
                                    MAP_SHARED | MAP_NORESERVE, sh->memfd, 0);
    if (sh->base == MAP_FAILED) {
        int rc = -errno;
        if (sh->memfd >= 0) close(sh->memfd);
        free(sh);
        return rc;
    }
    (void)madvise(sh->base, SH_SPAN, MADV_DONTDUMP);
    fs->sh = sh;
    fs->sh_reused = 1;
    return 0;
}

void tk_sh_close(tk_fs *fs) {
    if (!fs->sh) return;
    munmap(fs->sh->base, SH_SPAN);
    close(fs->sh->memfd);
    free(fs->sh);
    fs->sh = NULL;
}

int tk_sh_fd(tk_fs *fs) { return fs->sh ? fs->sh->memfd : -1; }

/* The header's remaining facts, once known (after INIT, after the ring started). */
void tk_sh_header(tk_fs *fs, uint32_t flags, const tk_ring_state *ring) {
    if (!fs->sh) return;
    sh_header *h = hdr(fs);
    h->root_dev = (uint64_t)fs->root->dev;
    h->root_ino = (uint64_t)fs->root->ino;
    h->flags = flags;
    if (fs->init_req && fs->init_req_len <= sizeof h->init) {
        memcpy(h->init, fs->init_req, fs->init_req_len);
        h->init_len = (uint32_t)fs->init_req_len;
    }
    if (ring) {
        h->ring_base = ring->base;
        h->ring_nthreads = ring->nthreads;
        h->ring_per = ring->per;
        h->ring_cap = ring->cap;
    }
    __atomic_store_n(&h->magic, SH_MAGIC, __ATOMIC_RELEASE);
}

/* ---- inodes (callers hold itab_mu) -------------------------------------------------- */

static void put_name(sh_inode *r, const char *name) {
    uint32_t next = r->name_sel ^ 1u;
    size_t n = name ? strlen(name) : 0;
    if (name && n <= SH_NAME_MAX) {
        memcpy(r->name[next], name, n + 1);
        r->has_name[next] = 1;
    } else {
        r->name[next][0] = 0;
        r->has_name[next] = 0;
    }
    __atomic_store_n(&r->name_sel, next, __ATOMIC_RELEASE);
}

static void put_object(sh_inode *r, const tk_inode *ino) {
    r->dev = (uint64_t)ino->dev;
    r->ino = (uint64_t)ino->ino;
    if (ino->handle && ino->handle->handle_bytes <= sizeof r->handle) {
        r->htype = ino->handle->handle_type;
        r->hbytes = ino->handle->handle_bytes;
        memcpy(r->handle, ino->handle->f_handle, r->hbytes);
    } else {
        r->htype = 0;
        r->hbytes = 0;  /* pinned or a long handle: a successor after a kill cannot
                         * reopen it (its operations fail closed) */
    }
}

void tk_sh_inode(tk_fs *fs, tk_inode *ino) {
    if (!fs->sh || ino->slot >= SH_MAX_SLOTS) return;
    sh_inode *r = inorec(fs, ino->slot);
    if (fs->sh_reused && __atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) == SH_VALID &&
        fs->restoring)
        return;  /* a record of the predecessor's shadow we go on writing: as it is */
    if (ino->slot >= hdr(fs)->ino_next) __atomic_store_n(&hdr(fs)->ino_next, ino->slot + 1, __ATOMIC_RELEASE);
    if (__atomic_load_n(&r->alt_valid, __ATOMIC_ACQUIRE) == SH_VALID &&
        __atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) == SH_VALID &&
        r->alt_dev == (uint64_t)ino->dev && r->alt_ino == (uint64_t)ino->ino) {
        /* the swap's end (tk_itab_repoint): the record stays valid throughout -- a
         * successor killed meanwhile takes the alternate, which the name holds */
        tk_sh_swap_end(fs, ino);
        return;
    }
    __atomic_store_n(&r->valid, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&r->alt_valid, 0, __ATOMIC_RELAXED);
    r->type = (uint32_t)ino->type;
    r->nlookup[0] = ino->node[0].nlookup;
    r->nlookup[1] = ino->node[1].nlookup;
    r->parent = ino->parent ? ino->parent->slot : UINT32_MAX;
    r->hashed = (uint32_t)ino->hashed;
    put_object(r, ino);
    put_name(r, ino->name);
    __atomic_store_n(&r->valid, SH_VALID, __ATOMIC_RELEASE);
}

void tk_sh_nlookup(tk_fs *fs, tk_inode *ino) {
    if (!fs->sh || ino->slot >= SH_MAX_SLOTS) return;
    sh_inode *r = inorec(fs, ino->slot);
    __atomic_store_n(&r->nlookup[0], ino->node[0].nlookup, __ATOMIC_RELAXED);
    __atomic_store_n(&r->nlookup[1], ino->node[1].nlookup, __ATOMIC_RELAXED);
}

void tk_sh_name(tk_fs *fs, tk_inode *ino) {
    if (!fs->sh || ino->slot >= SH_MAX_SLOTS) return;
    sh_inode *r = inorec(fs, ino->slot);
    __atomic_store_n(&r->parent, ino->parent ? ino->parent->slot : UINT32_MAX,
                     __ATOMIC_RELAXED);
    put_name(r, ino->name);
    r->hashed = (uint32_t)ino->hashed;
}

void tk_sh_inode_gone(tk_fs *fs, uint32_t slot) {
    if (!fs->sh || slot >= SH_MAX_SLOTS) return;
    __atomic_store_n(&inorec(fs, slot)->valid, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&inorec(fs, slot)->alt_valid, 0, __ATOMIC_RELEASE);
}

void tk_sh_swap(tk_fs *fs, tk_inode *ino, const struct stat *nst,
                const struct file_handle *h) {
    if (!fs->sh || ino->slot >= SH_MAX_SLOTS) return;
    sh_inode *r = inorec(fs, ino->slot);
    if (__atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) != SH_VALID) return;
    __atomic_store_n(&r->alt_valid, 0, __ATOMIC_RELEASE);
    r->alt_dev = (uint64_t)nst->st_dev;
    r->alt_ino = (uint64_t)nst->st_ino;
    if (h && h->handle_bytes <= sizeof r->alt_handle) {
        r->alt_htype = h->handle_type;
        r->alt_hbytes = h->handle_bytes;
        memcpy(r->alt_handle, h->f_handle, h->handle_bytes);
    } else {
        r->alt_htype = 0;
        r->alt_hbytes = 0;  /* pinned: a successor finds it by name (dev, ino) */
    }
    __atomic_store_n(&r->alt_valid, SH_VALID, __ATOMIC_RELEASE);
}

void tk_sh_swap_end(tk_fs *fs, tk_inode *ino) {
    if (!fs->sh || ino->slot >= SH_MAX_SLOTS) return;
    sh_inode *r = inorec(fs, ino->slot);
    if (__atomic_load_n(&r->alt_valid, __ATOMIC_ACQUIRE) != SH_VALID) return;
    put_object(r, ino);  /* what the inode names now (the same, or the alternate) */
    __atomic_store_n(&r->alt_valid, 0, __ATOMIC_RELEASE);
}

/* ---- open files --------------------------------------------------------------------- */

void tk_sh_fh(tk_fs *fs, uint32_t slot, int kind, uint32_t inode, int view, int fdflags,
              int append, int writable) {
    if (!fs->sh || slot >= SH_MAX_SLOTS) return;
    sh_fh *r = fhrec(fs, slot);
    if (fs->sh_reused && fs->restoring &&
        __atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) == SH_VALID)
        return;  /* see tk_sh_inode */
    pthread_mutex_lock(&fs->fhs.mu);  /* fh records are written by any thread */
    if (slot >= hdr(fs)->fh_next) __atomic_store_n(&hdr(fs)->fh_next, slot + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&fs->fhs.mu);
    __atomic_store_n(&r->valid, 0, __ATOMIC_RELEASE);
    r->kind = (uint32_t)kind;
    r->inode = inode;
    r->view = (uint32_t)view;
    r->fdflags = fdflags;
    r->append = (uint8_t)append;
    r->writable = (uint8_t)writable;
    __atomic_store_n(&r->valid, SH_VALID, __ATOMIC_RELEASE);
}

void tk_sh_fh_gone(tk_fs *fs, uint32_t slot) {
    if (!fs->sh || slot >= SH_MAX_SLOTS) return;
    __atomic_store_n(&fhrec(fs, slot)->valid, 0, __ATOMIC_RELEASE);
}

/* ---- the request journal ------------------------------------------------------------ */

static sh_jslot *jslot(tk_fs *fs, unsigned idx) {
    sh_header *h = hdr(fs);
    if (idx >= h->journal_slots) return NULL;
    return (sh_jslot *)(fs->sh->base + SH_JOURNAL_OFF +
                        (size_t)idx * (sizeof(sh_jslot) + h->journal_cap));
}

/* Where classic reader `idx` may read its next request (then tk_sh_journal_busy), or
 * NULL (no shadow, no slot, or too small: read elsewhere, no replay for it). */
uint8_t *tk_sh_journal_buf(tk_fs *fs, unsigned idx, size_t len) {
    if (!fs->sh) return NULL;
    sh_jslot *j = jslot(fs, idx);
    return j && len <= hdr(fs)->journal_cap ? j->data : NULL;
}

/* Make reader idx's slot resident (written once, locked): the kernel copies each
 * request into it, and a copy that must fault a page in while the process is being
 * killed fails -- the kernel then ends that request with EIO for the application. */
void tk_sh_journal_prefault(tk_fs *fs, unsigned idx) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (!j) return;
    size_t n = sizeof *j + hdr(fs)->journal_cap;
    memset(j, 0, n);
    (void)mlock(j, n);  /* best effort: unlocked, a swapped-out page could fault */
}

/* Before each read(2) into the slot: a request found there after a kill was read. */
void tk_sh_journal_reading(tk_fs *fs, unsigned idx) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (!j) return;
    __atomic_store_n(&j->state, 0, __ATOMIC_RELEASE);
    memset(j->data, 0, 40);  /* struct fuse_in_header */
    j->created[0] = 0;
    __atomic_store_n(&j->created[1], 0, __ATOMIC_RELEASE);
    __atomic_store_n(&j->state, SH_JREADING, __ATOMIC_RELEASE);
}

/* Just before the reply to the slot's request is written (iov as for writev). */
void tk_sh_journal_replying(tk_fs *fs, unsigned idx, const struct iovec *iov, int count) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (!j) return;
    size_t n = 0;
    for (int i = 0; i < count; i++) n += iov[i].iov_len;
    uint32_t rlen = 0;
    if (n <= SH_REPLY_MAX) {
        size_t off = 0;
        for (int i = 0; i < count; i++) {
            memcpy(j->reply + off, iov[i].iov_base, iov[i].iov_len);
            off += iov[i].iov_len;
        }
        rlen = (uint32_t)n;
    }
    j->rlen = rlen;
    __atomic_store_n(&j->state, SH_JREPLYING, __ATOMIC_RELEASE);
}

uint32_t tk_sh_journal_opcode(tk_fs *fs, unsigned idx) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    uint32_t op = 0;
    if (j) memcpy(&op, j->data + 4, 4);
    return op;
}

uint64_t tk_sh_journal_unique(tk_fs *fs, unsigned idx) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    return j ? j->unique : 0;
}

void tk_sh_journal_busy(tk_fs *fs, unsigned idx, size_t len, uint64_t unique) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (!j) return;
    j->len = (uint32_t)len;
    j->unique = unique;
    __atomic_store_n(&j->state, SH_JBUSY, __ATOMIC_RELEASE);
}

void tk_sh_journal_note(tk_fs *fs, unsigned idx, uint64_t dev, uint64_t ino) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (!j) return;
    j->created[0] = dev;
    __atomic_store_n(&j->created[1], ino, __ATOMIC_RELEASE);
}

void tk_sh_journal_done(tk_fs *fs, unsigned idx) {
    sh_jslot *j = fs->sh ? jslot(fs, idx) : NULL;
    if (j) __atomic_store_n(&j->state, 0, __ATOMIC_RELEASE);
}

/* ---- after a kill: the state, and the requests to serve again ----------------------- */

/* A file handle (malloc'd) of a record's type, length and bytes; NULL: out of memory. */
static struct file_handle *handle_from(int32_t type, uint32_t bytes, const uint8_t *data) {
    struct file_handle *h = malloc(sizeof *h + bytes);
    if (!h) return NULL;
    h->handle_type = type;
    h->handle_bytes = bytes;
    memcpy(h->f_handle, data, bytes);
    return h;
}

int tk_sh_load(tk_fs *fs, int memfd, tk_ho_state *st, uint8_t ***reqs, size_t **lens,
               size_t *nreqs, unsigned *slots, uint8_t *replies, char *err, size_t errlen) {
    memset(st, 0, sizeof *st);
    st->ring.memfd = -1;
    *reqs = NULL;
    *lens = NULL;
    *nreqs = 0;
    uint8_t *base = mmap(NULL, SH_SPAN, PROT_READ, MAP_SHARED | MAP_NORESERVE, memfd, 0);
    if (base == MAP_FAILED) {
        snprintf(err, errlen, "cannot map the stored state: %s", strerror(errno));
        return -errno;
    }
    int rc = -ENOMEM;
    const sh_header *h = (const sh_header *)base;
    if (h->magic != SH_MAGIC || h->version != SH_VERSION || h->init_len < 56 ||
        h->init_len > sizeof h->init || !memchr(h->mountpoint, 0, sizeof h->mountpoint) ||
        !memchr(h->backing, 0, sizeof h->backing) || h->journal_cap > (64u << 20)) {
        snprintf(err, errlen, "the stored state is not a takakrypt guard point's");
        munmap(base, SH_SPAN);
        return -EINVAL;
    }
    st->flags = h->flags;
    st->mountpoint = strdup(h->mountpoint);
    st->backing = strdup(h->backing);
    st->root_dev = h->root_dev;
    st->root_ino = h->root_ino;
    st->init_len = h->init_len;
    st->init = malloc(h->init_len);
    if (!st->mountpoint || !st->backing || !st->init) goto out;
    memcpy(st->init, h->init, h->init_len);
    /* inodes (below the high-water mark: pages never written read as zeros) */
    for (size_t slot = 0; slot < h->ino_next && slot < SH_MAX_SLOTS; slot++) {
        const sh_inode *r = (const sh_inode *)(base + SH_INO_OFF + slot * SH_INO_REC);
        if (__atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) != SH_VALID) continue;
        tk_ho_inode *n = realloc(st->inodes, (st->ninodes + 1) * sizeof *n);
        if (!n) goto out;
        st->inodes = n;
        tk_ho_inode *o = &st->inodes[st->ninodes++];
        memset(o, 0, sizeof *o);
        o->slot = (uint32_t)slot;
        o->parent = r->parent;
        o->type = r->type;
        o->dev = r->dev;
        o->ino = r->ino;
        o->nlookup[0] = r->nlookup[0];
        o->nlookup[1] = r->nlookup[1];
        o->hashed = r->hashed != 0;
        o->fd_index = -1;
        if (r->hbytes && r->hbytes <= sizeof r->handle) {
            if (!(o->handle = handle_from(r->htype, r->hbytes, r->handle))) goto out;
        } else if (slot) {
            o->fd_index = -2;  /* no way to reopen it: its operations fail closed */
        }
        if (__atomic_load_n(&r->alt_valid, __ATOMIC_ACQUIRE) == SH_VALID) {
            o->has_alt = 1;
            o->alt_dev = r->alt_dev;
            o->alt_ino = r->alt_ino;
            if (r->alt_hbytes && r->alt_hbytes <= sizeof r->alt_handle &&
                !(o->alt_handle = handle_from(r->alt_htype, r->alt_hbytes, r->alt_handle)))
                goto out;
        }
        uint32_t sel = r->name_sel & 1u;
        if (r->has_name[sel] && memchr(r->name[sel], 0, SH_NAME_MAX + 1) &&
            !(o->name = strdup(r->name[sel])))
            goto out;
    }
    /* open files */
    for (size_t slot = 0; slot < h->fh_next && slot < SH_MAX_SLOTS; slot++) {
        const sh_fh *r = (const sh_fh *)(base + SH_FH_OFF + slot * SH_FH_REC);
        if (__atomic_load_n(&r->valid, __ATOMIC_ACQUIRE) != SH_VALID) continue;
        tk_ho_fh *n = realloc(st->fhs, (st->nfhs + 1) * sizeof *n);
        if (!n) goto out;
        st->fhs = n;
        tk_ho_fh *o = &st->fhs[st->nfhs++];
        o->slot = (uint32_t)slot;
        o->kind = (int)r->kind;
        o->inode = r->inode;
        o->view = (int)r->view;
        o->fdflags = r->fdflags;
        o->append = r->append;
        o->writable = r->writable;
        if ((o->kind != TK_FH_FILE && o->kind != TK_FH_DIR) || o->view < 0 ||
            o->view >= TK_NVIEWS)
            st->nfhs--;
    }
    if (h->ring_nthreads) {
        st->ring.base = (uintptr_t)h->ring_base;
        st->ring.nthreads = h->ring_nthreads;
        st->ring.per = h->ring_per;
        st->ring.cap = (size_t)h->ring_cap;
        st->ring.memfd = 3;  /* an index into the fd list: [fuse, root, state, ring] */
        st->ring.parked = NULL;  /* after a kill: each entry says whether it was busy */
    }
    /* classic requests in progress at the kill (the states: sh_jslot) */
    for (unsigned i = 0; i < h->journal_slots && i < TK_SH_MAX_READERS; i++) {
        const sh_jslot *j = (const sh_jslot *)(base + SH_JOURNAL_OFF +
                                               (size_t)i * (sizeof(sh_jslot) + h->journal_cap));
        uint32_t state = __atomic_load_n(&j->state, __ATOMIC_ACQUIRE);
        const uint8_t *src = NULL;
        size_t n = 0;
        int reply = 0;
        if (state == SH_JREADING) {  /* the kernel's header says whether it wrote one */
            uint32_t hlen, op;
            uint64_t uq;
            memcpy(&hlen, j->data, 4);
            memcpy(&op, j->data + 4, 4);
            memcpy(&uq, j->data + 8, 8);
            if (hlen >= 40 && hlen <= h->journal_cap && uq && tk_replayable(op)) {
                src = j->data;
                n = hlen;
            }
        } else if (state == SH_JBUSY || state == SH_JREPLYING) {
            if (state == SH_JREPLYING && j->rlen >= 16 && j->rlen <= SH_REPLY_MAX) {
                src = j->reply;
                n = j->rlen;
                reply = 1;
            } else if (j->len >= 40 && j->len <= h->journal_cap) {
                src = j->data;
                n = j->len;
            }
        }
        if (!src) continue;
        if (!reply && j->created[1]) tk_add_recovered(fs, j->created[0], j->created[1]);
        if (slots) slots[*nreqs] = i;
        if (replies) replies[*nreqs] = (uint8_t)reply;
        uint8_t *copy = malloc(n);
        uint8_t **nr = realloc(*reqs, (*nreqs + 1) * sizeof *nr);
        size_t *nl = nr ? realloc(*lens, (*nreqs + 1) * sizeof *nl) : NULL;
        if (nr) *reqs = nr;
        if (nl) *lens = nl;
        if (!copy || !nr || !nl) {
            free(copy);
            goto out;
        }
        memcpy(copy, src, n);
        (*reqs)[*nreqs] = copy;
        (*lens)[(*nreqs)++] = n;
    }
    rc = 0;
out:
    munmap(base, SH_SPAN);
    if (rc) {
        tk_ho_state_free(st);
        for (size_t i = 0; i < *nreqs; i++) free((*reqs)[i]);
        free(*reqs);
        free(*lens);
        *reqs = NULL;
        *lens = NULL;
        *nreqs = 0;
        snprintf(err, errlen, "cannot read the stored state: out of memory");
    }
    return rc;
}
