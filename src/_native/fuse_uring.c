/*
 * fuse_uring.c -- FUSE over io_uring for a guard point, under libfuse 3.14.
 *
 * Why: on a VM every classic FUSE request pays two cross-CPU wake-ups (the caller's CPU
 * queues the request, a worker on the other CPU wakes from halt; the reply wakes the
 * caller back).  Kernel >= 6.14 can instead hand each request to a ring entry of the
 * queue of the CPU it was issued on; a worker pinned to that CPU is woken locally,
 * which is several times cheaper (docs/guard-points.md, "FUSE over io_uring").
 *
 * libfuse 3.14 predates the feature, so this file does the transport and keeps
 * libfuse for everything else: decoding requests (fuse_session_process_buf) and
 * encoding replies (they reach io_writev() below, the session's custom I/O):
 *
 *  - io_read/io_writev: the classic /dev/fuse channel stays in use (INIT, FORGET,
 *    INTERRUPT, notifications, and every request until all queues are registered).
 *    io_writev sets FUSE_OVER_IO_URING in our INIT reply when asked to, and routes a
 *    reply to the ring entry whose request this thread is handling (thread-local).
 *  - per CPU q, `per_queue` threads pinned to q, each with its own io_uring (SQE128)
 *    and ONE entry: REGISTER, then for every request: rebuild the classic request
 *    buffer in place (header and per-op struct copied in front of the payload, so the
 *    payload is never copied), let libfuse dispatch it, COMMIT_AND_FETCH the reply.
 *  - stop: an eventfd polled by every ring; the connection's abort also cancels them.
 *
 * Anything failing here (no io_uring, the module parameter off, an old kernel that
 * rejects the commands) leaves the classic channel serving every request: the ring is
 * an accelerator, never a requirement.  Kernel ABI: include/uapi/linux/fuse.h 7.42.
 */
#include "fuse_int.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>  /* fuse_in_header, fuse_out_header (ABI 7.x, stable) */
#include <liburing.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ---- kernel ABI (fuse.h 7.42), not in Debian 12's headers ------------------------- */
#define TK_FUSE_INIT_EXT (1u << 30)
#define TK_FUSE_OVER_IO_URING_FLAGS2 (1u << (41 - 32))
#define TK_URING_CMD_REGISTER 1u
#define TK_URING_CMD_COMMIT_AND_FETCH 2u
#define TK_FUSE_HANDLE_KILLPRIV (1u << 19)
#define TK_FUSE_HANDLE_KILLPRIV_V2 (1u << 28)
#define TK_FUSE_INIT 26u
#define TK_INIT_IN_FLAGS 12    /* offset in struct fuse_init_in */
#define TK_INIT_OUT_FLAGS 12   /* offsets in struct fuse_init_out */
#define TK_INIT_OUT_FLAGS2 32

struct tk_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;   /* set by the kernel with each request; echoed in the commit */
    uint32_t payload_sz;  /* bytes valid in the payload buffer, both directions */
    uint32_t padding;
    uint64_t reserved;
};

struct tk_uring_req_header {
    char in_out[128];     /* struct fuse_in_header / struct fuse_out_header */
    char op_in[128];      /* the request's per-op struct (in_args[0]) */
    struct tk_uring_ent_in_out ent;
};

struct tk_uring_cmd_req {  /* in the SQE128 command area */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct tk_uring_req_header) == 288, "fuse_uring_req_header is 288 bytes");
_Static_assert(sizeof(struct tk_uring_cmd_req) == 24, "fuse_uring_cmd_req is 24 bytes");
_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header is 40 bytes");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header is 16 bytes");

#define TK_STOP_TAG ((uint64_t)1)
#define TK_SLACK 256  /* room in front of the payload for the rebuilt request head */

typedef struct {
    struct tk_uring_req_header *hdr; /* registered iov[0], in the ring memfd */
    struct iovec iov[2];
    char *area;                      /* TK_SLACK + payload_cap bytes, in the ring memfd */
    char *payload;                   /* registered iov[1] */
    size_t payload_cap;
    uint64_t unique;                 /* request being handled */
    int replied;
} tk_uent;

typedef struct tk_uthread {
    tk_fs *fs;
    unsigned qid;
    pthread_t th;
    int started;
    struct io_uring ring;
    int ring_ok;
    int adopt;                       /* 1: the entry holds a predecessor's parked request */
    int parked;                      /* 1: holding a request for the successor (ho_mu) */
    tk_uent ent;
} tk_uthread;

