/*
 * fuse_impl.c -- guard point lifecycle (mount, worker threads, unmount), caller
 * identity from /proc, the one policy chokepoint tk_check(), the key cache.
 *
 * Decision source: the decision cache (cache_impl.h) answers hits without Python;
 * a miss goes through decide_miss(): with a request ring (tk_fs_config.ring) it sends a
 * TAKA POLICY_CHECK v2 request built here from the uapi structs and waits for the
 * agent's answer without the GIL (ring_decide); without one (and for rename/link) it
 * calls the Python `decide` callback.
 */
#include "fuse_int.h"
#include "ring_impl.h"

#define TK_CACHE_OP_ANY_PATH 0x80000000u
/* The protocol's C structs (the same header the kernel module uses). */
#include "../../kernel/include/uapi/takakrypt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

static const char *const ACTION_NAMES[TK_ACT_COUNT] = {
    "read", "write", "append", "truncate", "create", "delete", "rename", "link",
    "getattr", "setattr", "list", "mkdir", "rmdir", "getxattr", "setxattr",
};

const char *tk_action_name(int a) {
    return a >= 0 && a < TK_ACT_COUNT ? ACTION_NAMES[a] : "?";
}

/* Engine action (0-based, the cache key's op) -> protocol action code (1-based). */
static const uint32_t PROTOCOL_ACTIONS[TK_ACT_COUNT] = {
    [TK_ACT_READ] = TAKAKRYPT_ACTION_READ,
    [TK_ACT_WRITE] = TAKAKRYPT_ACTION_WRITE,
    [TK_ACT_APPEND] = TAKAKRYPT_ACTION_APPEND,
    [TK_ACT_TRUNCATE] = TAKAKRYPT_ACTION_TRUNCATE,
    [TK_ACT_CREATE] = TAKAKRYPT_ACTION_CREATE,
    [TK_ACT_DELETE] = TAKAKRYPT_ACTION_DELETE,
    [TK_ACT_RENAME] = TAKAKRYPT_ACTION_RENAME,
    [TK_ACT_LINK] = TAKAKRYPT_ACTION_LINK,
    [TK_ACT_GETATTR] = TAKAKRYPT_ACTION_GETATTR,
    [TK_ACT_SETATTR] = TAKAKRYPT_ACTION_SETATTR,
    [TK_ACT_LIST] = TAKAKRYPT_ACTION_LIST,
    [TK_ACT_MKDIR] = TAKAKRYPT_ACTION_MKDIR,
    [TK_ACT_RMDIR] = TAKAKRYPT_ACTION_RMDIR,
    [TK_ACT_GETXATTR] = TAKAKRYPT_ACTION_GETXATTR,
    [TK_ACT_SETXATTR] = TAKAKRYPT_ACTION_SETXATTR,
};
_Static_assert(TK_ACT_COUNT == 15 && TAKAKRYPT_ACTION_SETXATTR == 15,
               "engine and protocol action sets differ: update PROTOCOL_ACTIONS");
_Static_assert(TK_FX_PERMIT == TAKAKRYPT_EFFECT_PERMIT && TK_FX_DENY == TAKAKRYPT_EFFECT_DENY &&
               TK_FX_APPLY_KEY == TAKAKRYPT_EFFECT_APPLY_KEY &&
               TK_FX_AUDIT == TAKAKRYPT_EFFECT_AUDIT &&
               TK_FX_WOULD_DENY == TAKAKRYPT_EFFECT_WOULD_DENY,
               "engine effect bits must be the protocol's");
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the TAKA protocol is little-endian: this code copies structs as they are"
#endif

uint32_t tk_action_protocol_code(int a) {
    return a >= 0 && a < TK_ACT_COUNT ? PROTOCOL_ACTIONS[a] : TAKAKRYPT_ACTION_NONE;
}

