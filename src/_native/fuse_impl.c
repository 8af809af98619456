/*
 * fuse_impl.c -- guard point lifecycle (mount, worker threads, unmount), caller
 * identity from /proc, the one policy chokepoint tk_check(), the key cache.
 *
 * Decision source: the decision cache (cache_impl.h) answers hits without Python;
 * a miss goes through decide_miss(), the ONE function to swap when the request ring
 * (ring_impl.h) replaces the Python callback.
 */
#include "fuse_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdarg.h>
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
 * FUSE reports the thread id.  Start time (stat field 22) and the executable's
 * (st_dev, st_ino) are read from /proc on every check: the stat file is opened first
 * and read again after the exe stat; the open fd pins the task, so a second read that
 * fails means the task died (and its pid may have been reused) while we looked.
 */
static int read_start_time(int fd, uint64_t *out) {
    char buf[1024];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -ESRCH;
    buf[n] = 0;
    char *p = strrchr(buf, ')');  /* comm may contain spaces and parentheses */
    if (!p) return -ESRCH;
    /* after ") " comes field 3 (state); start time is field 22 */
    int field = 2;
    for (p++; *p && field < 21; p++)
        if (*p == ' ') field++;
    if (field != 21) return -ESRCH;
    *out = strtoull(p, NULL, 10);
    return 0;
}