/* Every entry's buffers live in one memfd mapped at the same address in this process
 * and in a successor (a handover, fuse_handover.c): the kernel keeps each entry's
 * buffer ADDRESSES, and a successor that commits a parked entry's reply is read from
 * there, in its own address space. */
struct tk_uring {
    unsigned nthreads, per;          /* threads in all, per queue (qid = i / per) */
    int stop_fd;                     /* eventfd */
    int stopping;                    /* tk_uring_stop began (ho_mu) */
    tk_uthread *t;
    int memfd;
    char *base;                      /* the mapping of memfd (TK_RING_SPAN bytes) */
    size_t stride, cap;              /* bytes per entry, payload capacity */
    unsigned parked;                 /* threads parked (ho_mu) */
};

static __thread tk_uent *tl_cur;     /* the entry this thread is answering, if any */

/* ---- the session's I/O ------------------------------------------------------------- */

/* Once every ring entry is registered, the classic channel carries only FORGETs (one
 * per inode the kernel drops: one per unlinked file), INTERRUPTs and the like.  Read as
 * they come, each FORGET wakes a reader -- on a VM an inter-processor interrupt paid by
 * the unlinking caller -- and each reader's close(2) of the backing inode competes with
 * that caller.  So then one thread reads at a time, at most every TK_CLASSIC_GATE_NS:
 * FORGETs queue in the kernel meanwhile and arrive as one BATCH_FORGET.  An INTERRUPT
 * waits at most that long.  benchmarks/rmrf.sh measures the effect (its A/B knob:
 * TAKAKRYPT_CLASSIC_GATE_US, 0 = read as they come). */
#define TK_CLASSIC_GATE_NS 1000000ull

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void classic_release(void *arg) {
    tk_fs *fs = arg;
    __atomic_store_n(&fs->classic_next_ns, mono_ns() + fs->classic_gate_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&fs->classic_reader, 0, __ATOMIC_RELEASE);
}

/* Wait for the reader's turn; sleeps are cancellation points (libfuse cancels idle
 * workers at the end of the loop), so nothing is held while waiting. */
static void classic_acquire(tk_fs *fs) {
    for (;;) {
        if (!__atomic_exchange_n(&fs->classic_reader, 1, __ATOMIC_ACQUIRE)) break;
        struct timespec d = {0, (long)fs->classic_gate_ns};
        nanosleep(&d, NULL);
    }
    uint64_t next = __atomic_load_n(&fs->classic_next_ns, __ATOMIC_RELAXED);
    uint64_t now = mono_ns();
    if (next > now) {
        uint64_t w = next - now < fs->classic_gate_ns ? next - now : fs->classic_gate_ns;
        struct timespec d = {0, (long)w};
        pthread_cleanup_push(classic_release, fs);
        nanosleep(&d, NULL);
        pthread_cleanup_pop(0);
    }
}

/* Classic readers and a handover (fuse_handover.c): while fs->ho_quiesce is set no
 * reader starts a read(2); the handover kicks readers out of one they are in (a signal
 * without SA_RESTART: EINTR) and waits until none is in read(2) and every request read
 * is done (ho_busy: from a read's return to the reader's next io_read call). */
static __thread int tl_busy;        /* this reader's last request is not done yet */
static __thread tk_fs *tl_reader;   /* registered as a classic reader of this fs */
static __thread unsigned tl_jidx;   /* its request journal slot (fuse_shadow.c) */
static __thread int tl_journaled;   /* the request it serves is in the journal */

void tk_note_create(tk_fs *fs, uint64_t dev, uint64_t ino) {
    if (tl_cur) {  /* a ring entry: beside its busy word (uring_main) */
        uint64_t *c = (uint64_t *)((char *)tl_cur->hdr + 2048 + 8);
        c[0] = dev;
        __atomic_store_n(&c[1], ino, __ATOMIC_RELEASE);
    } else if (tl_journaled && tl_reader == fs) {
        tk_sh_journal_note(fs, tl_jidx, dev, ino);
    }
}

/* Tests only: TAKAKRYPT_TEST_KILL_AT="read:OP:FILE" or "reply:OP:FILE" -- the server
 * SIGKILLs itself at a request of opcode OP just after reading it (the journal slot
 * still says READING: as a kill on the way back from read(2) leaves it), or just before
 * writing its reply (REPLYING), if it can create FILE (so once: not its successors),
 * for tests/test_fuse_handover.py to check what a successor does with each state. */