static void seterr(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------
 * caller identity
 *
 * FUSE reports the thread id.  The identity is (uid, gid from the request; start time,
 * stat field 22; the executable's (st_dev, st_ino)).  First sight of a tid: open
 * /proc/<tid> as a directory, read the start time from its stat file, stat its exe, read
 * the start time again (equal: the task did not die and get replaced while we looked).
 * The directory fd is kept in a slot of fs->idc: it pins THAT task (lookups under it
 * fail with ENOENT/ESRCH once it is gone, whatever now has the number), so afterwards
 * one fstatat(dfd, "exe") per request both proves the task is the same and reads its
 * current executable (an execve changes it; the start time survives an execve).
 */
static int read_start_time(int fd, uint64_t *out) {
    char buf[1024];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -ESRCH;
    buf[n] = 0;
    char *p = strrchr(buf, ')');  /* comm may contain spaces and parentheses */
    if (!p) return -ESRCH;
    /* p is on field 2's closing ')'; each space starts the next field: after the
     * loop p is on the first character of field 22 (start time) */
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ') field++;
    if (field != 22 || *p < '0' || *p > '9') return -ESRCH;
    *out = strtoull(p, NULL, 10);
    return 0;
}

static int idc_init(tk_fs *fs) {
    fs->idc = calloc(TK_IDC_SLOTS, sizeof *fs->idc);
    if (!fs->idc) return -ENOMEM;
    for (size_t i = 0; i < TK_IDC_SLOTS; i++) {
        pthread_mutex_init(&fs->idc[i].mu, NULL);
        fs->idc[i].dfd = -1;
    }
    return 0;
}

static void idc_free(tk_fs *fs) {
    if (!fs->idc) return;
    for (size_t i = 0; i < TK_IDC_SLOTS; i++) {
        if (fs->idc[i].dfd >= 0) close(fs->idc[i].dfd);
        pthread_mutex_destroy(&fs->idc[i].mu);
    }
    free(fs->idc);
    fs->idc = NULL;
}

/* The executable's inode number with its ctime folded in (multiplied by an odd
 * constant: distinct ctimes of one inode never collide).  An in-place rewrite keeps
 * device, inode, size and -- restored by the owner -- mtime, but not the ctime, so a
 * decision cached for the old content, here or in the agent (which gets this value as
 * exe_ino), does not serve a process that exec's the new one.  procinfo.exe_ino_key
 * computes the same (docs/policy.md, "Process identity"). */
static uint64_t exe_ino_key(const struct stat *st) {
    uint64_t ct = (uint64_t)st->st_ctim.tv_sec * 1000000000ULL + (uint64_t)st->st_ctim.tv_nsec;
    return (uint64_t)st->st_ino ^ (ct * 0x9E3779B97F4A7C15ULL);
}

/* The slow path: *dfd_out receives the /proc/<tid> fd (to keep) when the identity is
 * complete (an exe was found), else -1. */
static int ident_read(tk_fs *fs, uint32_t tid, tk_ident *id, int *dfd_out) {
    char name[16];
    *dfd_out = -1;
    snprintf(name, sizeof name, "%u", tid);
    int dfd = openat(fs->proc_fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return -ESRCH;
    int fd = openat(dfd, "stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        close(dfd);
        return -ESRCH;
    }
    uint64_t t1 = 0, t2 = 0;
    int have_exe = 0;
    int rc = read_start_time(fd, &t1);
    if (rc == 0) {
        struct stat st;
        if (fstatat(dfd, "exe", &st, 0) == 0) {
            id->exe_dev = (uint64_t)st.st_dev;
            id->exe_ino = exe_ino_key(&st);
            have_exe = 1;
        }  /* kernel threads / zombies have no exe: (0, 0), never cached */
        rc = read_start_time(fd, &t2);
        if (rc == 0 && t1 != t2) rc = -ESRCH;
    }
    close(fd);
    id->start_time = t1;
    if (rc == 0 && have_exe) *dfd_out = dfd;
    else close(dfd);
    return rc;
}

int tk_ident_get(tk_fs *fs, fuse_req_t req, tk_ident *id) {
    const struct fuse_ctx *c = fuse_req_ctx(req);
    memset(id, 0, sizeof *id);
    id->uid = c->uid;
    id->gid = c->gid;
    id->pid = (uint32_t)c->pid;
    if (c->pid <= 0) return -EPERM;  /* kernel-internal: no process to ask about */
    uint32_t tid = (uint32_t)c->pid;
    tk_idslot *s = &fs->idc[(tid * 2654435761u) % TK_IDC_SLOTS];
    pthread_mutex_lock(&s->mu);
    if (s->tid == tid && s->dfd >= 0) {
        struct stat st;
        if (fstatat(s->dfd, "exe", &st, 0) == 0) {
            id->exe_dev = (uint64_t)st.st_dev;
            id->exe_ino = exe_ino_key(&st);
            id->start_time = s->start_time;
            pthread_mutex_unlock(&s->mu);
            TK_INC(fs, ident_hits, 1);
            return 0;
        }
        close(s->dfd);  /* that task is gone (or has no exe any more): ask afresh */
        s->dfd = -1;
        s->tid = 0;
    }
    pthread_mutex_unlock(&s->mu);
    int dfd;
    int rc = ident_read(fs, tid, id, &dfd);
    TK_INC(fs, ident_reads, 1);
    if (dfd >= 0) {
        pthread_mutex_lock(&s->mu);
        int old = s->dfd;
        s->tid = tid;
        s->dfd = dfd;
        s->start_time = id->start_time;
        pthread_mutex_unlock(&s->mu);
        if (old >= 0) close(old);
    }
    return rc;
}

/* With TK_HINT_NO_PROCESS the policy decides on the request's uid and gid alone: no
 * /proc lookup per request (the fstatat above is most of a cached check's cost); the
 * process is identified only if the decision has to be asked for (tk_check_path). */
int tk_ident_for(tk_fs *fs, fuse_req_t req, tk_ident *id) {
    if (!(__atomic_load_n(&fs->st.policy_hints, __ATOMIC_ACQUIRE) & TK_HINT_NO_PROCESS))
        return tk_ident_get(fs, req, id);
    const struct fuse_ctx *c = fuse_req_ctx(req);
    memset(id, 0, sizeof *id);
    id->uid = c->uid;
    id->gid = c->gid;
    id->pid = (uint32_t)c->pid;
    if (c->pid <= 0) return -EPERM;  /* kernel-internal: denied, as tk_ident_get does */
    id->lazy = req;
    TK_INC(fs, ident_skips, 1);
    return 0;
}

/* ------------------------------------------------------------------------------------
 * audit + decisions
 */
void tk_audit(tk_fs *fs, const char *kind, const tk_ident *id, const char *path,
              const char *action, uint32_t effects, const char *detail) {
    if (fs->cb.audit)
        fs->cb.audit(fs->cb.ctx, kind, id->uid, id->gid, id->pid, path ? path : "",
                     action, effects, detail ? detail : "", -1, 0, 0);
}

void tk_audit_decision(tk_fs *fs, const tk_ident *id, const char *path, const char *action,
                       const tk_decision *d, uint64_t latency_ns, const char *detail) {
    if (fs->cb.audit)
        fs->cb.audit(fs->cb.ctx, "access", id->uid, id->gid, id->pid, path ? path : "",
                     action, d->effects, detail ? detail : "", d->rule, d->key_version,
                     latency_ns ? latency_ns : 1);
}

void tk_audit_integrity(tk_fs *fs, fuse_req_t req, tk_inode *ino, const char *action,
                        const char *detail) {
    tk_ident id;
    TK_INC(fs, integrity_failures, 1);
    if (req) {
        tk_ident_get(fs, req, &id);  /* best effort: the ids come from fuse_req_ctx */
    } else {
        memset(&id, 0, sizeof id);
    }
    char *path = tk_path(fs, ino, NULL);
    tk_audit(fs, "integrity", &id, path, action, 0, detail);
    free(path);
}

/* ------------------------------------------------------------------------------------
 * the miss path over the request ring: TAKA POLICY_CHECK v2 (docs/protocol.md)
 */
#define RING_DETAIL_UNAVAILABLE "agent unavailable"
#define RING_DETAIL_MALFORMED "malformed agent answer"

/* "agent error: " + the reason of a non-SUCCESS answer (e.g. the guard point's key is
 * missing), for the audit record the same thread writes right after; cut at a UTF-8
 * character boundary.  No reason: RING_DETAIL_UNAVAILABLE. */
static __thread char ring_reason[256];

static const char *answer_reason(const uint8_t *a, size_t n) {
    static const char prefix[] = "agent error: ";
    size_t off = sizeof(struct takakrypt_error_response);
    if (n <= off) return RING_DETAIL_UNAVAILABLE;
    const uint8_t *r = a + off;
    size_t len = n - off, room = sizeof ring_reason - sizeof prefix;
    if (len > room) {
        len = room;
        while (len && (r[len] & 0xC0) == 0x80) len--;  /* r[len]: first byte left out */
    }
    memcpy(ring_reason, prefix, sizeof prefix - 1);
    memcpy(ring_reason + sizeof prefix - 1, r, len);
    ring_reason[sizeof prefix - 1 + len] = 0;
    return ring_reason;
}

/* "Tgid:" of /proc/TID/status. */
static int read_tgid(tk_fs *fs, uint32_t tid, uint32_t *tgid) {
    char name[64], buf[2048];
    snprintf(name, sizeof name, "%u/status", tid);
    int fd = openat(fs->proc_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -ESRCH;
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    if (n <= 0) return -ESRCH;
    buf[n] = 0;
    char *p = strstr(buf, "\nTgid:");
    if (!p) return -ESRCH;
    char *end;
    unsigned long v = strtoul(p + 6, &end, 10);
    if (end == p + 6 || v == 0 || v > UINT32_MAX) return -ESRCH;
    *tgid = (uint32_t)v;
    return 0;
}

/*
 * What a POLICY_CHECK needs beyond tk_ident: the thread group id, the PROCESS's start
 * time (the agent compares it with /proc/<pid>/stat; tk_ident has the calling
 * thread's) and the executable's path.  Same pinning as tk_ident_get: the thread's
 * stat file is opened first, must still show the start time the identity was read
 * with, and is read again at the end.  exe[] receives the path, not NUL-terminated.
 */
static int proc_details(tk_fs *fs, const tk_ident *id, uint32_t *tgid, uint64_t *pstart,
                        char *exe, size_t cap, size_t *exelen) {
    char name[64];
    snprintf(name, sizeof name, "%u/stat", id->pid);
    int fd = openat(fs->proc_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -ESRCH;
    uint64_t t = 0;
    int rc = read_start_time(fd, &t);
    if (rc == 0 && t != id->start_time) rc = -ESRCH;
    if (rc == 0) rc = read_tgid(fs, id->pid, tgid);
    if (rc == 0) {
        snprintf(name, sizeof name, "%u/exe", id->pid);
        ssize_t n = readlinkat(fs->proc_fd, name, exe, cap);
        if (n < 0) n = 0;  /* kernel thread / zombie: no executable, empty as specified */
        if ((size_t)n >= cap) rc = -ENAMETOOLONG;
        *exelen = (size_t)n;
    }
    if (rc == 0) {
        if (*tgid == id->pid) {
            *pstart = t;
        } else {
            snprintf(name, sizeof name, "%u/stat", *tgid);
            int pfd = openat(fs->proc_fd, name, O_RDONLY | O_CLOEXEC);
            if (pfd < 0) {
                rc = -ESRCH;
            } else {
                rc = read_start_time(pfd, pstart);
                close(pfd);
            }
        }
    }
    if (rc == 0 && (read_start_time(fd, &t) != 0 || t != id->start_time)) rc = -ESRCH;
    close(fd);
    return rc;
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF), as the Python decoder. */
static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (n - i <= k) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += k + 1;
    }
    return 1;
}

/*
 * Validate the agent's answer to request `seq` and fill *out.  0: a decision;
 * -EREMOTEIO: a well-formed non-SUCCESS answer (*status set); -EBADMSG: malformed.
 */
static int parse_policy_answer(const uint8_t *a, size_t n, uint32_t seq, tk_decision *out,
                               uint32_t *status) {
    struct takakrypt_msg_header h;
    if (n < sizeof h) return -EBADMSG;
    memcpy(&h, a, sizeof h);
    if (h.magic != TAKAKRYPT_MSG_MAGIC || h.version != TAKAKRYPT_PROTOCOL_VERSION ||
        h.operation != (TAKAKRYPT_OP_POLICY_CHECK | TAKAKRYPT_MSG_RESPONSE) ||
        h.sequence != seq || h.payload_size != n - sizeof h ||
        h.status > TAKAKRYPT_ERROR_INTERNAL)
        return -EBADMSG;
    if (h.status != TAKAKRYPT_SUCCESS) {
        struct takakrypt_error_response e;  /* v2: reason_len + reason */
        if (n < sizeof e) return -EBADMSG;
        memcpy(&e, a, sizeof e);
        if ((uint64_t)e.reason_len != n - sizeof e || memchr(a + sizeof e, 0, e.reason_len) ||
            !utf8_ok(a + sizeof e, e.reason_len))
            return -EBADMSG;
        *status = h.status;
        return -EREMOTEIO;
    }
    struct takakrypt_policy_response r;
    if (n < sizeof r) return -EBADMSG;
    memcpy(&r, a, sizeof r);
    const uint8_t *var = a + sizeof r;
    size_t nvar = n - sizeof r;
    if ((uint64_t)r.key_id_len + r.policy_len + r.reason_len != nvar || memchr(var, 0, nvar) ||
        !utf8_ok(var, r.key_id_len) || !utf8_ok(var + r.key_id_len, r.policy_len) ||
        !utf8_ok(var + r.key_id_len + r.policy_len, r.reason_len))
        return -EBADMSG;
    uint32_t fx = r.effects;
    int permit = !!(fx & TAKAKRYPT_EFFECT_PERMIT);
    if ((fx & ~TAKAKRYPT_EFFECT_MASK) || permit == !!(fx & TAKAKRYPT_EFFECT_DENY) ||
        (!permit && (fx & (TAKAKRYPT_EFFECT_APPLY_KEY | TAKAKRYPT_EFFECT_WOULD_DENY))) ||
        r.allow_access != (uint32_t)permit ||
        r.encrypt_file != !!(fx & TAKAKRYPT_EFFECT_APPLY_KEY) ||
        r.audit_action != !!(fx & TAKAKRYPT_EFFECT_AUDIT) ||
        ((fx & TAKAKRYPT_EFFECT_APPLY_KEY) && (r.key_id_len == 0 || r.key_version < 1)))
        return -EBADMSG;
    out->effects = fx;
    out->rule = r.rule_index;
    out->key_version = r.key_version;
    out->ttl_seconds = r.cache_ttl_ms / 1000.0;
    return 0;
}

/* mount path + "/" + relative path (the root: the mount path) into buf: its length,
 * or 0 if it does not fit. */
static size_t abs_path(const tk_fs *fs, const char *relpath, uint8_t *buf, size_t cap) {
    size_t mlen = strlen(fs->mountpoint), rlen = strlen(relpath);
    if (rlen && mlen == 1) mlen = 0;  /* mounted at "/": no "//" */
    size_t plen = rlen ? mlen + 1 + rlen : strlen(fs->mountpoint);
    if (plen > cap) return 0;
    if (rlen) {
        memcpy(buf, fs->mountpoint, mlen);
        buf[mlen] = '/';
        memcpy(buf + mlen + 1, relpath, rlen);
    } else {
        memcpy(buf, fs->mountpoint, plen);
    }
    return plen;
}

static int ring_decide(tk_fs *fs, const tk_ident *id, const char *relpath,
                       const char *target, tk_action act, tk_decision *out,
                       const char **detail) {
    struct takakrypt_policy_request q;
    uint8_t msg[TAKAKRYPT_MAX_MSG_SIZE];
    uint8_t answer[TK_RING_MAX_MSG];
    char exe[4096];
    size_t exelen = 0;
    uint32_t tgid = 0;
    uint64_t pstart = 0;
    int rc = proc_details(fs, id, &tgid, &pstart, exe, sizeof exe, &exelen);
    if (rc) return rc;  /* the caller vanished: "decision unavailable" */

    /* path, target = guard point mount path + "/" + relative path; the root is the
     * mount path.  Layout: fixed part, path, process, cwd (empty), target. */
    uint8_t *p = msg + sizeof q;
    size_t room = sizeof msg - sizeof q;
    size_t plen = abs_path(fs, relpath, p, room);
    if (!plen || plen + exelen > room) return -ENAMETOOLONG;
    memcpy(p + plen, exe, exelen);
    size_t tlen = 0;
    if (target) {
        tlen = abs_path(fs, target, p + plen + exelen, room - plen - exelen);
        if (!tlen) return -ENAMETOOLONG;
    }
    size_t total = sizeof q + plen + exelen + tlen;

    uint32_t seq;
    do {
        seq = __atomic_add_fetch(&fs->ring_seq, 1, __ATOMIC_RELAXED);
    } while (seq == 0);  /* never 0: a zeroed header must not match */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    memset(&q, 0, sizeof q);
    q.header.magic = TAKAKRYPT_MSG_MAGIC;
    q.header.version = TAKAKRYPT_PROTOCOL_VERSION;
    q.header.operation = TAKAKRYPT_OP_POLICY_CHECK;
    q.header.sequence = seq;
    q.header.payload_size = (uint32_t)(total - sizeof q.header);
    q.header.status = TAKAKRYPT_SUCCESS;
    q.header.timestamp = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
    q.pid = tgid;
    q.uid = id->uid;
    q.gid = id->gid;
    q.action = tk_action_protocol_code(act);
    q.path_len = (uint32_t)plen;
    q.process_len = (uint32_t)exelen;
    q.cwd_len = 0;
    q.tid = id->pid;
    q.start_time = pstart;
    q.exe_dev = id->exe_dev;
    q.exe_ino = id->exe_ino;
    q.guard_point_id = 0;
    q.target_len = (uint32_t)tlen;
    memcpy(msg, &q, sizeof q);

    size_t n = 0;
    int timeout = fs->cfg.ring_timeout_ms > 0 ? fs->cfg.ring_timeout_ms
                                              : (int)TAKAKRYPT_TIMEOUT_MS;
    TK_INC(fs, ring_requests, 1);
    rc = tk_ring_call(fs->cfg.ring, msg, total, answer, sizeof answer, &n, timeout);
    if (rc) {
        if (rc == -ETIMEDOUT) {
            TK_INC(fs, ring_timeouts, 1);
        } else if (rc == -EMSGSIZE && n > sizeof answer) {
            TK_INC(fs, ring_malformed, 1);  /* an answer longer than any message */
            *detail = RING_DETAIL_MALFORMED;
            return -EACCES;
        } else {
            TK_INC(fs, ring_errors, 1);  /* closed, consumer error, request too big */
        }
        *detail = RING_DETAIL_UNAVAILABLE;
        return -EACCES;
    }
    uint32_t status = 0;
    rc = parse_policy_answer(answer, n, seq, out, &status);
    if (rc == -EREMOTEIO) {
        TK_INC(fs, ring_error_status, 1);
        *detail = answer_reason(answer, n);  /* validated by parse_policy_answer */
        return -EACCES;
    }
    if (rc) {
        TK_INC(fs, ring_malformed, 1);
        *detail = RING_DETAIL_MALFORMED;
        return -EACCES;
    }
    return 0;
}

/* The miss path: ask the agent over the ring, or the Python policy callback. */
static int decide_miss(tk_fs *fs, const tk_ident *id, const char *path, const char *target,
                       tk_action act, tk_decision *out, const char **detail) {
    memset(out, 0, sizeof *out);
    int rc;
    int needs_target = act == TK_ACT_RENAME || act == TK_ACT_LINK;
    if (fs->cfg.ring && (!needs_target || target)) {
        rc = ring_decide(fs, id, path, needs_target ? target : NULL, act, out, detail);
    } else {
        /* no ring, or rename/link without a destination: the callback (none: deny) */
        if (!fs->cb.decide) return -EACCES;
        rc = fs->cb.decide(fs->cb.ctx, id->uid, id->gid, id->pid, path, tk_action_name(act),
                           out);
    }
    if (rc) return rc;
    /* exactly one of permit/deny, apply_key only with permit: anything else is deny */
    uint32_t fx = out->effects;
    if (!(fx & TK_FX_PERMIT) == !(fx & TK_FX_DENY)) return -EACCES;
    return 0;
}

int tk_check_path(tk_fs *fs, const tk_ident *id, const char *path, tk_action act,
                  int flags, tk_decision *out) {
    return tk_check_path_target(fs, id, path, NULL, act, flags, out);
}

static uint64_t elapsed_ns(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (uint64_t)(t1.tv_sec - t0->tv_sec) * 1000000000ULL + (uint64_t)t1.tv_nsec -
           (uint64_t)t0->tv_nsec;
}

int tk_check_path_target(tk_fs *fs, const tk_ident *id, const char *path,
                         const char *target, tk_action act, int flags, tk_decision *out) {
    struct timespec t0;  /* the decision's latency, for its audit record */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* a uid/gid-only identity caches by uid/gid (pid 0: no process-bound key has it) */
    tk_cache_key k = {
        .uid = id->uid, .gid = id->gid, .pid = id->lazy ? 0 : id->pid,
        .start_time = id->start_time, .exe_dev = id->exe_dev, .exe_ino = id->exe_ino,
        .op = (uint32_t)act, .path = (const uint8_t *)path, .path_len = strlen(path),
    };
    /* rename and link: the answer is for this path AND this destination, so both are
     * the key ("path\0target": no path holds a NUL), and never an ANY_PATH one */
    uint8_t *both = NULL;
    if (target) {
        size_t tl = strlen(target);
        both = malloc(k.path_len + 1 + tl);
        if (!both) return -ENOMEM;
        memcpy(both, path, k.path_len);
        both[k.path_len] = 0;
        memcpy(both + k.path_len + 1, target, tl);
        k.path = both;
        k.path_len += 1 + tl;
    }
    /* the same caller and action with no path: where ANY_PATH answers are cached (the
     * op's top bit keeps those keys apart from the root's, whose path is "" too) */
    tk_cache_key kany = k;
    kany.op |= TK_CACHE_OP_ANY_PATH;
    kany.path = (const uint8_t *)"";
    kany.path_len = 0;
    tk_cache_value v;
    const char *detail = NULL;
    int rc = 0;
    TK_INC(fs, ops[act], 1);
    if (tk_cache_lookup(fs->cache, &k, &v) == TK_CACHE_HIT ||
        (!target && tk_cache_lookup(fs->cache, &kany, &v) == TK_CACHE_HIT)) {
        TK_INC(fs, cache_hits, 1);
        out->effects = v.effects;
        out->rule = v.rule;
        out->key_version = v.key_version;
        out->ttl_seconds = 0;
    } else {
        TK_INC(fs, cache_misses, 1);
        uint64_t gen = tk_cache_generation(fs->cache);
        tk_ident full;
        const tk_ident *who = id;
        if (id->lazy) {  /* the agent is told who asks (its audit, its process checks) */
            who = &full;
            if (tk_ident_get(fs, id->lazy, &full)) {
                rc = -EACCES;
                detail = "caller identity unavailable";
            }
        }
        if (rc == 0) rc = decide_miss(fs, who, path, target, act, out, &detail);
        /* a uid/gid key only while the hint still holds: a reload that clears it does
         * so before the new policy answers anything, so an answer seen with it still
         * set was given by the process-free policy */
        int keep = !id->lazy || (__atomic_load_n(&fs->st.policy_hints, __ATOMIC_ACQUIRE) &
                                 TK_HINT_NO_PROCESS);
        int any_path = rc == 0 && (out->effects & TK_FX_ANY_PATH);
        out->effects &= ~TK_FX_ANY_PATH;  /* a hint for us, not an effect */
        if (rc) {
            TK_INC(fs, decide_errors, 1);
            out->effects = TK_FX_DENY | TK_FX_AUDIT;
            out->rule = -1;
        } else if (out->ttl_seconds > 0) {
            double ns = out->ttl_seconds * 1e9;
            uint64_t ttl = ns >= 1.8e19 ? UINT64_MAX - 1 : (uint64_t)ns;
            v.effects = out->effects;
            v.rule = out->rule;
            v.key_version = out->key_version;
            v.flags = 0;
            if (ttl && keep)
                tk_cache_insert(fs->cache, any_path && !target ? &kany : &k, &v, ttl, gen);
        }
    }
    int permit = (out->effects & TK_FX_PERMIT) && !(out->effects & TK_FX_DENY);
    if (!(flags & TK_CHK_PROBE)) {
        if (!permit) TK_INC(fs, denied, 1);
        if (!permit || (out->effects & (TK_FX_AUDIT | TK_FX_WOULD_DENY)))
            tk_audit_decision(fs, id, path, tk_action_name(act), out, elapsed_ns(&t0),
                              rc ? (detail ? detail : "decision unavailable")
                                 : (permit ? "" : "denied"));
    }
    free(both);
    return permit ? 0 : -EACCES;
}

static int check_common(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name,
                        tk_action act, const char *target, int flags, tk_decision *out);

int tk_check(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name, tk_action act,
             int flags, tk_decision *out) {
    return check_common(fs, req, dir, name, act, NULL, flags, out);
}

int tk_check_target(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name,
                    tk_action act, const char *target, tk_decision *out) {
    return check_common(fs, req, dir, name, act, target, 0, out);
}

static int check_common(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name,
                        tk_action act, const char *target, int flags, tk_decision *out) {
    tk_ident id;
    tk_decision dummy;
    if (!out) out = &dummy;
    memset(out, 0, sizeof *out);
    char *path = tk_path(fs, dir, name);
    if (!path) return -ENOMEM;
    int rc = tk_ident_for(fs, req, &id);
    if (rc) {
        /* fail closed: the caller vanished or is not a process we can identify */
        out->effects = TK_FX_DENY;
        TK_INC(fs, ops[act], 1);
        if (!(flags & TK_CHK_PROBE)) {
            TK_INC(fs, denied, 1);
            tk_audit(fs, "access", &id, path, tk_action_name(act), TK_FX_DENY,
                     "caller identity unavailable");
        }
        free(path);
        return -EACCES;
    }
    rc = tk_check_path_target(fs, &id, path, target, act, flags, out);
    free(path);
    return rc;
}

/* ------------------------------------------------------------------------------------
 * keys: fetched from Python once per (name, version), wiped at unmount or by
 * tk_fs_drop_keys (the agent's key cache expired them); the table
 * lives in secure memory (secmem.h)
 */
int tk_key_get(tk_fs *fs, const char *name, uint32_t version, uint32_t *vout,
               uint8_t key[32]) {
    pthread_mutex_lock(&fs->key_mu);
    if (version == 0) version = fs->current_version;
    for (size_t i = 0; version && i < fs->nkeys; i++) {
        if (fs->keys[i].version == version && strcmp(fs->keys[i].name, name) == 0) {
            memcpy(key, fs->keys[i].key, 32);
            *vout = version;
            pthread_mutex_unlock(&fs->key_mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&fs->key_mu);
    if (!fs->cb.get_key || strlen(name) > TK_KEYID_MAX) return -ENOKEY;
    uint32_t got = 0;
    TK_INC(fs, key_fetches, 1);
    /* a tk_fs_drop_keys while the agent answers: this key is used once, not kept */
    uint64_t epoch = __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
    int rc = fs->cb.get_key(fs->cb.ctx, name, version, &got, key);
    if (rc) return rc;
    if (got == 0 || (version && got != version)) {
        OPENSSL_cleanse(key, 32);
        return -ENOKEY;
    }
    pthread_mutex_lock(&fs->key_mu);
    if (epoch != __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&fs->key_mu);
        *vout = got;
        return 0;
    }
    if (version == 0 && strcmp(name, fs->key_name) == 0) fs->current_version = got;
    int have = 0;
    for (size_t i = 0; i < fs->nkeys; i++)
        if (fs->keys[i].version == got && strcmp(fs->keys[i].name, name) == 0) have = 1;
    if (!have) {
        if (fs->nkeys == fs->capkeys) {
            size_t nc = fs->capkeys ? fs->capkeys * 2 : 8;
            tk_keyent *nk = tk_secmem_alloc(nc * sizeof *nk);  /* zeroed, locked */
            if (nk) {
                if (fs->keys) {
                    memcpy(nk, fs->keys, fs->nkeys * sizeof *nk);
                    tk_secmem_free(fs->keys);  /* zeroes it */
                }
                fs->keys = nk;
                fs->capkeys = nc;
            }
        }
        if (fs->nkeys < fs->capkeys) {
            tk_keyent *e = &fs->keys[fs->nkeys++];
            snprintf(e->name, sizeof e->name, "%s", name);
            e->version = got;
            memcpy(e->key, key, 32);
        }
    }
    pthread_mutex_unlock(&fs->key_mu);
    *vout = got;
    return 0;
}

static void keys_wipe(tk_fs *fs) {
    pthread_mutex_lock(&fs->key_mu);
    tk_secmem_free(fs->keys);  /* zeroes it; NULL is fine */
    fs->keys = NULL;
    fs->nkeys = fs->capkeys = 0;
    fs->current_version = 0;
    pthread_mutex_unlock(&fs->key_mu);
}

/* ------------------------------------------------------------------------------------
 * lifecycle
 */
tk_fs *tk_fs_new(const tk_fs_config *cfg, const tk_callbacks *cb, char *err, size_t errlen) {
    if (!cfg || !cfg->mountpoint || cfg->mountpoint[0] != '/') {
        seterr(err, errlen, "mountpoint must be an absolute path");
        return NULL;
    }
    if (!cfg->key_name || !cfg->key_name[0] || strlen(cfg->key_name) > TK_KEYID_MAX) {
        seterr(err, errlen, "key name must be 1..%d bytes", TK_KEYID_MAX);
        return NULL;
    }
    tk_fs *fs = calloc(1, sizeof *fs);
    if (!fs) {
        seterr(err, errlen, "out of memory");
        return NULL;
    }
    fs->cfg = *cfg;
    fs->cfg.mountpoint = fs->cfg.backing = fs->cfg.key_name = NULL;  /* caller's memory */
    fs->mountpoint = strdup(cfg->mountpoint);
    fs->backing = strdup(cfg->backing && cfg->backing[0] ? cfg->backing : cfg->mountpoint);
    fs->key_name = strdup(cfg->key_name);
    fs->cb = *cb;
    fs->root_fd = fs->proc_fd = fs->handle_fd = -1;
    fs->handle_mnt_id = -1;
    if (fs->cfg.threads < 1) fs->cfg.threads = 1;
    pthread_mutex_init(&fs->state_mu, NULL);
    pthread_cond_init(&fs->state_cv, NULL);
    pthread_mutex_init(&fs->itab_mu, NULL);
    pthread_mutex_init(&fs->fdc_mu, NULL);
    pthread_mutex_init(&fs->key_mu, NULL);
    pthread_mutex_init(&fs->nq_mu, NULL);
    pthread_cond_init(&fs->nq_cv, NULL);
    pthread_mutex_init(&fs->sp_mu, NULL);
    pthread_cond_init(&fs->sp_done_cv, NULL);
    pthread_mutex_init(&fs->ho_mu, NULL);
    pthread_cond_init(&fs->ho_cv, NULL);
    tk_slots_init(&fs->nodes);
    tk_slots_init(&fs->fhs);
    tk_rekey_init(fs);
    int status = 0;
    pthread_mutex_init(&fs->szc_mu, NULL);
    fs->szc = calloc((size_t)TK_SZC_SETS * TK_SZC_WAYS, sizeof *fs->szc);
    if (!fs->szc || idc_init(fs)) {
        seterr(err, errlen, "out of memory");
        tk_fs_free(fs);
        return NULL;
    }
    fs->cache = tk_cache_new(cfg->cache_entries ? cfg->cache_entries : 65536,
                             60ULL * 1000000000ULL, &status);
    if (!fs->mountpoint || !fs->backing || !fs->key_name || !fs->cache) {
        seterr(err, errlen, "cannot allocate the guard point (%s)",
               fs->cache ? "out of memory" : tk_cache_strerror(status));
        tk_fs_free(fs);
        return NULL;
    }
    return fs;
}

void tk_thread_pin(int cpu, const char *prefix) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);  /* best effort */
    char name[16];
    snprintf(name, sizeof name, "%.10s%d", prefix, cpu);
    (void)pthread_setname_np(pthread_self(), name);
}

static void *loop_main(void *arg) {
    tk_fs *fs = arg;
    struct fuse_loop_config *lc = fuse_loop_cfg_create();
    if (lc) {
        fuse_loop_cfg_set_max_threads(lc, (unsigned)fs->cfg.threads);
        fuse_loop_cfg_set_idle_threads(lc, (unsigned)fs->cfg.threads);
        fuse_loop_cfg_set_clone_fd(lc, 0);
        fuse_session_loop_mt(fs->se, lc);
        fuse_loop_cfg_destroy(lc);
    }
    pthread_mutex_lock(&fs->state_mu);
    fs->loop_running = 0;
    pthread_cond_broadcast(&fs->state_cv);
    pthread_mutex_unlock(&fs->state_mu);
    return NULL;
}

/* ---- the notifier thread ----------------------------------------------------------
 * Page-cache invalidation of a plaintext node whose stored bytes changed through the
 * raw view (the kernel's auto_inval_data is off: our own writes keep the page cache
 * right, and an mtime change seen in GETATTR must not throw it away).  The kernel
 * locks each cached page to drop it; a page may be locked by a READ waiting for the
 * very thread that would notify, so notifications are sent from this thread only. */
#define TK_NQ_MAX 65536

void tk_inval_data_async(tk_fs *fs, fuse_ino_t nodeid) {
    pthread_mutex_lock(&fs->nq_mu);
    int queued = 0;
    for (size_t i = fs->nq_len; i > 0 && i + 8 > fs->nq_len; i--)  /* recent duplicates */
        if (fs->nq[i - 1] == nodeid) queued = 1;
    if (!queued && fs->nq_len == fs->nq_cap && fs->nq_cap < TK_NQ_MAX) {
        size_t cap = fs->nq_cap ? fs->nq_cap * 2 : 64;
        fuse_ino_t *q = realloc(fs->nq, cap * sizeof *q);
        if (q) {
            fs->nq = q;
            fs->nq_cap = cap;
        }
    }
    if (!queued && fs->nq_len < fs->nq_cap) {
        fs->nq[fs->nq_len++] = nodeid;
        pthread_cond_signal(&fs->nq_cv);
    } else if (!queued) {
        /* no room: the node's next open drops its pages anyway (plain_stale) */
        TK_INC(fs, inval_dropped, 1);
    }
    pthread_mutex_unlock(&fs->nq_mu);
}

static void *notify_main(void *arg) {
    tk_fs *fs = arg;
    fuse_ino_t *batch = NULL;
    size_t cap = 0;
    pthread_mutex_lock(&fs->nq_mu);
    for (;;) {
        while (!fs->nq_len && !fs->nq_stop) pthread_cond_wait(&fs->nq_cv, &fs->nq_mu);
        if (fs->nq_stop) break;
        /* swap the queue out: handlers keep queueing while we notify */
        fuse_ino_t *q = fs->nq;
        size_t n = fs->nq_len, qcap = fs->nq_cap;
        fs->nq = batch;
        fs->nq_cap = cap;
        fs->nq_len = 0;
        batch = q;
        cap = qcap;
        pthread_mutex_unlock(&fs->nq_mu);
        for (size_t i = 0; i < n; i++) {
            /* -ENOENT: the kernel forgot the node, nothing cached */
            (void)fuse_lowlevel_notify_inval_inode(fs->se, batch[i], 0, 0);
            TK_INC(fs, inval_data, 1);
        }
        pthread_mutex_lock(&fs->nq_mu);
    }
    pthread_mutex_unlock(&fs->nq_mu);
    free(batch);
    return NULL;
}

static void notifier_start(tk_fs *fs) {
    pthread_mutex_lock(&fs->nq_mu);
    fs->nq_stop = 0;
    fs->nq_len = 0;
    pthread_mutex_unlock(&fs->nq_mu);
    fs->nq_started = pthread_create(&fs->nq_thread, NULL, notify_main, fs) == 0;
}

static void notifier_stop(tk_fs *fs) {
    if (!fs->nq_started) return;
    pthread_mutex_lock(&fs->nq_mu);
    fs->nq_stop = 1;
    pthread_cond_signal(&fs->nq_cv);
    pthread_mutex_unlock(&fs->nq_mu);
    pthread_join(fs->nq_thread, NULL);
    fs->nq_started = 0;
}

/* Called from the INIT handler (fuse_ops.c) through fs->init_done. */
void tk_fs_init_done(tk_fs *fs);
void tk_fs_init_done(tk_fs *fs) {
    pthread_mutex_lock(&fs->state_mu);
    fs->init_done = 1;
    pthread_cond_broadcast(&fs->state_cv);
    pthread_mutex_unlock(&fs->state_mu);
}

static int save_root_groups(tk_fs *fs) {
    int n = getgroups(0, NULL);
    if (n < 0) return -errno;
    fs->root_groups = calloc((size_t)n + 1, sizeof(gid_t));
    if (!fs->root_groups) return -ENOMEM;
    n = getgroups(n, fs->root_groups);
    if (n < 0) return -errno;
    fs->nroot_groups = n;
    return 0;
}

/* st_dev of the topmost takakrypt FUSE mount at mp from /proc/self/mountinfo, 0 if
 * none.  Never touches the mount itself (a stat would be a request to ourselves). */
static dev_t mountinfo_dev(const char *mp) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) return 0;
    char *line = NULL;
    size_t cap = 0;
    dev_t found = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned maj, min;
        char path[4096], unesc[4096];
        if (sscanf(line, "%*d %*d %u:%u %*s %4095s", &maj, &min, path) != 3) continue;
        char *sep = strstr(line, " - ");
        if (!sep || strncmp(sep + 3, "fuse.takakrypt ", 15) != 0) continue;
        size_t j = 0;  /* undo the \ooo escapes of space, tab, newline, backslash */
        for (size_t i = 0; path[i] && j < sizeof unesc - 1; i++) {
            if (path[i] == '\\' && path[i + 1] >= '0' && path[i + 1] <= '3' && path[i + 2] &&
                path[i + 3]) {
                unesc[j++] = (char)((path[i + 1] - '0') * 64 + (path[i + 2] - '0') * 8 +
                                    (path[i + 3] - '0'));
                i += 3;
            } else {
                unesc[j++] = path[i];
            }
        }
        unesc[j] = 0;
        if (strcmp(unesc, mp) == 0) found = makedev(maj, min);  /* last = topmost */
    }
    free(line);
    fclose(f);
    return found;
}

