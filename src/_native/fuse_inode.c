/*
 * fuse_inode.c -- the inode table: backing (st_dev, st_ino) -> tk_inode, and the
 * kernel's node ids.
 *
 * Like libfuse's passthrough_ll, each known backing object is held by an O_PATH fd
 * and all access goes through *at() calls relative to these fds, never through the
 * mount path.  Unlike it, a regular file has TWO node ids, one per view (plaintext,
 * raw): lookup routes each caller to the node of its view, so the kernel keeps a
 * separate page cache and i_size per view.  A node id is the address of the tk_node
 * inside its tk_inode (FUSE_ROOT_ID is the root's plaintext node).
 *
 * Lifetime: refs = kernel lookups of both nodes + children whose name points here +
 * 1 for the root.  The kernel never uses a node id after its last forget, so an
 * inode is freed (under itab_mu) when refs reaches zero.
 *
 * Names: each inode remembers its most recent (parent, name) for policy paths;
 * rename and lookup update it.  A hard-linked file is named by its last lookup.
 */
#include "fuse_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

static void unref_locked(tk_fs *fs, tk_inode *ino, uint64_t n);

static void free_inode_locked(tk_fs *fs, tk_inode *ino) {
    tk_inode **pp = &fs->buckets[hash_of(fs, ino->dev, ino->ino)];
    while (*pp && *pp != ino) pp = &(*pp)->hnext;
    if (*pp) *pp = ino->hnext;
    fs->ninodes--;
    tk_inode *parent = ino->parent;
    close(ino->fd);
    free(ino->name);
    tk_taka_reset(&ino->taka);
    pthread_rwlock_destroy(&ino->lock);
    free(ino);
    if (parent) unref_locked(fs, parent, 1);
}

static void unref_locked(tk_fs *fs, tk_inode *ino, uint64_t n) {
    /* iterative over the parent chain would be nicer; depth is bounded by the tree */
    ino->refs -= n;
    if (ino->refs == 0) free_inode_locked(fs, ino);
}

static tk_inode *new_inode(int fd, const struct stat *st) {
    tk_inode *ino = calloc(1, sizeof *ino);
    if (!ino) return NULL;
    ino->fd = fd;
    ino->dev = st->st_dev;
    ino->ino = st->st_ino;
    ino->type = st->st_mode & S_IFMT;
    for (int v = 0; v < TK_NVIEWS; v++) {
        ino->node[v].ino = ino;
        ino->node[v].view = v;
    }
    pthread_rwlock_init(&ino->lock, NULL);
    return ino;
}

int tk_itab_init(tk_fs *fs) {
    struct stat st;
    fs->nbuckets = 1024;
    fs->buckets = calloc(fs->nbuckets, sizeof *fs->buckets);
    if (!fs->buckets) return -ENOMEM;
    if (fstatat(fs->root_fd, "", &st, AT_EMPTY_PATH) < 0) return -errno;
    fs->root = new_inode(fs->root_fd, &st);
    if (!fs->root) return -ENOMEM;
    fs->root->refs = 1;  /* pinned */
    fs->root->node[0].nlookup = 1;
    fs->buckets[hash_of(fs, st.st_dev, st.st_ino)] = fs->root;
    fs->ninodes = 1;
    return 0;
}

void tk_itab_free(tk_fs *fs) {
    if (!fs->buckets) return;
    for (size_t i = 0; i < fs->nbuckets; i++) {
        tk_inode *p = fs->buckets[i];
        while (p) {
            tk_inode *next = p->hnext;
            if (p != fs->root) close(p->fd);
            free(p->name);
            tk_taka_reset(&p->taka);
            pthread_rwlock_destroy(&p->lock);
            free(p);
            p = next;
        }
    }
    free(fs->buckets);
    fs->buckets = NULL;
    fs->root = NULL;  /* root_fd is closed by the owner */
}

