/*
 * wrlog.c -- LD_PRELOAD shim for tests/test_crash_replay.py: logs every change a process
 * makes to files under $TK_WRLOG_PREFIX (pwrite, write, pwritev, ftruncate, fallocate,
 * fsync, fdatasync) to $TK_WRLOG, in the order the calls returned. The test replays the
 * log onto a copy to build every state a power cut could leave.
 *
 * Record: u8 op ('W' write, 'T' truncate, 'S' sync), u16 path length, path,
 * u64 offset (W) or size (T), u64 data length (W), data.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void raw_write(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        long r = syscall(SYS_write, fd, c, n);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return;
        }
        c += r;
        n -= (size_t)r;
    }
}

/* path of fd if it lies under the prefix, else 0 */
static int watched(int fd, char path[4096]) {
    const char *prefix = getenv("TK_WRLOG_PREFIX");
    if (!prefix || !getenv("TK_WRLOG")) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, 4095);
    if (n <= 0) return 0;
    path[n] = 0;
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

static void record(char op, const char *path, uint64_t a, const struct iovec *iov, int cnt) {
    uint64_t len = 0;
    for (int i = 0; i < cnt; i++) len += iov[i].iov_len;
    uint16_t pl = (uint16_t)strlen(path);
    pthread_mutex_lock(&mu);
    int fd = (int)syscall(SYS_open, getenv("TK_WRLOG"), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                          0600);
    if (fd >= 0) {
        raw_write(fd, &op, 1);
        raw_write(fd, &pl, 2);
        raw_write(fd, path, pl);
        raw_write(fd, &a, 8);
        raw_write(fd, &len, 8);
        for (int i = 0; i < cnt; i++) raw_write(fd, iov[i].iov_base, iov[i].iov_len);
        syscall(SYS_close, fd);
    }
    pthread_mutex_unlock(&mu);
}

/* the written prefix of an iovec array */
static int clip(const struct iovec *in, int cnt, size_t n, struct iovec *out) {
    int k = 0;
    for (int i = 0; i < cnt && n; i++, k++) {
        out[k] = in[i];
        if (out[k].iov_len > n) out[k].iov_len = n;
        n -= out[k].iov_len;
    }
    return k;
}

#define REAL(name, ret, ...) \
    static ret (*real)(__VA_ARGS__); \
    if (!real) real = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, name)

/* Writes to one file are serialized by the engine's inode lock, so a file's records are
 * in the order its calls took effect. */
static ssize_t do_pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL("pwrite64", ssize_t, int, const void *, size_t, off_t);
    char path[4096];
    int w = watched(fd, path);
    ssize_t r = real(fd, buf, n, off);
    int e = errno;
    if (w && r > 0) {
        struct iovec v = {(void *)buf, (size_t)r};
        record('W', path, (uint64_t)off, &v, 1);
    }
    errno = e;
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    return do_pwrite(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    return do_pwrite(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL("write", ssize_t, int, const void *, size_t);
    char path[4096];
    int w = watched(fd, path);
    off_t off = w ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t r = real(fd, buf, n);
    int e = errno;
    if (w && r > 0 && off >= 0) {
        struct iovec v = {(void *)buf, (size_t)r};
        record('W', path, (uint64_t)off, &v, 1);
    }
    errno = e;
    return r;
}

static ssize_t do_pwritev(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    REAL("pwritev2", ssize_t, int, const struct iovec *, int, off_t, int);
    char path[4096];
    int w = watched(fd, path);
    ssize_t r = real(fd, iov, cnt, off, flags);
    int e = errno;
    if (w && r > 0 && cnt <= 64) {
        struct iovec v[64];
        record('W', path, (uint64_t)off, v, clip(iov, cnt, (size_t)r, v));
    }
    errno = e;
    return r;
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    return do_pwritev(fd, iov, cnt, off, 0);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    return do_pwritev(fd, iov, cnt, off, 0);
}
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return do_pwritev(fd, iov, cnt, off, flags);
}

static int do_truncate(int fd, off_t size) {
    REAL("ftruncate64", int, int, off_t);
    char path[4096];
    int w = watched(fd, path);
    int r = real(fd, size);
    int e = errno;
    if (w && r == 0) record('T', path, (uint64_t)size, NULL, 0);
    errno = e;
    return r;
}
int ftruncate(int fd, off_t size) { return do_truncate(fd, size); }
int ftruncate64(int fd, off_t size) { return do_truncate(fd, size); }

static int do_sync(int (*real)(int), int fd) {
    char path[4096];
    int w = watched(fd, path);
    int r = real(fd);
    int e = errno;
    if (w && r == 0) record('S', path, 0, NULL, 0);
    errno = e;
    return r;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return do_sync(real, fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return do_sync(real, fd);
}

/* fallocate is not replayed: a test that sees one fails (the workload uses none) */
static int do_fallocate(int fd, int mode, off_t off, off_t len) {
    REAL("fallocate64", int, int, int, off_t, off_t);
    char path[4096];
    int w = watched(fd, path);
    int r = real(fd, mode, off, len);
    int e = errno;
    if (w && r == 0) record('F', path, (uint64_t)off, NULL, 0);
    errno = e;
    return r;
}
int fallocate(int fd, int mode, off_t off, off_t len) { return do_fallocate(fd, mode, off, len); }
int fallocate64(int fd, int mode, off_t off, off_t len) { return do_fallocate(fd, mode, off, len); }