static void shadow_header(tk_fs *fs) {
    tk_ring_state r;
    int has = tk_uring_describe(fs, &r);
    uint32_t flags = (fs->uring_offered ? TK_HO_URING : 0) |
                     (__atomic_load_n(&fs->st.killpriv_v2, __ATOMIC_RELAXED) ? TK_HO_KILLPRIV_V2 : 0);
    tk_sh_header(fs, flags, has > 0 ? &r : NULL);
    free(r.parked);
}

int tk_fs_mount(tk_fs *fs, char *err, size_t errlen) {
    if (fs->mounted) {
        seterr(err, errlen, "already mounted");
        return -EBUSY;
    }
    int rc;
    /* The backing directory is opened BEFORE mounting: for an in-place guard point
     * this fd is the only way to the files the mount covers. */
    fs->root_fd = open(fs->backing, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fs->root_fd < 0) {
        rc = -errno;
        seterr(err, errlen, "cannot open backing directory %s: %s", fs->backing, strerror(errno));
        return rc;
    }
    fs->proc_fd = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fs->proc_fd < 0) {
        rc = -errno;
        seterr(err, errlen, "cannot open /proc: %s", strerror(errno));
        goto fail;
    }
    (void)tk_sh_open(fs);  /* none: no recovery after a kill, serving is the same */
    if ((rc = save_root_groups(fs)) || (rc = tk_itab_init(fs))) {
        seterr(err, errlen, "cannot set up the inode table: %s", strerror(-rc));
        goto fail;
    }
    char fsname[512];
    snprintf(fsname, sizeof fsname, "-ofsname=takakrypt:%s", fs->backing);
    /* commas in the backing path would split the option: replace them */
    for (char *p = fsname + 10; *p; p++)
        if (*p == ',') *p = '_';
    char *argv[] = {"takakrypt", "-odefault_permissions,allow_other,subtype=takakrypt",
                    fsname, fs->cfg.debug ? "-d" : NULL, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(fs->cfg.debug ? 4 : 3, argv);
    fs->se = fuse_session_new(&args, &tk_ops, sizeof tk_ops, fs);
    fuse_opt_free_args(&args);
    if (!fs->se) {
        rc = -EIO;
        seterr(err, errlen, "fuse_session_new failed");
        goto fail;
    }
    if (fuse_session_mount(fs->se, fs->mountpoint) != 0) {
        rc = -EIO;
        seterr(err, errlen, "cannot mount %s (see stderr; is /dev/fuse usable?)",
               fs->mountpoint);
        fuse_session_destroy(fs->se);
        fs->se = NULL;
        goto fail;
    }
    if (tk_uring_attach_io(fs) != 0) {
        rc = -EIO;
        seterr(err, errlen, "cannot attach the session I/O");
        fuse_session_unmount(fs->se);
        fuse_session_destroy(fs->se);
        fs->se = NULL;
        goto fail;
    }
    fs->loop_running = 1;
    fs->mounted = 1;
    if ((rc = -pthread_create(&fs->loop_thread, NULL, loop_main, fs))) {
        fs->loop_running = 0;
        seterr(err, errlen, "cannot start the FUSE loop thread");
        tk_fs_unmount(fs);
        return rc;
    }
    /* Live = the kernel's INIT request was answered (or the loop died). */
    pthread_mutex_lock(&fs->state_mu);
    while ((!fs->init_done || !fs->init_replied) && fs->loop_running)
        pthread_cond_wait(&fs->state_cv, &fs->state_mu);
    int ok = fs->init_done && fs->init_replied > 0;
    pthread_mutex_unlock(&fs->state_mu);
    if (!ok) {
        seterr(err, errlen, "the FUSE loop ended before INIT");
        tk_fs_unmount(fs);
        return -EIO;
    }
    fs->mnt_dev = mountinfo_dev(fs->mountpoint);
    notifier_start(fs);  /* not started: raw-view changes reach plaintext at next open */
    tk_split_start(fs);  /* none started: large reads are decrypted by the worker alone */
    if (fs->cfg.io_uring) (void)tk_uring_start(fs);  /* failing: the classic channel serves */
    shadow_header(fs);
    return 0;
fail:
    tk_sh_close(fs);
    tk_itab_free(fs);  /* also closes handle_fd */
    if (fs->root_fd >= 0) close(fs->root_fd);
    if (fs->proc_fd >= 0) close(fs->proc_fd);
    fs->root_fd = fs->proc_fd = -1;
    free(fs->root_groups);
    fs->root_groups = NULL;
    return rc;
}