tk_inode *tk_node_inode(tk_fs *fs, fuse_ino_t nodeid, int *view) {
    if (nodeid == FUSE_ROOT_ID) {
        if (view) *view = TK_VIEW_PLAIN;
        return fs->root;
    }
    /* SAFETY: the kernel only sends node ids we handed out and have not been told to
     * forget; each is the address of a live tk_node. */
    tk_node *n = (tk_node *)(uintptr_t)nodeid;
    if (view) *view = n->view;
    return n->ino;
}

fuse_ino_t tk_nodeid(tk_fs *fs, tk_inode *ino, int view) {
    if (ino == fs->root && view == TK_VIEW_PLAIN) return FUSE_ROOT_ID;
    return (fuse_ino_t)(uintptr_t)&ino->node[view];
}

static void set_name_locked(tk_fs *fs, tk_inode *ino, tk_inode *parent, const char *name) {
    if (ino == fs->root || !parent || !name) return;
    if (ino->parent == parent && ino->name && strcmp(ino->name, name) == 0) return;
    char *dup = strdup(name);
    if (!dup) return;  /* keep the old name */
    free(ino->name);
    ino->name = dup;
    if (ino->parent != parent) {
        parent->refs++;
        tk_inode *old = ino->parent;
        ino->parent = parent;
        if (old) unref_locked(fs, old, 1);
    }
}

void tk_inode_set_name(tk_fs *fs, tk_inode *ino, tk_inode *parent, const char *name) {
    pthread_mutex_lock(&fs->itab_mu);
    set_name_locked(fs, ino, parent, name);
    pthread_mutex_unlock(&fs->itab_mu);
}

tk_inode *tk_itab_add(tk_fs *fs, tk_inode *parent, const char *name, int fd,
                      const struct stat *st, int view) {
    pthread_mutex_lock(&fs->itab_mu);
    tk_inode *ino = find_locked(fs, st->st_dev, st->st_ino);
    if (ino) {
        close(fd);
    } else {
        ino = new_inode(fd, st);
        if (!ino) {
            pthread_mutex_unlock(&fs->itab_mu);
            close(fd);
            return NULL;
        }
        size_t h = hash_of(fs, st->st_dev, st->st_ino);
        ino->hnext = fs->buckets[h];
        fs->buckets[h] = ino;
        if (++fs->ninodes > 2 * fs->nbuckets) grow_locked(fs);
    }
    ino->node[view].nlookup++;
    ino->refs++;
    set_name_locked(fs, ino, parent, name);
    pthread_mutex_unlock(&fs->itab_mu);
    return ino;
}

void tk_itab_forget(tk_fs *fs, fuse_ino_t nodeid, uint64_t n) {
    int view;
    pthread_mutex_lock(&fs->itab_mu);
    tk_inode *ino = tk_node_inode(fs, nodeid, &view);
    if (ino == fs->root && nodeid == FUSE_ROOT_ID) {
        pthread_mutex_unlock(&fs->itab_mu);
        return;
    }
    tk_node *nd = &ino->node[view];
    if (n > nd->nlookup) n = nd->nlookup;
    nd->nlookup -= n;
    unref_locked(fs, ino, n);
    pthread_mutex_unlock(&fs->itab_mu);
}

void tk_itab_fix_name(tk_fs *fs, tk_inode *parent, const char *name) {
    struct stat st;
    if (fstatat(parent->fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return;
    pthread_mutex_lock(&fs->itab_mu);
    tk_inode *ino = find_locked(fs, st.st_dev, st.st_ino);
    if (ino) set_name_locked(fs, ino, parent, name);
    pthread_mutex_unlock(&fs->itab_mu);
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
        pthread_mutex_unlock(&fs->itab_mu);
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
    pthread_mutex_unlock(&fs->itab_mu);
    /* out[pos] is the leading '/' (or pos == len for the root): drop it */
    char *res = strdup(pos < len ? out + pos + 1 : "");
    free(out);
    return res;
}