int tk_ident_get(tk_fs *fs, fuse_req_t req, tk_ident *id) {
    const struct fuse_ctx *c = fuse_req_ctx(req);
    memset(id, 0, sizeof *id);
    id->uid = c->uid;
    id->gid = c->gid;
    id->pid = (uint32_t)c->pid;
    if (c->pid <= 0) return -EPERM;  /* kernel-internal: no process to ask about */
    char name[64];
    snprintf(name, sizeof name, "%d/stat", (int)c->pid);
    int fd = openat(fs->proc_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -ESRCH;
    uint64_t t1 = 0, t2 = 0;
    int rc = read_start_time(fd, &t1);
    if (rc == 0) {
        struct stat st;
        snprintf(name, sizeof name, "%d/exe", (int)c->pid);
        if (fstatat(fs->proc_fd, name, &st, 0) == 0) {
            id->exe_dev = (uint64_t)st.st_dev;
            id->exe_ino = (uint64_t)st.st_ino;
        }  /* kernel threads / zombies have no exe: (0, 0) */
        rc = read_start_time(fd, &t2);
        if (rc == 0 && t1 != t2) rc = -ESRCH;
    }
    close(fd);
    id->start_time = t1;
    return rc;
}

/* ------------------------------------------------------------------------------------
 * audit + decisions
 */
void tk_audit(tk_fs *fs, const char *kind, const tk_ident *id, const char *path,
              const char *action, uint32_t effects, const char *detail) {
    if (fs->cb.audit)
        fs->cb.audit(fs->cb.ctx, kind, id->uid, id->gid, id->pid, path ? path : "",
                     action, effects, detail ? detail : "");
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

/* The miss path: ask the policy engine.  Swap this for the request ring. */
static int decide_miss(tk_fs *fs, const tk_ident *id, const char *path, tk_action act,
                       tk_decision *out) {
    if (!fs->cb.decide) return -EACCES;
    memset(out, 0, sizeof *out);
    int rc = fs->cb.decide(fs->cb.ctx, id->uid, id->gid, id->pid, path, tk_action_name(act),
                           out);
    if (rc) return rc;
    /* exactly one of permit/deny, apply_key only with permit: anything else is deny */
    uint32_t fx = out->effects;
    if (!(fx & TK_FX_PERMIT) == !(fx & TK_FX_DENY)) return -EACCES;
    return 0;
}

int tk_check_path(tk_fs *fs, const tk_ident *id, const char *path, tk_action act,
                  int flags, tk_decision *out) {
    tk_cache_key k = {
        .uid = id->uid, .gid = id->gid, .pid = id->pid, .start_time = id->start_time,
        .exe_dev = id->exe_dev, .exe_ino = id->exe_ino, .op = (uint32_t)act,
        .path = (const uint8_t *)path, .path_len = strlen(path),
    };
    tk_cache_value v;
    int rc = 0;
    TK_INC(fs, ops[act], 1);
    if (tk_cache_lookup(fs->cache, &k, &v) == TK_CACHE_HIT) {
        TK_INC(fs, cache_hits, 1);
        out->effects = v.effects;
        out->rule = v.rule;
        out->key_version = v.key_version;
        out->ttl_seconds = 0;
    } else {
        TK_INC(fs, cache_misses, 1);
        uint64_t gen = tk_cache_generation(fs->cache);
        rc = decide_miss(fs, id, path, act, out);
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
            if (ttl) tk_cache_insert(fs->cache, &k, &v, ttl, gen);
        }
    }
    int permit = (out->effects & TK_FX_PERMIT) && !(out->effects & TK_FX_DENY);
    if (!(flags & TK_CHK_PROBE)) {
        if (!permit) TK_INC(fs, denied, 1);
        if (!permit || (out->effects & (TK_FX_AUDIT | TK_FX_WOULD_DENY)))
            tk_audit(fs, "access", id, path, tk_action_name(act), out->effects,
                     rc ? "decision unavailable" : (permit ? "" : "denied"));
    }
    return permit ? 0 : -EACCES;
}

int tk_check(tk_fs *fs, fuse_req_t req, tk_inode *dir, const char *name, tk_action act,
             int flags, tk_decision *out) {
    tk_ident id;
    tk_decision dummy;
    if (!out) out = &dummy;
    memset(out, 0, sizeof *out);
    char *path = tk_path(fs, dir, name);
    if (!path) return -ENOMEM;
    int rc = tk_ident_get(fs, req, &id);
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
    rc = tk_check_path(fs, &id, path, act, flags, out);
    free(path);
    return rc;
}

/* ------------------------------------------------------------------------------------
 * keys: fetched from Python once per (name, version), wiped at unmount
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
    int rc = fs->cb.get_key(fs->cb.ctx, name, version, &got, key);
    if (rc) return rc;
    if (got == 0 || (version && got != version)) {
        OPENSSL_cleanse(key, 32);
        return -ENOKEY;
    }
    pthread_mutex_lock(&fs->key_mu);
    if (version == 0 && strcmp(name, fs->key_name) == 0) fs->current_version = got;
    int have = 0;
    for (size_t i = 0; i < fs->nkeys; i++)
        if (fs->keys[i].version == got && strcmp(fs->keys[i].name, name) == 0) have = 1;
    if (!have) {
        if (fs->nkeys == fs->capkeys) {
            size_t nc = fs->capkeys ? fs->capkeys * 2 : 8;
            tk_keyent *nk = calloc(nc, sizeof *nk);
            if (nk) {
                if (fs->keys) {
                    memcpy(nk, fs->keys, fs->nkeys * sizeof *nk);
                    OPENSSL_cleanse(fs->keys, fs->capkeys * sizeof *nk);
                    free(fs->keys);
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
    if (fs->keys) {
        OPENSSL_cleanse(fs->keys, fs->capkeys * sizeof *fs->keys);
        free(fs->keys);
    }
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
    fs->root_fd = fs->proc_fd = -1;
    if (fs->cfg.threads < 1) fs->cfg.threads = 1;
    pthread_mutex_init(&fs->state_mu, NULL);
    pthread_cond_init(&fs->state_cv, NULL);
    pthread_mutex_init(&fs->itab_mu, NULL);
    pthread_mutex_init(&fs->key_mu, NULL);
    int status = 0;
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
    while (!fs->init_done && fs->loop_running) pthread_cond_wait(&fs->state_cv, &fs->state_mu);
    int ok = fs->init_done;
    pthread_mutex_unlock(&fs->state_mu);
    if (!ok) {
        seterr(err, errlen, "the FUSE loop ended before INIT");
        tk_fs_unmount(fs);
        return -EIO;
    }
    fs->mnt_dev = mountinfo_dev(fs->mountpoint);
    return 0;
fail:
    tk_itab_free(fs);
    if (fs->root_fd >= 0) close(fs->root_fd);
    if (fs->proc_fd >= 0) close(fs->proc_fd);
    fs->root_fd = fs->proc_fd = -1;
    return rc;
}

/* Abort the FUSE connection (clients still holding files get ENOTCONN). */
static void abort_connection(tk_fs *fs) {
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

int tk_fs_unmount(tk_fs *fs) {
    if (!fs || !fs->mounted) return 0;
    /* Detach the mount ourselves (never close the /dev/fuse fd while workers read it:
     * libfuse's fuse_session_unmount would).  Only if our mount is still the one at
     * the path: a stale path must never make us unmount someone else's file system. */
    if (fs->mnt_dev && mountinfo_dev(fs->mountpoint) == fs->mnt_dev)
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
        abort_connection(fs);  /* readers get ENODEV and the loop ends */
    }
    pthread_join(fs->loop_thread, NULL);
    /* The connection is gone now, so this only closes the fd (libfuse polls it and
     * skips the umount on POLLERR). */
    fuse_session_unmount(fs->se);
    fuse_session_destroy(fs->se);  /* closes the /dev/fuse fd */
    fs->se = NULL;
    fs->mounted = 0;
    fs->init_done = 0;
    tk_itab_free(fs);  /* wipes per-file keys */
    if (fs->root_fd >= 0) close(fs->root_fd);
    if (fs->proc_fd >= 0) close(fs->proc_fd);
    fs->root_fd = fs->proc_fd = -1;
    free(fs->root_groups);
    fs->root_groups = NULL;
    keys_wipe(fs);
    tk_cache_clear(fs->cache);
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

void tk_fs_stats_get(const tk_fs *fs, tk_fs_stats *out) {
    const uint64_t *src = (const uint64_t *)&fs->st;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    out->generation = tk_cache_generation(fs->cache);
}

void tk_fs_free(tk_fs *fs) {
    if (!fs) return;
    tk_fs_unmount(fs);
    keys_wipe(fs);
    tk_cache_free(fs->cache);
    free(fs->mountpoint);
    free(fs->backing);
    free(fs->key_name);
    pthread_mutex_destroy(&fs->state_mu);
    pthread_cond_destroy(&fs->state_cv);
    pthread_mutex_destroy(&fs->itab_mu);
    pthread_mutex_destroy(&fs->key_mu);
    free(fs);
}