/* Take a predecessor's connection over (fuse_handover.c describes the steps). */
int tk_fs_resume(tk_fs *fs, const int *fds, size_t nfds, const uint8_t *state, size_t len,
                 char *err, size_t errlen) {
    if (fs->mounted) {
        seterr(err, errlen, "already mounted");
        return -EBUSY;
    }
    tk_ho_state st;
    uint8_t **replay = NULL;
    size_t *replay_len = NULL, nreplay = 0;
    unsigned jslots[TK_SH_MAX_READERS];
    uint8_t jreply[TK_SH_MAX_READERS];
    /* no state: the predecessor was killed -- its state is the shadow in fds[2] */
    int rc;
    if (len) rc = tk_ho_decode(state, len, nfds, &st, err, errlen);
    else if (nfds >= 3) rc = tk_sh_load(fs, fds[2], &st, &replay, &replay_len, &nreplay, jslots, jreply, err,
                        errlen);
    else {
        seterr(err, errlen, "neither a state nor a stored state fd");
        rc = -EINVAL;
    }
    if (rc) return rc;
    if (st.ring.memfd >= (int)nfds) {
        seterr(err, errlen, "the ring's memfd was not handed over");
        tk_ho_state_free(&st);
        rc = -EBADF;
        goto free_replay;
    }
    if (nfds < 2 || strcmp(st.mountpoint, fs->mountpoint) != 0 ||
        strcmp(st.backing, fs->backing) != 0) {
        seterr(err, errlen, "the handover is for %s (backing %s), not this guard point",
               st.mountpoint, st.backing);
        tk_ho_state_free(&st);
        return -EINVAL;
    }
    int fuse_fd = fcntl(fds[0], F_DUPFD_CLOEXEC, 3);
    fs->root_fd = fcntl(fds[1], F_DUPFD_CLOEXEC, 3);
    fs->proc_fd = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fuse_fd < 0 || fs->root_fd < 0 || fs->proc_fd < 0) {
        rc = -errno;
        seterr(err, errlen, "cannot take the handed-over fds: %s", strerror(errno));
        if (fuse_fd >= 0) close(fuse_fd);
        goto fail;
    }
    /* after a kill the predecessor's shadow, else our own written as we rebuild */
    if (len || tk_sh_adopt(fs, fds[2]) != 0) (void)tk_sh_open(fs);
    fs->restoring = 1;
    if ((rc = save_root_groups(fs)) || (rc = tk_itab_init(fs)) ||
        (rc = tk_itab_restore(fs, &st, fds))) {
        fs->restoring = 0;
        seterr(err, errlen, "cannot rebuild the inode table: %s", strerror(-rc));
        close(fuse_fd);
        goto fail;
    }
    for (size_t i = 0; i < st.nfhs; i++) {
        if ((rc = tk_fh_restore(fs, &st.fhs[i])) != 0) {
            /* that file alone fails (EIO on its handle); the others go on */
            TK_INC(fs, handover_lost_handles, 1);
            rc = 0;
        }
    }
    tk_slots_seal(&fs->fhs);
    fs->restoring = 0;
    char fsname[512];
    snprintf(fsname, sizeof fsname, "-ofsname=takakrypt:%s", fs->backing);
    char *argv[] = {"takakrypt", fsname, fs->cfg.debug ? "-d" : NULL, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(fs->cfg.debug ? 3 : 2, argv);
    fs->se = fuse_session_new(&args, &tk_ops, sizeof tk_ops, fs);
    fuse_opt_free_args(&args);
    char devpath[32];
    snprintf(devpath, sizeof devpath, "/dev/fd/%d", fuse_fd);
    if (!fs->se || fuse_session_mount(fs->se, devpath) != 0 || tk_uring_attach_io(fs) != 0) {
        rc = -EIO;
        seterr(err, errlen, "cannot attach a FUSE session to the handed-over connection");
        if (fs->se) fuse_session_destroy(fs->se);
        else close(fuse_fd);
        fs->se = NULL;
        goto fail;
    }
    /* the kernel's INIT, replayed: libfuse sets its session up as it did for the
     * predecessor; io_writev drops the reply (resume_unique) */
    fs->init_req = malloc(st.init_len);
    if (!fs->init_req) {
        rc = -ENOMEM;
        goto fail_se;
    }
    memcpy(fs->init_req, st.init, st.init_len);
    fs->init_req_len = st.init_len;
    memcpy(&fs->init_in_flags, st.init + 40 + 12, 4);
    fs->resume_unique = 0x4000000000000000ull | 2;
    uint8_t *req = malloc(st.init_len);
    if (!req) {
        rc = -ENOMEM;
        goto fail_se;
    }
    memcpy(req, st.init, st.init_len);
    memcpy(req + 16 - 8, &fs->resume_unique, 8);  /* fuse_in_header.unique at 8 */
    struct fuse_buf fb;
    memset(&fb, 0, sizeof fb);
    fb.mem = req;
    fb.size = st.init_len;
    fuse_session_process_buf(fs->se, &fb);
    free(req);
    if (!fs->init_done) {
        rc = -EPROTO;
        seterr(err, errlen, "the recorded INIT request was refused");
        goto fail_se;
    }
    fs->init_replied = 1;
    fs->uring_offered = (st.flags & TK_HO_URING) != 0;
    __atomic_store_n(&fs->st.killpriv_v2, (st.flags & TK_HO_KILLPRIV_V2) != 0, __ATOMIC_RELAXED);
    fs->resumed = 1;
    if (st.ring.memfd >= 0) {
        /* before anything reads the connection: if the ring cannot be taken over,
         * the predecessor must be able to go on serving (it aborts the handover) */
        tk_ring_state r = st.ring;
        r.memfd = fds[st.ring.memfd];
        rc = tk_uring_resume(fs, &r);
        if (rc) {
            seterr(err, errlen, "cannot take the ring entries over: %s", strerror(-rc));
            goto fail_se;
        }
    }
    /* requests a killed predecessor had read and not answered (fuse_shadow.c, sh_jslot).
     * First the replies it had made and may not have written: sent again as they were
     * (the kernel refuses one it already has with ENOENT), so nothing is executed twice.
     * Then the rest: Linux >= 6.9 re-sends exactly the requests still waiting for an
     * answer (FUSE_NOTIFY_RESEND), older kernels refuse that (EINVAL) and the journal's
     * requests are served again (docs: which operations may repeat). */
    if (!len) {
        int sfd = fuse_session_fd(fs->se);
        for (size_t i = 0; i < nreplay; i++) {
            if (!jreply[i]) continue;
            ssize_t w = write(sfd, replay[i], replay_len[i]);
            if (fs->cfg.debug)
                fprintf(stderr, "takakrypt: resume: saved reply %zd/%zu\n", w, replay_len[i]);
            tk_sh_journal_done(fs, jslots[i]);
            TK_INC(fs, handover_replayed, 1);
        }
        struct { uint32_t len; int32_t error; uint64_t unique; } n = {16, 7, 0};
        const char *nr = getenv("TAKAKRYPT_TEST_NO_RESEND");  /* tests: the journal path */
        if (!(nr && !strcmp(nr, "1")) && write(sfd, &n, sizeof n) == (ssize_t)sizeof n) {
            TK_INC(fs, handover_resent, 1);
            for (size_t i = 0; i < nreplay; i++)
                if (!jreply[i]) tk_sh_journal_done(fs, jslots[i]);  /* the kernel has them */
        } else {
            for (size_t i = 0; i < nreplay; i++) {
                if (jreply[i]) continue;
                struct fuse_buf rb;
                memset(&rb, 0, sizeof rb);
                rb.mem = replay[i];
                rb.size = replay_len[i];
                fuse_session_process_buf(fs->se, &rb);
                tk_sh_journal_done(fs, jslots[i]);  /* served: never again */
                TK_INC(fs, handover_replayed, 1);
            }
        }
    }
    fs->loop_running = 1;
    fs->mounted = 1;
    fs->mnt_dev = mountinfo_dev(fs->mountpoint);
    if ((rc = -pthread_create(&fs->loop_thread, NULL, loop_main, fs))) {
        /* the ring serves; the classic channel (FORGET, INTERRUPT) would not: fail
         * closed rather than leave requests waiting */
        fs->loop_running = 0;
        seterr(err, errlen, "cannot start the FUSE loop thread");
        tk_ho_state_free(&st);
        tk_fs_abort(fs);
        fs->mounted = 1;
        tk_fs_unmount(fs);
        return rc;
    }
    notifier_start(fs);
    tk_split_start(fs);
    tk_ho_state_free(&st);
    shadow_header(fs);
    rc = 0;
    goto free_replay;
fail_se:
    tk_uring_stop(fs);
    fuse_session_destroy(fs->se);  /* closes fuse_fd (our dup) */
    fs->se = NULL;
fail:
    tk_ho_state_free(&st);
    tk_itab_free(fs);
    if (fs->root_fd >= 0) close(fs->root_fd);
    if (fs->proc_fd >= 0) close(fs->proc_fd);
    fs->root_fd = fs->proc_fd = -1;
    free(fs->root_groups);
    fs->root_groups = NULL;
    tk_sh_close(fs);
free_replay:
    for (size_t i = 0; i < nreplay; i++) free(replay[i]);
    free(replay);
    free(replay_len);
    return rc;
}

