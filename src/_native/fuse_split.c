/*
 * fuse_split.c -- decrypt a large read on several CPUs.
 *
 * Why: with FUSE over io_uring a request is served by a worker pinned to the CPU that
 * issued it (cheap wake-ups for the one-request-at-a-time chains of metadata work).
 * A sequential reader's readahead therefore lands, request after request, on the
 * reader's own CPU: the reader, the kernel's copies and every READ compete for one
 * CPU while the others idle (measured: a cold 1 GiB read left 40 % of two CPUs idle).
 * So the blocks of a large READ -- the backing pread, the decryption and the prefetch
 * hint for what comes next -- go to helper threads pinned to the *other* CPUs, one
 * part per CPU; the worker waits for them (its CPU stays free for the reader and the
 * kernel's copies) and then replies.  A read of fewer than 2 x TK_SPLIT_MIN_BLOCKS
 * blocks, or on a single CPU, is done by the worker alone, as before.
 *
 * Each part is an independent tk_taka_read_blocks() over its own block range into its
 * own slice of the reply buffer; the worker holds the inode's read lock throughout, so
 * the header, keys and fd stay valid while the helpers use them.  The result is that
 * of one call over the whole range: the error of the lowest failing part, with its
 * first bad block.
 */
#include "fuse_int.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

struct tk_split_part {
    struct tk_split_part *next;   /* in its helper's queue while queued */
    struct tk_split_req *r;
    uint64_t first, last;
    uint8_t *out;
    size_t got;
    uint64_t bad;
    const tk_hint *hint;          /* given to the backing file after the blocks */
    int rc;
    int state;                    /* 0 queued, 1 running, 2 done (under sp_mu) */
};

struct tk_split_req {
    tk_fs *fs;
    tk_taka *t;
    int fd;
    uint64_t size;
};

void tk_hint_apply(tk_fs *fs, int fd, const tk_hint *hint) {
    if (hint && hint->len &&
        posix_fadvise(fd, (off_t)hint->off, (off_t)hint->len, POSIX_FADV_WILLNEED) == 0)
        TK_INC(fs, read_prefetches, 1);
}

static void run_part(struct tk_split_part *p) {
    p->rc = tk_taka_read_blocks(p->r->fs, p->r->t, p->r->fd, p->r->size, p->first, p->last,
                                p->out, &p->got, &p->bad);
    tk_hint_apply(p->r->fs, p->r->fd, p->hint);
}

struct tk_split_helper {
    tk_fs *fs;
    int cpu;                      /* pinned here */
    pthread_t th;
    pthread_cond_t cv;            /* work queued for this helper (under fs->sp_mu) */
    struct tk_split_part *head;
};

static void *split_main(void *arg) {
    struct tk_split_helper *h = arg;
    tk_fs *fs = h->fs;
    tk_thread_pin(h->cpu, "tk-split");
    pthread_mutex_lock(&fs->sp_mu);
    for (;;) {
        while (!h->head && !fs->sp_stop) pthread_cond_wait(&h->cv, &fs->sp_mu);
        if (!h->head) break;  /* stopping, nothing left */
        struct tk_split_part *p = h->head;
        h->head = p->next;
        p->state = 1;
        pthread_mutex_unlock(&fs->sp_mu);
        run_part(p);
        pthread_mutex_lock(&fs->sp_mu);
        p->state = 2;
        pthread_cond_broadcast(&fs->sp_done_cv);
    }
    pthread_mutex_unlock(&fs->sp_mu);
    return NULL;
}

void tk_split_start(tk_fs *fs) {
    /* one helper pinned to each CPU: a worker hands parts to the helpers of the
     * other CPUs, so a part never queues behind the worker on its own CPU */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (!fs->cfg.read_helpers || ncpu < 2) return;  /* off, or nothing to spread over */
    if (ncpu > TK_SPLIT_MAX_CPUS) ncpu = TK_SPLIT_MAX_CPUS;
    struct tk_split_helper *h = calloc((size_t)ncpu, sizeof *h);
    if (!h) return;
    pthread_mutex_lock(&fs->sp_mu);
    fs->sp_stop = 0;
    pthread_mutex_unlock(&fs->sp_mu);
    unsigned n = 0;
    for (long i = 0; i < ncpu; i++) {
        h[n].fs = fs;
        h[n].cpu = (int)i;
        pthread_cond_init(&h[n].cv, NULL);
        if (pthread_create(&h[n].th, NULL, split_main, &h[n]) == 0) n++;
        else pthread_cond_destroy(&h[n].cv);
    }
    if (n < 2) {  /* fewer than two: nothing gained */
        fs->sp_helpers = h;
        fs->sp_nthreads = n;
        tk_split_stop(fs);
        return;
    }
    /* for the tests: cut every read of at least that many blocks into exactly that
     * many parts (several parts per helper), to reach the merging of parts' results
     * on a machine with two CPUs; 0 or unset: one part per other CPU */
    const char *force = getenv("TAKAKRYPT_TEST_SPLIT_PARTS");
    long fp = force ? strtol(force, NULL, 10) : 0;
    fs->sp_force_parts = fp > 0 && fp <= TK_SPLIT_MAX_CPUS ? (unsigned)fp : 0;
    fs->sp_helpers = h;
    __atomic_store_n(&fs->sp_nthreads, n, __ATOMIC_RELEASE);
}