static int test_kill_at(int reply, uint32_t opcode) {
    static int parsed, when = -1;
    static uint32_t op;
    static char marker[256];
    if (!__atomic_load_n(&parsed, __ATOMIC_ACQUIRE)) {
        const char *v = getenv("TAKAKRYPT_TEST_KILL_AT");
        unsigned o;
        char w[8];
        if (v && sscanf(v, "%5[a-z]:%u:%255s", w, &o, marker) == 3) {
            when = !strcmp(w, "read") ? 0 : !strcmp(w, "reply") ? 1 : -1;
            op = o;
        }
        __atomic_store_n(&parsed, 1, __ATOMIC_RELEASE);
    }
    if (when != reply || op != opcode) return 0;
    int fd = open(marker, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) return 0;
    close(fd);
    return 1;
}

static ssize_t classic_read(tk_fs *fs, int fd, void *buf, size_t len) {
    ssize_t n;
    if (__atomic_load_n(&fs->classic_gated, __ATOMIC_ACQUIRE)) {
        classic_acquire(fs);
        pthread_cleanup_push(classic_release, fs);
        n = read(fd, buf, len);
        pthread_cleanup_pop(1);
    } else {
        n = read(fd, buf, len);
    }
    return n;
}

static ssize_t io_read(int fd, void *buf, size_t len, void *ud) {
    tk_fs *fs = ud;
    ssize_t n;
    if (tl_busy) {
        if (tl_journaled) tk_sh_journal_done(fs, tl_jidx);
        tl_journaled = 0;
        tl_busy = 0;
        __atomic_sub_fetch(&fs->ho_busy, 1, __ATOMIC_ACQ_REL);
    }
    if (tl_reader != fs) {
        tl_reader = fs;
        tl_jidx = tk_ho_register_reader(fs);
        tk_sh_journal_prefault(fs, tl_jidx);
    }
    for (;;) {
        if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST)) {
            tk_ho_wait(fs);  /* until the handover is aborted (never if done) */
            continue;
        }
        __atomic_add_fetch(&fs->ho_in_read, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST)) {
            __atomic_sub_fetch(&fs->ho_in_read, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        /* with a shadow (fuse_shadow.c) the request is read into this reader's journal
         * slot first: a successor serves it again if we are killed before the reply */
        uint8_t *jb = tk_sh_journal_buf(fs, tl_jidx, len);
        if (jb) tk_sh_journal_reading(fs, tl_jidx);
        n = classic_read(fs, fd, jb ? (void *)jb : buf, len);
        int err = errno;
        if (n > 0) {
            if (jb) {
                const struct fuse_in_header *h = (const void *)jb;
                if ((size_t)n >= sizeof *h && test_kill_at(0, h->opcode)) raise(SIGKILL);
                if ((size_t)n >= sizeof *h && tk_replayable(h->opcode)) {
                    tk_sh_journal_busy(fs, tl_jidx, (size_t)n, h->unique);
                    tl_journaled = 1;
                } else {
                    tk_sh_journal_done(fs, tl_jidx);
                }
                memcpy(buf, jb, (size_t)n);
            }
            tl_busy = 1;
            __atomic_add_fetch(&fs->ho_busy, 1, __ATOMIC_SEQ_CST);
        }
        __atomic_sub_fetch(&fs->ho_in_read, 1, __ATOMIC_SEQ_CST);
        if (n < 0 && err == EINTR) continue;  /* a handover's kick, or any signal */
        errno = err;
        break;
    }
    if (n >= (ssize_t)sizeof(struct fuse_in_header)) {
        const struct fuse_in_header *h = buf;
        if (h->opcode == TK_FUSE_INIT) {
            uint32_t offered = 0;
            if ((size_t)n >= sizeof *h + TK_INIT_IN_FLAGS + 4)
                memcpy(&offered, (const char *)buf + sizeof *h + TK_INIT_IN_FLAGS, 4);
            fs->init_in_flags = offered;
            /* kept for a successor, which replays it to its own libfuse session */
            uint8_t *copy = malloc((size_t)n);
            if (copy) {
                memcpy(copy, buf, (size_t)n);
                free(fs->init_req);
                fs->init_req = copy;
                fs->init_req_len = (size_t)n;
            }
            __atomic_store_n(&fs->init_unique, h->unique, __ATOMIC_RELEASE);
        }
    }
    return n;
}

static ssize_t reply_to_entry(tk_uent *e, const struct iovec *iov, int count) {
    struct fuse_out_header out;
    memcpy(&out, iov[0].iov_base, sizeof out);
    size_t len = 0;
    for (int i = 1; i < count; i++) {
        if (iov[i].iov_len > e->payload_cap - len) {  /* cannot happen: max_write bound */
            out.error = -EIO;
            len = 0;
            break;
        }
        if (iov[i].iov_base != e->payload + len)  /* else already in place */
            memmove(e->payload + len, iov[i].iov_base, iov[i].iov_len);
        len += iov[i].iov_len;
    }
    out.len = (uint32_t)(sizeof out + len);
    memcpy(e->hdr->in_out, &out, sizeof out);
    e->hdr->ent.payload_sz = (uint32_t)len;
    e->replied = 1;
    return (ssize_t)out.len;
}