/* The fds a service manager should hold for this guard point (systemd's file
 * descriptor store) so that a successor can take the connection over even after
 * this process was killed: /dev/fuse, the backing root, the shadow state, the ring
 * memfd.  Pass them, with no state, to tk_fs_resume.  Returns how many (0: none). */
int tk_fs_persist_fds(tk_fs *fs, int out[4]) {
    if (!tk_fs_is_mounted(fs) || !fs->sh) return 0;
    out[0] = fuse_session_fd(fs->se);
    out[1] = fs->handle_fd >= 0 ? fs->handle_fd : fs->root_fd;  /* no O_PATH: see
                                                                  * tk_fs_handover_begin */
    out[2] = tk_sh_fd(fs);
    tk_ring_state r;
    int has = tk_uring_describe(fs, &r);
    free(r.parked);
    if (has > 0) out[3] = r.memfd;
    return has > 0 ? 4 : 3;
}

/* Abort the FUSE connection (clients still holding files get ENOTCONN). */
/* Abort the FUSE connection: every pending and later request fails (fail closed). */
void tk_fs_abort(tk_fs *fs) {
    if (!fs->mnt_dev) return;
    char path[128];
    snprintf(path, sizeof path, "/sys/fs/fuse/connections/%u/abort", minor(fs->mnt_dev));
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        /* fusectl is usually mounted by systemd; in containers it may not be */
        mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL);
        fd = open(path, O_WRONLY | O_CLOEXEC);
    }
    if (fd >= 0) {
        if (write(fd, "1", 1) < 0) { /* nothing more we can do */ }
        close(fd);
    }
}