void tk_split_stop(tk_fs *fs) {
    unsigned n = fs->sp_nthreads;
    struct tk_split_helper *h = fs->sp_helpers;
    if (!h) return;
    __atomic_store_n(&fs->sp_nthreads, 0, __ATOMIC_RELEASE);  /* no new splits */
    pthread_mutex_lock(&fs->sp_mu);
    fs->sp_stop = 1;
    for (unsigned i = 0; i < n; i++) pthread_cond_signal(&h[i].cv);
    pthread_mutex_unlock(&fs->sp_mu);
    for (unsigned i = 0; i < n; i++) {
        pthread_join(h[i].th, NULL);
        pthread_cond_destroy(&h[i].cv);
    }
    free(h);
    fs->sp_helpers = NULL;
}

int tk_split_read_blocks(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t first,
                         uint64_t last, uint8_t *out, size_t *outlen, uint64_t *bad,
                         const tk_hint *hint) {
    const uint64_t nblocks = last - first + 1;
    /* helpers are never freed while a request runs (stop comes after the last) */
    const unsigned ncpu = __atomic_load_n(&fs->sp_nthreads, __ATOMIC_ACQUIRE);
    uint64_t nparts = nblocks / TK_SPLIT_MIN_BLOCKS;
    if (ncpu < 2) nparts = 0;  /* no helpers */
    else if (fs->sp_force_parts) nparts = nblocks >= fs->sp_force_parts ? fs->sp_force_parts : 0;
    else if (nparts > ncpu - 1) nparts = ncpu - 1;  /* one part per other CPU */
    if (nparts < 1) {
        tk_hint_apply(fs, fd, hint);
        return tk_taka_read_blocks(fs, t, fd, size, first, last, out, outlen, bad);
    }

    struct tk_split_req r = {.fs = fs, .t = t, .fd = fd, .size = size};
    struct tk_split_part parts[TK_SPLIT_MAX_CPUS];
    struct tk_split_helper *h = fs->sp_helpers;
    int cpu = sched_getcpu();
    cpu = cpu < 0 ? 0 : cpu % (int)ncpu;
    const uint64_t per = nblocks / nparts, extra = nblocks % nparts;
    uint64_t b = first;
    for (uint64_t i = 0; i < nparts; i++) {
        uint64_t len = per + (i < extra ? 1 : 0);
        parts[i] = (struct tk_split_part){.r = &r, .first = b, .last = b + len - 1,
                                          .out = out + (b - first) * t->bs};
        b += len;
    }
    parts[nparts - 1].hint = hint;
    /* part i goes to the helper of the (i+1)-th CPU after ours, appended (FIFO) */
    pthread_mutex_lock(&fs->sp_mu);
    for (uint64_t i = 0; i < nparts; i++) {
        struct tk_split_helper *to = &h[((unsigned)cpu + 1 + (unsigned)i) % ncpu];
        struct tk_split_part **pp = &to->head;
        while (*pp) pp = &(*pp)->next;
        *pp = &parts[i];
        pthread_cond_signal(&to->cv);
    }
    TK_INC(fs, read_splits, nparts);
    for (uint64_t i = 0; i < nparts; i++)
        while (parts[i].state != 2) pthread_cond_wait(&fs->sp_done_cv, &fs->sp_mu);
    pthread_mutex_unlock(&fs->sp_mu);

    size_t got = 0;
    for (uint64_t i = 0; i < nparts; i++) {
        if (parts[i].rc) {
            *bad = parts[i].bad;
            return parts[i].rc;
        }
        got += parts[i].got;
    }
    *outlen = got;
    return 0;
}