char *tk_uring_reply_space(size_t size) {
    tk_uent *e = tl_cur;
    return e && size <= e->payload_cap ? e->payload : NULL;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *ud) {
    tk_fs *fs = ud;
    struct fuse_out_header out;
    if (count < 1 || iov[0].iov_len < sizeof out) return writev(fd, iov, count);
    memcpy(&out, iov[0].iov_base, sizeof out);
    tk_uent *e = tl_cur;
    if (e && out.unique != 0 && out.unique == e->unique) return reply_to_entry(e, iov, count);
    if (fs->resume_unique && out.unique == fs->resume_unique) {
        /* the reply to a resume's replayed INIT: the kernel negotiated long ago */
        ssize_t total = 0;
        for (int i = 0; i < count; i++) total += (ssize_t)iov[i].iov_len;
        return total;
    }
    uint64_t init = __atomic_load_n(&fs->init_unique, __ATOMIC_ACQUIRE);
    if (init && out.unique == init) {
        /* our INIT reply: libfuse 3.14 cannot offer FUSE_OVER_IO_URING nor
         * HANDLE_KILLPRIV_V2; both are patched in here (docs/guard-points.md) */
        struct iovec v[2];
        char init_out[256];
        ssize_t r;
        if (out.error == 0 && count == 2 &&
            iov[1].iov_len >= TK_INIT_OUT_FLAGS2 + 4 && iov[1].iov_len <= sizeof init_out) {
            uint32_t flags, flags2;
            memcpy(init_out, iov[1].iov_base, iov[1].iov_len);
            memcpy(&flags, init_out + TK_INIT_OUT_FLAGS, 4);
            memcpy(&flags2, init_out + TK_INIT_OUT_FLAGS2, 4);
            if (fs->cfg.io_uring && (flags & TK_FUSE_INIT_EXT)) {
                flags2 |= TK_FUSE_OVER_IO_URING_FLAGS2;
                fs->uring_offered = 1;
            }
            /* we clear setuid/setgid ourselves (fuse_ops.c, kill_suidgid); the kernel
             * then stops asking for security.capability before every write */
            if (fs->init_in_flags & TK_FUSE_HANDLE_KILLPRIV_V2) {
                flags = (flags & ~TK_FUSE_HANDLE_KILLPRIV) | TK_FUSE_HANDLE_KILLPRIV_V2;
                __atomic_store_n(&fs->st.killpriv_v2, 1, __ATOMIC_RELAXED);
            }
            memcpy(init_out + TK_INIT_OUT_FLAGS, &flags, 4);
            memcpy(init_out + TK_INIT_OUT_FLAGS2, &flags2, 4);
            v[0] = iov[0];
            v[1].iov_base = init_out;
            v[1].iov_len = iov[1].iov_len;
            r = writev(fd, v, 2);
        } else {
            r = writev(fd, iov, count);
        }
        pthread_mutex_lock(&fs->state_mu);
        fs->init_replied = r >= 0 ? 1 : -1;
        pthread_cond_broadcast(&fs->state_cv);
        pthread_mutex_unlock(&fs->state_mu);
        return r;
    }
    /* the reply to the journaled request (not a notification, unique 0): saved
     * first, so that a successor sends it again instead of serving the request twice
     * if we are killed around the writev (sh_jslot in fuse_shadow.c) */
    int mine = tl_journaled && tl_reader == fs && out.unique != 0 &&
               out.unique == tk_sh_journal_unique(fs, tl_jidx);
    if (mine) {
        tk_sh_journal_replying(fs, tl_jidx, iov, count);
        if (test_kill_at(1, tk_sh_journal_opcode(fs, tl_jidx))) raise(SIGKILL);
    }
    ssize_t r = writev(fd, iov, count);
    if (mine) {  /* answered (or refused: the kernel no longer waits): never again */
        tk_sh_journal_done(fs, tl_jidx);
        tl_journaled = 0;
    }
    return r;
}

static const struct fuse_custom_io tk_io = {
    .writev = io_writev,
    .read = io_read,
};

int tk_uring_attach_io(tk_fs *fs) {
    return fuse_session_custom_io(fs->se, &tk_io, fuse_session_fd(fs->se));
}

/* ---- ring threads ------------------------------------------------------------------- */