/* From a ring worker that lost its entry: abort OUR connection only -- never after
 * unmount began (the connection number may already belong to another mount). */
void tk_fs_abort_live(tk_fs *fs) {
    if (__atomic_load_n(&fs->unmounting, __ATOMIC_ACQUIRE)) return;
    if (!fs->mnt_dev || mountinfo_dev(fs->mountpoint) != fs->mnt_dev) return;
    tk_fs_abort(fs);
}

int tk_fs_unmount(tk_fs *fs) {
    if (!fs || !fs->mounted) return 0;
    if (fs->ho_done) return -EBUSY;  /* the successor serves it: never unmount */
    __atomic_store_n(&fs->unmounting, 1, __ATOMIC_RELEASE);
    tk_rekey_stop_all(fs);  /* a running rekey stops at its next chunk ("cancelled") */
    /* Detach the mount ourselves (never close the /dev/fuse fd while workers read it:
     * libfuse's fuse_session_unmount would).  Only while our connection lives (the
     * loop still reads it) and our mount is the one at the path: once our mount was
     * detached from outside, its anonymous device number is free, and the next mount
     * on the path -- a successor guard point -- usually gets the same one. */
    pthread_mutex_lock(&fs->state_mu);
    int live = fs->loop_running;
    pthread_mutex_unlock(&fs->state_mu);
    if (live && fs->mnt_dev && mountinfo_dev(fs->mountpoint) == fs->mnt_dev)
        umount2(fs->mountpoint, MNT_DETACH);
    /* A lazily detached mount lives on while clients hold files: give the loop a
     * moment to see the connection end, then abort it. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 2;
    pthread_mutex_lock(&fs->state_mu);
    while (fs->loop_running &&
           pthread_cond_timedwait(&fs->state_cv, &fs->state_mu, &ts) == 0) {
    }
    int running = fs->loop_running;
    pthread_mutex_unlock(&fs->state_mu);
    if (running) {
        fuse_session_exit(fs->se);
        tk_fs_abort(fs);  /* readers get ENODEV and the loop ends */
    }
    pthread_join(fs->loop_thread, NULL);
    tk_uring_stop(fs);  /* the connection is gone: its ring commands were cancelled */
    notifier_stop(fs);  /* a notification now fails at once: no connection */
    tk_split_stop(fs);  /* no request is running any more */
    /* The connection is gone now, so this only closes the fd (libfuse polls it and
     * skips the umount on POLLERR). */
    fuse_session_unmount(fs->se);
    fuse_session_destroy(fs->se);  /* closes the /dev/fuse fd */
    fs->se = NULL;
    fs->mounted = 0;
    fs->init_done = 0;
    __atomic_store_n(&fs->unmounting, 0, __ATOMIC_RELEASE);
    fs->init_replied = 0;
    fs->init_unique = 0;
    fs->uring_offered = 0;
    __atomic_store_n(&fs->st.killpriv_v2, 0, __ATOMIC_RELAXED);
    tk_itab_free(fs);  /* wipes per-file keys */
    tk_sh_close(fs);
    if (fs->root_fd >= 0) close(fs->root_fd);
    if (fs->proc_fd >= 0) close(fs->proc_fd);
    fs->root_fd = fs->proc_fd = -1;
    free(fs->root_groups);
    fs->root_groups = NULL;
    keys_wipe(fs);
    tk_cache_clear(fs->cache);
    __atomic_store_n(&fs->rk_stop, 0, __ATOMIC_SEQ_CST);  /* (rekeys refused: not mounted) */
    return 0;
}

int tk_fs_is_mounted(const tk_fs *fs) {
    return fs && fs->mounted && __atomic_load_n(&fs->loop_running, __ATOMIC_RELAXED);
}

uint64_t tk_fs_bump_generation(tk_fs *fs) {
    pthread_mutex_lock(&fs->key_mu);
    fs->current_version = 0;  /* a reload may follow a key rotation */
    pthread_mutex_unlock(&fs->key_mu);
    return tk_cache_bump_generation(fs->cache);
}

void tk_fs_invalidate(tk_fs *fs) {
    tk_cache_clear(fs->cache);
    tk_fs_bump_generation(fs);
    __atomic_fetch_add(&fs->taka_epoch, 1, __ATOMIC_ACQ_REL);
}

void tk_fs_drop_keys(tk_fs *fs) {
    /* bumped under key_mu: a fetch in flight (tk_key_get) sees it and keeps nothing */
    pthread_mutex_lock(&fs->key_mu);
    tk_secmem_free(fs->keys);  /* zeroes it; NULL is fine */
    fs->keys = NULL;
    fs->nkeys = fs->capkeys = 0;
    fs->current_version = 0;
    __atomic_fetch_add(&fs->taka_epoch, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&fs->key_mu);
}

void tk_fs_set_hints(tk_fs *fs, unsigned hints) {
    unsigned np = hints & TK_HINT_NO_PROCESS;
    hints &= TK_HINT_PLAIN_ONLY | TK_HINT_GETATTR_ALL;
    if (!(hints & TK_HINT_PLAIN_ONLY)) hints = 0;  /* attributes alone: still per view */
    hints |= np;
    __atomic_store_n(&fs->st.policy_hints, (uint64_t)hints, __ATOMIC_RELEASE);
}