static int queue_cmd(tk_uthread *t, uint32_t op, uint64_t commit_id) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (!sqe) return -EBUSY;
    memset(sqe, 0, 128);  /* SQE128 */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_session_fd(t->fs->se);
    sqe->cmd_op = op;
    sqe->user_data = (uint64_t)(uintptr_t)&t->ent;
    if (op == TK_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)t->ent.iov;
        sqe->len = 2;
    }
    struct tk_uring_cmd_req c = {.flags = 0, .commit_id = commit_id, .qid = (uint16_t)t->qid};
    memcpy(sqe->cmd, &c, sizeof c);
    return 0;
}

/* Rebuild the classic request (header, per-op struct, payload) in front of the payload,
 * dispatch it through libfuse, and commit the reply. */
static int handle_request(tk_uthread *t) {
    tk_fs *fs = t->fs;
    tk_uent *e = &t->ent;
    struct fuse_in_header ih;
    memcpy(&ih, e->hdr->in_out, sizeof ih);
    uint64_t commit_id = e->hdr->ent.commit_id;
    uint32_t psz = e->hdr->ent.payload_sz;
    size_t opsz = (size_t)ih.len - sizeof ih - psz;
    TK_INC(fs, uring_requests, 1);
    if (ih.len < sizeof ih + psz || psz > e->payload_cap || opsz > sizeof e->hdr->op_in) {
        /* not the layout we know: fail this request, loudly in the counters */
        TK_INC(fs, uring_bad_requests, 1);
        struct fuse_out_header out = {.len = sizeof out, .error = -EIO, .unique = ih.unique};
        memcpy(e->hdr->in_out, &out, sizeof out);
        e->hdr->ent.payload_sz = 0;
    } else {
        char *start = e->payload - sizeof ih - opsz;
        memcpy(start, &ih, sizeof ih);
        memcpy(start + sizeof ih, e->hdr->op_in, opsz);
        struct fuse_buf b;
        memset(&b, 0, sizeof b);
        b.mem = start;
        b.size = ih.len;
        e->unique = ih.unique;
        e->replied = 0;
        tl_cur = e;
        fuse_session_process_buf(fs->se, &b);
        tl_cur = NULL;
        if (!e->replied) {  /* an operation without a reply: none comes this way */
            struct fuse_out_header out = {.len = sizeof out, .error = -ENOSYS,
                                          .unique = ih.unique};
            memcpy(e->hdr->in_out, &out, sizeof out);
            e->hdr->ent.payload_sz = 0;
        }
    }
    /* queued only: uring_main submits it together with the wait for the next request */
    return queue_cmd(t, TK_URING_CMD_COMMIT_AND_FETCH, commit_id);
}

/* Park this thread's entry for a handover: its request stays unanswered in the
 * shared buffers (the successor answers it).  1: the handover was aborted, serve the
 * request here after all; 0: stop (handed over, or the ring stops). */
static int park(tk_uthread *t) {
    tk_fs *fs = t->fs;
    struct tk_uring *u = fs->uring;
    pthread_mutex_lock(&fs->ho_mu);
    t->parked = 1;
    u->parked++;
    pthread_cond_broadcast(&fs->ho_cv);
    while (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST) && !fs->ho_done && !u->stopping)
        pthread_cond_wait(&fs->ho_cv, &fs->ho_mu);
    int serve = !fs->ho_done && !u->stopping;
    if (serve) {
        t->parked = 0;
        u->parked--;
    }
    pthread_mutex_unlock(&fs->ho_mu);
    return serve;
}

static void *uring_main(void *arg) {
    tk_uthread *t = arg;
    tk_fs *fs = t->fs;
    tk_thread_pin((int)t->qid, "tk-uring");
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (sqe) {
        io_uring_prep_poll_add(sqe, fs->uring->stop_fd, POLLIN);
        sqe->user_data = TK_STOP_TAG;
    }
    int rc;
    uint64_t served = 0;
    /* 1 while this entry holds a request not yet answered (in the ring memfd: after a
     * kill, a successor answers the entries that say so) */
    uint32_t *busy = (uint32_t *)((char *)t->ent.hdr + 2048);
    int adopting = t->adopt;
    if (t->adopt) {
        /* a predecessor's parked request: answer it; the commit makes the kernel's
         * entry (these very buffers) ours */
        served = 1;
        rc = handle_request(t);
    } else {
        rc = queue_cmd(t, TK_URING_CMD_REGISTER, 0);
    }
    if (rc == 0 && io_uring_submit(&t->ring) < 0) rc = -EIO;
    if (rc == 0 && t->adopt) __atomic_store_n(busy, 0, __ATOMIC_RELEASE);
    int registered = rc == 0, lost = 0;
    /* fault injection for the tests: this thread's entry "breaks" after N requests */
    const char *fault = getenv("TAKAKRYPT_TEST_URING_BREAK_AFTER");
    uint64_t break_after = fault ? strtoull(fault, NULL, 10) : 0;
    if (registered &&
        __atomic_add_fetch(&fs->st.uring_threads, 1, __ATOMIC_RELAXED) == fs->uring->nthreads &&
        fs->classic_gate_ns)
        __atomic_store_n(&fs->classic_gated, 1, __ATOMIC_RELEASE);
    int pending = 0;  /* a COMMIT_AND_FETCH queued by handle_request, not yet submitted */
    while (registered) {
        struct io_uring_cqe *cqe;
        if (pending) {
            /* the reply and the wait for the next request: one io_uring_enter */
            int s = io_uring_submit_and_wait(&t->ring, 1);
            if (s == -EINTR) continue;  /* nothing submitted: again */
            if (s < 0) {
                lost = 1;
                break;
            }
            pending = 0;
            __atomic_store_n(busy, 0, __ATOMIC_RELEASE);
        }
        int r = io_uring_wait_cqe(&t->ring, &cqe);  /* no system call if it is there */
        if (r == -EINTR) continue;
        if (r < 0) break;
        uint64_t ud = cqe->user_data;
        int res = cqe->res;
        io_uring_cqe_seen(&t->ring, cqe);
        if (ud == TK_STOP_TAG) break;
        if (res < 0 && adopting) {
            /* the predecessor had answered it after all (the kernel has no such
             * request): take a fresh entry with the same buffers */
            adopting = 0;
            __atomic_store_n(busy, 0, __ATOMIC_RELEASE);
            if (queue_cmd(t, TK_URING_CMD_REGISTER, 0) == 0 && io_uring_submit(&t->ring) >= 0)
                continue;
            break;
        }
        adopting = 0;
        if (res < 0) {  /* refused (no io_uring for FUSE here) or the connection ended */
            if (res != -ENOTCONN && res != -ECANCELED && res != -ENODEV &&
                res != -ECONNABORTED) {
                __atomic_store_n(&fs->uring_error, -res, __ATOMIC_RELAXED);
                lost = served > 0;
            }
            break;
        }
        ((uint64_t *)(busy + 2))[0] = ((uint64_t *)(busy + 2))[1] = 0;  /* created */
        __atomic_store_n(busy, 1, __ATOMIC_RELEASE);
        if (__atomic_load_n(&fs->ho_quiesce, __ATOMIC_SEQ_CST) && !park(t)) {
            registered = 0;  /* the successor has this entry now: leave it alone */
            break;
        }
        served++;
        if ((break_after && served > break_after) || handle_request(t)) {
            lost = 1;
            break;
        }
        pending = 1;
    }
    /* An entry that served requests and is gone while the connection lives would leave
     * its CPU's requests waiting forever once the others are busy: fail closed instead
     * (the connection is aborted; callers get an error, the agent sees the mount dead). */
    if (lost) {
        TK_INC(fs, uring_lost, 1);
        tk_fs_abort_live(fs);
    }
    if (registered || t->parked) {
        __atomic_store_n(&fs->classic_gated, 0, __ATOMIC_RELEASE);
        __atomic_fetch_sub(&fs->st.uring_threads, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* The ring memfd's address: the same in a successor (where nothing else sits there:
 * far below the mmap area and far above the heap of a 64-bit process), a different
 * one per guard point of a process. */
#define TK_RING_BASE ((uintptr_t)0x2a0000000000ull)
#define TK_RING_SPAN ((size_t)1 << 34)   /* 16 GiB of address space per guard point */

static char *map_ring(int memfd, uintptr_t want) {
    for (unsigned k = 0; k < 64; k++) {
        uintptr_t a = want ? want : TK_RING_BASE + (uintptr_t)k * TK_RING_SPAN;
        void *p = mmap((void *)a, TK_RING_SPAN, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_FIXED_NOREPLACE | MAP_NORESERVE, memfd, 0);
        if (p != MAP_FAILED && (uintptr_t)p == a) {
            (void)madvise(p, TK_RING_SPAN, MADV_DONTDUMP);  /* 16 GiB, mostly holes */
            return p;
        }
        if (p != MAP_FAILED) munmap(p, TK_RING_SPAN);  /* an old kernel took it as a hint */
        if (want) return NULL;
    }
    return NULL;
}

/* Start the ring threads once our INIT reply is written.  0, or -errno (then the
 * classic channel simply carries everything).  With `from` (a resume): the
 * predecessor's memfd mapped at its address, its layout, and each thread whose
 * parked[] is set first answers that entry's request. */
static int uring_start(tk_fs *fs, const tk_ring_state *from) {
    if (!fs->uring_offered) return -EOPNOTSUPP;
    if (!from && !fs->cfg.io_uring) return -EOPNOTSUPP;
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    if (ncpu < 1 || ncpu > 1024) return -EINVAL;
    /* one entry per thread: a thread blocked in a slow request (an agent round trip,
     * an fsync) holds only its own entry */
    unsigned per = fs->cfg.io_uring_per_queue > 0 ? (unsigned)fs->cfg.io_uring_per_queue
                                                  : (unsigned)fs->cfg.threads;
    /* payload: what the kernel may send or want back in one request (max_write, a
     * readdir/read of max_pages) -- libfuse 3.14 negotiates 1 MiB */
    size_t cap = (size_t)256 * 4096 + 4096;
    unsigned nthreads = (unsigned)ncpu * per;
    if (from) {
        per = from->per;
        cap = from->cap;
        nthreads = from->nthreads;
        if (!per || !nthreads || nthreads % per || nthreads / per > (unsigned)ncpu ||
            cap < 4096 || cap > ((size_t)64 << 20))
            return -EINVAL;
    }
    size_t stride = 4096 + ((TK_SLACK + cap + 4095) & ~(size_t)4095);
    if ((size_t)nthreads * stride > TK_RING_SPAN) return -E2BIG;
    struct tk_uring *u = calloc(1, sizeof *u);
    if (!u) return -ENOMEM;
    u->nthreads = nthreads;
    u->per = per;
    u->cap = cap;
    u->stride = stride;
    u->stop_fd = eventfd(0, EFD_CLOEXEC);
    u->t = calloc(u->nthreads, sizeof *u->t);
    u->memfd = from ? fcntl(from->memfd, F_DUPFD_CLOEXEC, 3)
                    : memfd_create("takakrypt-ring", MFD_CLOEXEC);
    u->base = NULL;
    if (u->memfd >= 0 && (from || ftruncate(u->memfd, (off_t)(nthreads * stride)) == 0))
        u->base = map_ring(u->memfd, from ? from->base : 0);
    if (u->stop_fd < 0 || !u->t || !u->base) {
        int rc = !u->t ? -ENOMEM : u->memfd < 0 ? -EMFILE : -EADDRINUSE;
        if (u->stop_fd >= 0) close(u->stop_fd);
        if (u->memfd >= 0) close(u->memfd);
        free(u->t);
        free(u);
        return rc;
    }
    fs->uring = u;
    const char *gate = getenv("TAKAKRYPT_CLASSIC_GATE_US");  /* 0 .. 100000 */
    unsigned long long us = gate ? strtoull(gate, NULL, 10) : TK_CLASSIC_GATE_NS / 1000;
    fs->classic_gate_ns = (us > 100000 ? 100000 : us) * 1000;
    int rc = 0;
    for (unsigned i = 0; i < u->nthreads && rc == 0; i++) {
        tk_uthread *t = &u->t[i];
        t->fs = fs;
        t->qid = i / per;
        t->adopt = from && (from->parked ? from->parked[i] != 0
                                         : __atomic_load_n((uint32_t *)(u->base + (size_t)i * stride + 2048),
                                                           __ATOMIC_ACQUIRE) == 1);
        if (t->adopt && !from->parked) {  /* after a kill: what it may have created */
            const uint64_t *c = (const uint64_t *)(u->base + (size_t)i * stride + 2056);
            if (c[1]) tk_add_recovered(fs, c[0], c[1]);
        }
        t->ent.payload_cap = cap;
        t->ent.hdr = (struct tk_uring_req_header *)(u->base + (size_t)i * stride);
        t->ent.area = u->base + (size_t)i * stride + 4096;
        t->ent.payload = t->ent.area + TK_SLACK;
        t->ent.iov[0].iov_base = t->ent.hdr;
        t->ent.iov[0].iov_len = sizeof *t->ent.hdr;
        t->ent.iov[1].iov_base = t->ent.payload;
        t->ent.iov[1].iov_len = cap;
        /* resident and locked: the kernel copies requests into these pages (a fault
         * while we are being killed would fail the request: fuse_shadow.c); a
         * predecessor's pages are kept as they are (they hold its requests) */
        char *ebase = u->base + (size_t)i * stride;
        if (!from) memset(ebase, 0, stride);
        (void)mlock(ebase, stride);
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_SQE128;
        rc = io_uring_queue_init_params(4, &t->ring, &p);
        if (rc < 0) break;
        t->ring_ok = 1;
        rc = -pthread_create(&t->th, NULL, uring_main, t);
        if (rc == 0) t->started = 1;
    }
    if (rc) tk_uring_stop(fs);
    return rc;
}

int tk_uring_start(tk_fs *fs) {
    return uring_start(fs, NULL);
}

int tk_uring_resume(tk_fs *fs, const tk_ring_state *from) {
    return uring_start(fs, from);
}

/* A handover: park every entry (each holds a request the successor will answer).
 * Idle entries are given a request of our own: a lookup of a name nobody has, from a
 * thread on the entry's CPU (the kernel queues a request on the caller's CPU); the
 * successor answers it (ENOENT) and the thread ends.  0, or -ETIMEDOUT. */
struct park_req {
    char path[4200];
    int cpu;
};

static void *park_main(void *arg) {
    struct park_req *r = arg;
    tk_thread_pin(r->cpu, "tk-park");
    struct stat st;
    (void)fstatat(AT_FDCWD, r->path, &st, AT_SYMLINK_NOFOLLOW);
    free(r);
    return NULL;
}

int tk_uring_park_all(tk_fs *fs, int timeout_ms) {
    struct tk_uring *u = fs->uring;
    if (!u) return 0;
    static unsigned seq;
    uint64_t deadline = mono_ns() + (uint64_t)timeout_ms * 1000000ull;
    pthread_mutex_lock(&fs->ho_mu);
    for (;;) {
        unsigned idle_q = UINT32_MAX, running = 0;
        for (unsigned i = 0; i < u->nthreads; i++) {
            if (!u->t[i].started) continue;
            running++;
            if (!u->t[i].parked && idle_q == UINT32_MAX) idle_q = u->t[i].qid;
        }
        if (idle_q == UINT32_MAX || u->parked >= running) break;
        if (mono_ns() > deadline) {
            pthread_mutex_unlock(&fs->ho_mu);
            return -ETIMEDOUT;
        }
        unsigned before = u->parked;
        struct park_req *r = malloc(sizeof *r);
        if (r) {
            r->cpu = (int)idle_q;
            snprintf(r->path, sizeof r->path, "%s/" TK_PARK_PREFIX "%d-%u", fs->mountpoint,
                     (int)getpid(), __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED));
            pthread_t th;
            pthread_attr_t a;
            pthread_attr_init(&a);
            pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&th, &a, park_main, r) != 0) free(r);
            pthread_attr_destroy(&a);
        }
        /* wait for that request (or any other) to park an entry */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        while (u->parked == before &&
               pthread_cond_timedwait(&fs->ho_cv, &fs->ho_mu, &ts) == 0) {
        }
    }
    pthread_mutex_unlock(&fs->ho_mu);
    return 0;
}