void tk_fs_stats_get(const tk_fs *fs, tk_fs_stats *out) {
    const uint64_t *src = (const uint64_t *)&fs->st;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    out->generation = tk_cache_generation(fs->cache);
}

void tk_fs_free(tk_fs *fs) {
    if (!fs) return;
    if (fs->ho_done) {
        /* handed over: worker threads still block on this structure until the
         * process exits; the successor owns the connection.  Only the keys go. */
        keys_wipe(fs);
        return;
    }
    tk_fs_unmount(fs);
    keys_wipe(fs);
    tk_cache_free(fs->cache);
    idc_free(fs);
    free(fs->szc);
    pthread_mutex_destroy(&fs->szc_mu);
    free(fs->mountpoint);
    free(fs->backing);
    free(fs->key_name);
    pthread_mutex_destroy(&fs->state_mu);
    pthread_cond_destroy(&fs->state_cv);
    pthread_mutex_destroy(&fs->itab_mu);
    pthread_mutex_destroy(&fs->fdc_mu);
    pthread_mutex_destroy(&fs->key_mu);
    pthread_mutex_destroy(&fs->nq_mu);
    pthread_cond_destroy(&fs->nq_cv);
    pthread_mutex_destroy(&fs->sp_mu);
    pthread_cond_destroy(&fs->sp_done_cv);
    pthread_mutex_destroy(&fs->ho_mu);
    pthread_cond_destroy(&fs->ho_cv);
    tk_rekey_fini(fs);
    tk_slots_destroy(&fs->nodes);
    tk_slots_destroy(&fs->fhs);
    free(fs->ho_readers);
    free(fs->recovered);
    free(fs->init_req);
    free(fs->nq);
    free(fs);
}