/* The ring's part of a handover's state. */
int tk_uring_describe(tk_fs *fs, tk_ring_state *out) {
    struct tk_uring *u = fs->uring;
    memset(out, 0, sizeof *out);
    out->memfd = -1;
    if (!u) return 0;
    out->memfd = u->memfd;
    out->base = (uintptr_t)u->base;
    out->nthreads = u->nthreads;
    out->per = u->per;
    out->cap = u->cap;
    out->parked = calloc(u->nthreads, 1);
    if (!out->parked) return -ENOMEM;
    pthread_mutex_lock(&fs->ho_mu);
    for (unsigned i = 0; i < u->nthreads; i++) out->parked[i] = (uint8_t)u->t[i].parked;
    pthread_mutex_unlock(&fs->ho_mu);
    return 1;
}

void tk_uring_stop(tk_fs *fs) {
    struct tk_uring *u = fs->uring;
    if (!u) return;
    uint64_t one = 1;
    pthread_mutex_lock(&fs->ho_mu);
    u->stopping = 1;
    pthread_cond_broadcast(&fs->ho_cv);
    pthread_mutex_unlock(&fs->ho_mu);
    if (write(u->stop_fd, &one, sizeof one) < 0) { /* threads also end with the connection */ }
    for (unsigned i = 0; i < u->nthreads; i++) {
        tk_uthread *t = &u->t[i];
        if (t->started) pthread_join(t->th, NULL);
        if (t->ring_ok) io_uring_queue_exit(&t->ring);
    }
    munmap(u->base, TK_RING_SPAN);
    close(u->memfd);
    close(u->stop_fd);
    free(u->t);
    free(u);
    fs->uring = NULL;
}
