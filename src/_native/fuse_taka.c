/*
 * fuse_taka.c -- TAKA random-access file I/O in C (docs/file-format.md), v1 and v2.
 *
 * The same rules as src/takakrypt/cryptofile.py (the reference; tests cross-check the
 * two both ways): blocks touched by a write are re-encrypted whole with fresh nonces,
 * partial edges are merged from verified plaintext (never from bytes past the size),
 * gaps stay holes, growing stores blocks before the header, shrinking stores the
 * header first, and a last block stored longer than the size implies (a crash in
 * the middle of a growing write) is accepted at its longer length.
 *
 * Version 2 files give each block its key version: reads open a block with its
 * version's handle (made on first use), writes seal under the header's write version,
 * and a writer moves a file whose write version is older than its key's current one
 * before the first block it seals (reserve(): one header write).
 *
 * Integrity failures return -EBADMSG (the caller maps them to EIO plus an audit
 * event) with the absolute block index in *bad_block (UINT64_MAX = the header).
 * Callers hold the inode's lock: shared for reads, exclusive for everything else.
 */
#include "fuse_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#define OVH TK_GCM_OVERHEAD
static const char HKDF_INFO[] = "takakrypt/v1 file keys";
static const char HKDF_INFO_V2[] = "takakrypt/v2 file keys";
/* adds to any tk_taka's table of version handles (readers hold only a shared lock) */
static pthread_mutex_t g_vers_mu = PTHREAD_MUTEX_INITIALIZER;

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

uint64_t tk_taka_stored_size(uint64_t plain, uint32_t bs) {
    return TK_HDR_SIZE + plain + ((plain + bs - 1) / bs) * OVH;
}

static uint64_t block_off(const tk_taka *t, uint64_t i) {
    return TK_HDR_SIZE + i * (uint64_t)(t->bs + OVH);
}

ssize_t tk_pread_full(int fd, void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) break;
        done += (size_t)n;
    }
    return (ssize_t)done;
}

int tk_pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        done += (size_t)n;
    }
    return 0;
}

static int phys_size(int fd, uint64_t *out) {
    struct statx stx;
    int rc = tk_statx_fd(fd, STATX_SIZE, &stx);
    if (rc == 0) *out = (uint64_t)stx.stx_size;
    return rc;
}

static int trunc_to(int fd, uint64_t size) {
    return ftruncate(fd, (off_t)size) < 0 ? -errno : 0;
}

/* okm = HKDF-SHA256(data key, salt = file id, info of format fmtv, 64). */
static int derive(const uint8_t key[32], const uint8_t fid[16], int fmtv, uint8_t okm[64]) {
    const char *info = fmtv == 2 ? HKDF_INFO_V2 : HKDF_INFO;
    int ok = 0;
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    if (kctx) {
        OSSL_PARAM p[5];
        /* SAFETY: OpenSSL only reads these buffers during EVP_KDF_derive; the casts
         * drop const because OSSL_PARAM has no const variant for octet strings. */
        p[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
        p[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)key, 32);
        p[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)fid, 16);
        p[3] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info,
                                                 strlen(info));
        p[4] = OSSL_PARAM_construct_end();
        ok = EVP_KDF_derive(kctx, okm, 64, p) == 1;
    }
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return ok ? 0 : -EIO;
}

static int header_tag(const uint8_t mac_key[32], const uint8_t body[TK_HDR_TAGOFF],
                      uint8_t tag[16]) {
    uint8_t full[32];
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), mac_key, 32, body, TK_HDR_TAGOFF, full, &len) || len != 32)
        return -EIO;
    memcpy(tag, full, 16);
    OPENSSL_cleanse(full, sizeof full);
    tk_secmem_zero_registers();  /* the HMAC key's state: never spilled to a stack later */
    return 0;
}

static tk_engine pick_engine(void) {
    return tk_gcm_engine_available(TK_ENGINE_IPSECMB) ? TK_ENGINE_IPSECMB : TK_ENGINE_OPENSSL;
}

void tk_taka_reset(tk_taka *t) {
    for (uint32_t i = 0; i < t->nvers; i++) tk_gcm_free(t->vers[i].gcm);
    tk_gcm_free(t->gcm);
    tk_secmem_free(t->mac_key);  /* zeroes it */
    memset(t, 0, sizeof *t);
}

/* The blocks' AAD prefix and the fields mirrored from the header. */
static void set_fields(tk_taka *t) {
    memcpy(t->aad, t->hdr, TK_HDR_STATIC);
    t->fmtv = t->hdr[4];
    t->wver = get_le32(t->hdr + 12);
    t->oldest = t->fmtv == 2 ? get_le32(t->hdr + 108) : t->wver;
    if (t->fmtv == 2) memset(t->aad + 12, 0, 4);
}

/* A block handle for version `ver` of t's file (v2: sealing/opening blocks of that
 * version; v1: ver is ignored), and the header MAC key if mac != NULL. */
static int file_keys(const tk_taka *t, const uint8_t key[32], uint32_t ver, tk_gcm **gcm,
                     uint8_t **mac) {
    uint8_t okm[64];
    int status = 0, rc = derive(key, t->hdr + 16, t->fmtv, okm);
    if (rc == 0) {
        *gcm = tk_gcm_new_versioned(okm, t->bs, pick_engine(), t->fmtv == 2 ? ver : 0,
                                    &status);
        if (!*gcm) rc = status == TK_ERR_NOMEM ? -ENOMEM : -EIO;
        if (rc == 0 && mac) {
            *mac = tk_secmem_alloc(32);
            if (*mac) memcpy(*mac, okm + 32, 32);
            else rc = -ENOMEM;
        }
    }
    OPENSSL_cleanse(okm, sizeof okm);
    tk_secmem_zero_registers();  /* SHA-256 state = okm: never spilled to a stack later */
    return rc;
}

/* Set up gcm + mac key for the header in t->hdr (its write version) from the data key;
 * both live in secure memory (locked, not dumped, wiped on free). */
static int keys_from(tk_taka *t, const uint8_t key[32]) {
    set_fields(t);
    return file_keys(t, key, t->wver, &t->gcm, &t->mac_key);
}

/* The handle of block version v (v2), made on first use; NULL and *rc: unavailable
 * (TK_TAKA_NOKEY, or TK_ERR_AUTH for a version outside the header's range).  When the
 * table is full, *tmp = 1: the caller frees the handle after use. */
static tk_gcm *version_gcm(tk_fs *fs, tk_taka *t, uint32_t v, int *tmp, int *rc) {
    *tmp = 0;
    if (v < t->oldest || v > t->wver) {
        *rc = TK_ERR_AUTH;
        return NULL;
    }
    if (v == t->wver) return t->gcm;
    uint32_t n = __atomic_load_n(&t->nvers, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++)
        if (t->vers[i].ver == v) return t->vers[i].gcm;
    char name[TK_KEYID_MAX + 1];
    uint8_t key[32];
    uint32_t got = 0;
    tk_gcm *g = NULL;
    memcpy(name, t->hdr + 33, t->hdr[32]);
    name[t->hdr[32]] = 0;
    /* the key fetch and the derivation outside the mutex (a fetch may wait for the
     * agent); a racing reader that added the same version first wins */
    if (tk_key_get(fs, name, v, &got, key) != 0) {
        *rc = TK_TAKA_NOKEY;
        return NULL;
    }
    int r = file_keys(t, key, v, &g, NULL);
    OPENSSL_cleanse(key, sizeof key);
    if (r) {
        *rc = TK_ERR_CRYPTO;
        return NULL;
    }
    pthread_mutex_lock(&g_vers_mu);
    n = t->nvers;
    for (uint32_t i = 0; i < n; i++) {
        if (t->vers[i].ver == v) {
            tk_gcm *have = t->vers[i].gcm;
            pthread_mutex_unlock(&g_vers_mu);
            tk_gcm_free(g);
            return have;
        }
    }
    if (n < TK_TAKA_VERS) {
        t->vers[n].ver = v;
        t->vers[n].gcm = g;
        __atomic_store_n(&t->nvers, n + 1, __ATOMIC_RELEASE);
    } else {
        *tmp = 1;
    }
    pthread_mutex_unlock(&g_vers_mu);
    return g;
}

int tk_taka_decrypt(tk_fs *fs, tk_taka *t, const uint8_t *raw, size_t len, uint8_t *out,
                    uint64_t first, size_t *written, uint64_t *badrel) {
    const size_t bs = t->bs, sbs = bs + OVH;
    *written = 0;
    if (t->fmtv != 2)
        return tk_gcm_decrypt(t->gcm, raw, len, out, t->aad, TK_HDR_STATIC, first, 1, written,
                              badrel);
    tk_gcm *g = t->gcm;
    int tmp = 0;
    uint64_t done = 0;  /* blocks decrypted before the current run */
    for (;;) {
        size_t w = 0;
        uint64_t br = 0;
        int st = tk_gcm_decrypt(g, raw + done * sbs, len - done * sbs, out + done * bs,
                                t->aad, TK_HDR_STATIC, first + done, 1, &w, &br);
        if (tmp) tk_gcm_free(g);
        tmp = 0;
        if (st != TK_ERR_VERSION) {
            *badrel = done + br;
            if (st == TK_OK) *written = done * bs + w;
            return st;
        }
        done += br;
        size_t so = done * sbs, sl = len - so < sbs ? len - so : sbs;
        int rc = TK_OK;
        g = version_gcm(fs, t, get_le32(raw + so + sl - 4), &tmp, &rc);
        if (!g) {
            *badrel = done;
            return rc;
        }
    }
}

int tk_taka_encrypt(const tk_taka *t, const uint8_t *plain, size_t len, uint8_t *out,
                    uint64_t first) {
    return tk_gcm_encrypt(t->gcm, plain, len, out, t->aad, TK_HDR_STATIC, first, NULL);
}

/* The keystore's key name rule (docs/keys.md): [A-Za-z0-9_][A-Za-z0-9._-]*. */
static int key_char_ok(uint8_t c, int first) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')
        return 1;
    return !first && (c == '.' || c == '-');
}

/* Parse the static/dynamic fields; -EBADMSG for anything malformed (fail closed). */
static int parse(tk_taka *t, char name[TK_KEYID_MAX + 1], uint32_t *kver) {
    const uint8_t *h = t->hdr;
    if (memcmp(h, "TAKA", 4) != 0 || (h[4] != 1 && h[4] != 2) || h[5] != 1 || h[6] || h[7])
        return -EBADMSG;
    uint32_t bs = get_le32(h + 8);
    if (!tk_gcm_block_size_ok(bs)) return -EBADMSG;
    *kver = get_le32(h + 12);
    unsigned klen = h[32];
    if (*kver == 0 || klen < 1 || klen > TK_KEYID_MAX) return -EBADMSG;
    for (unsigned i = 0; i < TK_KEYID_MAX; i++) {
        if (i < klen && !key_char_ok(h[33 + i], i == 0)) return -EBADMSG;
        if (i >= klen && h[33 + i] != 0) return -EBADMSG;
    }
    uint64_t size = get_le64(h + 96);
    if (size > TK_MAX_PLAIN) return -EBADMSG;
    if (h[4] == 2 && (get_le32(h + 108) == 0 || get_le32(h + 108) > *kver)) return -EBADMSG;
    memcpy(name, h + 33, klen);
    name[klen] = 0;
    t->bs = bs;
    t->size = size;
    /* the lease may have been used up before a crash or by another opener: count it
     * all as used (conservative), the next encryption takes a new one */
    t->enc_used = h[4] == 2 ? get_le32(h + 104) : get_le64(h + 104);
    return 0;
}

/* The lease of encryptions in the header: u64 in v1, u32 under the write version in v2. */
static uint64_t get_lease(const tk_taka *t) {
    return t->fmtv == 2 ? get_le32(t->hdr + 104) : get_le64(t->hdr + 104);
}
static void put_lease(tk_taka *t, uint64_t n) {
    if (t->fmtv == 2) put_le32(t->hdr + 104, (uint32_t)n);  /* n <= the hard limit < 2^32 */
    else put_le64(t->hdr + 104, n);
}

int tk_taka_load(tk_fs *fs, tk_inode *ino, int fd) {
    tk_taka *t = &ino->taka;
    uint64_t epoch = __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
    if (t->state != 0 && t->epoch == epoch) return t->state == 1 ? 0 : t->state;
    tk_taka_reset(t);
    t->epoch = epoch;
    char name[TK_KEYID_MAX + 1];
    uint32_t kver = 0, vout = 0;
    uint8_t key[32], tag[16];
    ssize_t n = tk_pread_full(fd, t->hdr, TK_HDR_SIZE, 0);
    TK_INC(fs, header_loads, 1);
    if (n < 0) return (int)n;
    int rc = n < TK_HDR_SIZE ? -EBADMSG : parse(t, name, &kver);
    if (rc == 0) {
        rc = tk_key_get(fs, name, kver, &vout, key);
        if (rc == 0) {
            rc = keys_from(t, key);
            OPENSSL_cleanse(key, sizeof key);
        } else {
            rc = -EKEYREJECTED;
        }
    }
    if (rc == 0) rc = header_tag(t->mac_key, t->hdr, tag);
    if (rc == 0 && CRYPTO_memcmp(tag, t->hdr + TK_HDR_TAGOFF, 16) != 0) rc = -EBADMSG;
    if (rc != 0) {
        tk_taka_reset(t);
        t->state = rc;
        t->epoch = epoch;
        return rc;
    }
    t->state = 1;
    return 0;
}

int tk_taka_valid(tk_fs *fs, const tk_taka *t) {
    return t->state == 1 && t->epoch == __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
}

static int write_header(tk_taka *t, int fd) {
    put_le64(t->hdr + 96, t->size);
    if (t->fmtv == 2) {
        put_le32(t->hdr + 12, t->wver);
        put_le32(t->hdr + 108, t->oldest);
    }
    int rc = header_tag(t->mac_key, t->hdr, t->hdr + TK_HDR_TAGOFF);
    return rc ? rc : tk_pwrite_full(fd, t->hdr, TK_HDR_SIZE, 0);
}

/* Per-file GCM budget (docs/file-format.md, "Encryption count"): random 96-bit nonces
 * allow 2^32 encryptions per key (NIST SP 800-38D). Header bytes 104..112 hold the
 * encryptions reserved so far; they are leased ahead in chunks, each lease written
 * (header rewrite) before the encryptions it covers, so the count on disk never falls
 * behind by more than one chunk per crash. At the hard limit the file refuses writes. */
#define NONCE_CHUNK (1ULL << 16)
#define NONCE_SOFT  (1ULL << 31)
#define NONCE_HARD  (3ULL << 30)

static void nonce_limits(uint64_t *chunk, uint64_t *soft, uint64_t *hard) {
    *chunk = NONCE_CHUNK;
    *soft = NONCE_SOFT;
    *hard = NONCE_HARD;
#ifdef TK_TEST_NONCE_LIMITS
    /* test builds only (CFLAGS=-DTK_TEST_NONCE_LIMITS): "chunk:soft:hard", lower only */
    const char *e = getenv("TK_TEST_NONCE_LIMITS");
    unsigned long long c, s, h;
    if (e && sscanf(e, "%llu:%llu:%llu", &c, &s, &h) == 3 && c && c <= *chunk && s <= *soft &&
        h <= *hard) {
        *chunk = c;
        *soft = s;
        *hard = h;
    }
#endif
}

/* v2: the current version of the guard point's key, if it is the file's key and newer
 * than the file's write version: blocks sealed from now on use it (docs/file-format.md,
 * "Version 2", writers).  One header write (new write version, a fresh lease under the
 * new file key) before any block of the new version; the old write version's handle
 * joins the table, so its blocks stay readable.  Under the write lock. */
static int move_version(tk_fs *fs, tk_taka *t, int fd) {
    const size_t klen = strlen(fs->key_name);
    if (t->fmtv != 2 || t->hdr[32] != klen || memcmp(t->hdr + 33, fs->key_name, klen) != 0)
        return 0;
    pthread_mutex_lock(&fs->key_mu);
    uint32_t cur = fs->current_version;  /* 0: not known yet, tk_key_get asks */
    pthread_mutex_unlock(&fs->key_mu);
    if (cur && cur <= t->wver) return 0;
    uint8_t key[32];
    tk_gcm *g = NULL;
    uint8_t *mac = NULL;
    if (tk_key_get(fs, fs->key_name, cur, &cur, key) != 0) return 0;  /* stays as it is */
    int rc = cur > t->wver ? file_keys(t, key, cur, &g, &mac) : 1;
    OPENSSL_cleanse(key, sizeof key);
    if (rc > 0) return 0;  /* on the current version already */
    if (rc) {
        tk_gcm_free(g);
        tk_secmem_free(mac);
        return rc;
    }
    uint64_t chunk, soft, hard;
    nonce_limits(&chunk, &soft, &hard);
    tk_taka o = *t;  /* what to put back if the header write fails */
    t->wver = cur;
    if (t->size == 0) t->oldest = cur;
    t->gcm = g;
    t->mac_key = mac;
    put_lease(t, chunk);
    rc = write_header(t, fd);
    if (rc) {
        memcpy(t->hdr, o.hdr, TK_HDR_SIZE);
        t->wver = o.wver;
        t->oldest = o.oldest;
        t->gcm = o.gcm;
        t->mac_key = o.mac_key;
        tk_gcm_free(g);
        tk_secmem_free(mac);
        return rc;
    }
    tk_secmem_free(o.mac_key);
    t->enc_used = 0;
    /* the old write version's handle: into the table (no reader holds the lock) */
    if (t->nvers < TK_TAKA_VERS) {
        t->vers[t->nvers].ver = o.wver;
        t->vers[t->nvers].gcm = o.gcm;
        __atomic_store_n(&t->nvers, t->nvers + 1, __ATOMIC_RELEASE);
    } else {
        tk_gcm_free(o.gcm);  /* made again on use */
    }
    TK_INC(fs, version_moves, 1);
    return 0;
}

static int reserve(tk_fs *fs, tk_taka *t, int fd, uint64_t n) {
    int mrc = move_version(fs, t, fd);
    if (mrc) return mrc;
    uint64_t chunk, soft, hard, lease = get_lease(t);
    if (n <= lease && t->enc_used <= lease - n) {
        t->enc_used += n;
        return 0;
    }
    nonce_limits(&chunk, &soft, &hard);
    if (t->enc_used > hard || n > hard - t->enc_used) {
        TK_INC(fs, nonce_limit_refusals, 1);
        return -EKEYEXPIRED;
    }
    uint64_t want = t->enc_used + n + chunk;
    if (want > hard) want = hard;
    put_lease(t, want);
    int rc = write_header(t, fd);
    if (rc) {
        put_lease(t, lease);
        return rc;
    }
    if (want > soft) TK_INC(fs, nonce_lease_warnings, 1);
    t->enc_used += n;
    return 0;
}

int tk_taka_create(tk_fs *fs, tk_inode *ino, int fd) {
    tk_taka *t = &ino->taka;
    tk_taka_reset(t);
    uint8_t key[32];
    uint32_t ver = 0;
    if (tk_key_get(fs, fs->key_name, 0, &ver, key)) return -EKEYREJECTED;
    int rc = tk_taka_init_new(t, fs->key_name, ver, key, 4096,
                              fs->cfg.format_version == 2 ? 2 : 1);
    OPENSSL_cleanse(key, sizeof key);
    uint64_t chunk, soft, hard;
    nonce_limits(&chunk, &soft, &hard);
    put_lease(t, chunk);  /* the first lease, in the header written anyway */
    /* a new file is empty: truncating it anyway would make ext4 flush it on close
     * (auto_da_alloc), one synchronous writeback start per created file */
    uint64_t phys = 0;
    if (rc == 0 && (phys_size(fd, &phys) < 0 || phys != 0)) rc = trunc_to(fd, 0);
    if (rc == 0) rc = write_header(t, fd);
    if (rc) {
        tk_taka_reset(t);
        return rc;
    }
    t->epoch = __atomic_load_n(&fs->taka_epoch, __ATOMIC_ACQUIRE);
    t->phys_ok = 1;  /* the header alone */
    return 0;
}

int tk_taka_init_new(tk_taka *t, const char *name, uint32_t version, const uint8_t key[32],
                     uint32_t bs, int fmtv) {
    size_t klen = strlen(name);
    tk_taka_reset(t);
    if (klen < 1 || klen > TK_KEYID_MAX || !tk_gcm_block_size_ok(bs) || version == 0 ||
        (fmtv != 1 && fmtv != 2))
        return -EINVAL;
    uint8_t *h = t->hdr;
    memcpy(h, "TAKA", 4);
    h[4] = (uint8_t)fmtv;
    h[5] = 1;
    t->bs = bs;
    put_le32(h + 8, bs);
    put_le32(h + 12, version);
    if (fmtv == 2) put_le32(h + 108, version);
    if (getrandom(h + 16, 16, 0) != 16) return -EIO;
    h[32] = (uint8_t)klen;
    memcpy(h + 33, name, klen);
    t->size = 0;
    int rc = keys_from(t, key);
    if (rc) {
        tk_taka_reset(t);
        return rc;
    }
    t->state = 1;
    return 0;
}

int tk_taka_put_header(tk_taka *t, int fd, uint64_t encryptions) {
    put_lease(t, encryptions);
    return write_header(t, fd);
}

/*
 * Decrypt blocks first..last (all below `size`) into out; writes exactly
 * *outlen = min((last + 1) * bs, size) - first * bs bytes (whole blocks but a last one
 * cut at the size): out must hold that many.  Readers of an arbitrary byte range use
 * tk_taka_read, which never writes past the range.
 */
int tk_taka_read_blocks(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t first,
                        uint64_t last, uint8_t *out, size_t *outlen, uint64_t *bad) {
    const uint64_t bs = t->bs, sbs = bs + OVH;
    uint64_t want_end = (last + 1) * bs < size ? (last + 1) * bs : size;
    uint64_t nfull = last - first;
    uint64_t last_plain = want_end - last * bs;
    size_t span = (size_t)((nfull + 1) * sbs);
    size_t need = (size_t)(nfull * sbs + last_plain + OVH);
    if (t->phys_ok && size == t->size) {
        /* the stored length is known: ask for no byte past it (a short read would
         * otherwise cost a second pread that finds the end of the file) */
        uint64_t phys = tk_taka_stored_size(size, t->bs), at = block_off(t, first);
        if (phys > at && phys - at < span) span = (size_t)(phys - at);
        if (span < need) span = need;
    }
    uint8_t *raw = malloc(span);
    if (!raw) return -ENOMEM;
    ssize_t n = tk_pread_full(fd, raw, span, block_off(t, first));
    int rc = 0;
    if (n < 0) {
        rc = (int)n;
    } else if ((size_t)n < need) {
        *bad = first + (uint64_t)n / sbs;  /* truncated: first missing/short block */
        rc = -EBADMSG;
    } else {
        size_t w = 0;
        uint64_t badrel = 0;
        int st = tk_taka_decrypt(fs, t, raw, need, out, first, &w, &badrel);
        if (st == TK_ERR_AUTH && badrel == nfull && (size_t)n > need) {
            /* After a crash inside a growing write the last block may be stored at
             * its longer (new) length: that is its only other valid form. */
            uint8_t *tmp = malloc(bs);
            if (!tmp) {
                rc = -ENOMEM;
            } else {
                size_t longer = (size_t)n - nfull * sbs < sbs ? (size_t)n - nfull * sbs
                                                                : (size_t)sbs;
                st = tk_taka_decrypt(fs, t, raw + nfull * sbs, longer, tmp, last, &w, &badrel);
                if (st == TK_OK) memcpy(out + nfull * bs, tmp, last_plain);
                else badrel = nfull;
                OPENSSL_cleanse(tmp, bs);
                free(tmp);
            }
        }
        if (rc == 0 && st != TK_OK) {
            *bad = first + badrel;
            rc = st == TK_ERR_AUTH || st == TK_ERR_SHORT_BLOCK ? -EBADMSG
                 : st == TK_TAKA_NOKEY ? -ENOKEY : -EIO;
        }
    }
    free(raw);
    if (rc == 0) {
        *outlen = (size_t)(nfull * bs + last_plain);
        TK_INC(fs, bytes_decrypted, *outlen);
    }
    return rc;
}

/* Encrypt and store; the caller reserved the encryptions (reserve) before changing
 * anything, so a refusal leaves the file as it was. */
static int store_blocks(tk_fs *fs, tk_taka *t, int fd, uint64_t first, const uint8_t *plain,
                        size_t len) {
    uint64_t nb = 0;
    size_t outlen = 0;
    if (tk_gcm_encrypt_size(len, t->bs, &nb, &outlen) != TK_OK) return -EFBIG;
    uint8_t *out = malloc(outlen ? outlen : 1);
    if (!out) return -ENOMEM;
    int st = tk_taka_encrypt(t, plain, len, out, first);
    int rc = st == TK_OK ? tk_pwrite_full(fd, out, outlen, block_off(t, first)) : -EIO;
    free(out);
    if (rc == 0) TK_INC(fs, bytes_encrypted, len);
    return rc;
}

/* One block (k, below `size`) through a bounce buffer: copies its plaintext
 * [from, to) (block-relative) to out.  For the partial edges of a read. */
static int read_edge(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t k, size_t from,
                     size_t to, uint8_t *out, uint64_t *bad) {
    uint8_t *tmp = malloc(t->bs);
    size_t got = 0;
    if (!tmp) return -ENOMEM;
    int rc = tk_taka_read_blocks(fs, t, fd, size, k, k, tmp, &got, bad);
    if (rc == 0 && got < to) rc = -EIO;  /* cannot happen: k is below the size */
    if (rc == 0) memcpy(out, tmp + from, to - from);
    OPENSSL_cleanse(tmp, t->bs);
    free(tmp);
    return rc;
}

/*
 * The plaintext [off, off + len) clipped to the size, into out: writes exactly the
 * bytes returned and never one past them (out may be a malloc'ed reply of exactly
 * `len` bytes).  Blocks wholly inside the range are decrypted straight into out (split
 * over the helpers when large); a partial first or last block -- an offset or an end
 * inside a block, as with O_DIRECT, a file of large blocks or a short read -- goes
 * through a bounce buffer of one block.
 */
ssize_t tk_taka_read(tk_fs *fs, tk_taka *t, int fd, char *out, size_t len, uint64_t off,
                     uint64_t *bad, const tk_hint *hint) {
    const uint64_t size = t->size, bs = t->bs;
    if (off >= size || len == 0) {
        if (hint) tk_hint_apply(fs, fd, hint);
        return 0;
    }
    const uint64_t end = size - off < len ? size : off + len;
    const uint64_t first = off / bs, last = (end - 1) / bs;
    uint8_t *o = (uint8_t *)out;
    /* the first and the last block may hold bytes outside [off, end): those two go
     * through read_edge, the blocks [lo, hi] between are decrypted in place */
    const uint64_t last_end = (last + 1) * bs < size ? (last + 1) * bs : size;
    const int head = off % bs != 0 || (first == last && last_end > end);
    const int tail = last > first && last_end > end;
    const uint64_t lo = first + (uint64_t)head, hi = last - (uint64_t)tail;
    int rc = 0;
    if (head) {
        uint64_t to = (first + 1) * bs < end ? (first + 1) * bs : end;
        rc = read_edge(fs, t, fd, size, first, (size_t)(off - first * bs),
                       (size_t)(to - first * bs), o, bad);
    }
    if (rc == 0 && lo <= hi) {
        size_t got = 0;
        rc = tk_split_read_blocks(fs, t, fd, size, lo, hi, o + (lo * bs - off), &got, bad,
                                  hint);
        hint = NULL;
    }
    if (rc == 0 && tail)
        rc = read_edge(fs, t, fd, size, last, 0, (size_t)(end - last * bs),
                       o + (last * bs - off), bad);
    if (hint) tk_hint_apply(fs, fd, hint);
    return rc ? rc : (ssize_t)(end - off);
}

/* Cut stored bytes past the size (crash leftovers) before the file grows.  Once the
 * engine has written or cut the stored length itself (phys_ok) there are none: the
 * backing file has no other writer (the raw view resets the state). */
static int drop_stale_tail(tk_taka *t, int fd) {
    if (t->phys_ok) return 0;
    uint64_t phys, want;
    int rc = phys_size(fd, &phys);
    if (rc) return rc;
    if (t->size == 0) {
        want = TK_HDR_SIZE;
    } else {
        uint64_t start = block_off(t, (t->size - 1) / t->bs), sbs = t->bs + OVH;
        uint64_t have = phys > start ? phys - start : 0;
        want = start + (have < sbs ? have : sbs);
    }
    return phys > want ? trunc_to(fd, want) : 0;
}

/* Re-encrypt block k zero-extended to new_len plaintext bytes (k below the size). */
static int rewrite_block(tk_fs *fs, tk_taka *t, int fd, uint64_t k, uint64_t new_len,
                         uint64_t *bad) {
    uint8_t *buf = calloc(1, t->bs);
    size_t got = 0;
    if (!buf) return -ENOMEM;
    int rc = tk_taka_read_blocks(fs, t, fd, t->size, k, k, buf, &got, bad);
    if (rc == 0) rc = store_blocks(fs, t, fd, k, buf, (size_t)new_len);
    OPENSSL_cleanse(buf, t->bs);
    free(buf);
    return rc;
}

/* Store blocks first..last holding [off, off + n) of new data: the existing plaintext
 * at the partial edges is read, verified and merged first, never bytes past the old
 * size; blen is the plaintext length from block `first` on that the blocks will hold. */
static int store_merged(tk_fs *fs, tk_taka *t, int fd, const char *data, size_t n,
                        uint64_t off, uint64_t old, size_t blen, uint64_t *bad) {
    const uint64_t bs = t->bs, end = off + n;
    const uint64_t first = off / bs, last = (end - 1) / bs;
    uint8_t *buf = calloc(1, blen);
    if (!buf) return -ENOMEM;
    size_t got = 0;
    int rc = 0;
    int head = off % bs != 0 && first * bs < old;
    if (head) rc = tk_taka_read_blocks(fs, t, fd, old, first, first, buf, &got, bad);
    uint64_t lim = (last + 1) * bs < old ? (last + 1) * bs : old;
    if (rc == 0 && end < lim && !(head && last == first)) {
        uint8_t *dst = buf + (last - first) * bs;
        if (blen - (last - first) * bs >= bs) {
            rc = tk_taka_read_blocks(fs, t, fd, old, last, last, dst, &got, bad);
        } else {
            uint8_t *tmp = malloc(bs);
            rc = tmp ? tk_taka_read_blocks(fs, t, fd, old, last, last, tmp, &got, bad) : -ENOMEM;
            if (rc == 0) memcpy(dst, tmp, blen - (last - first) * bs);
            if (tmp) OPENSSL_cleanse(tmp, bs);
            free(tmp);
        }
    }
    if (rc == 0) {
        memcpy(buf + (off - first * bs), data, n);
        rc = store_blocks(fs, t, fd, first, buf, blen);
    }
    OPENSSL_cleanse(buf, blen);
    free(buf);
    return rc;
}

int tk_taka_write(tk_fs *fs, tk_taka *t, int fd, const char *data, size_t n, uint64_t off,
                  uint64_t *bad) {
    if (n == 0) return 0;
    if (off > TK_MAX_PLAIN || n > TK_MAX_PLAIN - off) return -EFBIG;
    const uint64_t bs = t->bs, old = t->size, end = off + n;
    const uint64_t first = off / bs, last = (end - 1) / bs;
    /* a partial last block before a gap is zero-extended to a full block first */
    const int extend = old % bs && (old - 1) / bs < first;
    int rc = reserve(fs, t, fd, last - first + 1 + (uint64_t)extend);
    if (rc) return rc;
    if (end > old && (rc = drop_stale_tail(t, fd))) return rc;
    if (extend &&
        (rc = rewrite_block(fs, t, fd, (old - 1) / bs, bs, bad))) {
        t->phys_ok = 0;
        return rc;
    }
    uint64_t hi = old > end ? old : end;
    uint64_t block_end = (last + 1) * bs < hi ? (last + 1) * bs : hi;
    size_t blen = (size_t)(block_end - first * bs);
    if (off % bs == 0 && blen == n)  /* whole blocks (or a new tail): nothing to merge */
        rc = store_blocks(fs, t, fd, first, (const uint8_t *)data, n);
    else
        rc = store_merged(fs, t, fd, data, n, off, old, blen, bad);
    if (rc) {
        t->phys_ok = 0;
        return rc;
    }
    if (end >= old && !t->phys_ok) {  /* the last block was rewritten: cut any longer
                                       * stale copy */
        uint64_t want = tk_taka_stored_size(end, t->bs), phys;
        if ((rc = phys_size(fd, &phys))) return rc;
        if (phys > want && (rc = trunc_to(fd, want))) return rc;
        t->phys_ok = 1;  /* phys >= want: the blocks up to `end` were just stored */
    }
    if (end > old) {
        t->size = end;
        if ((rc = write_header(t, fd))) {
            t->size = old;
            t->phys_ok = 0;
            return rc;
        }
    }
    return 0;
}

int tk_taka_truncate(tk_fs *fs, tk_taka *t, int fd, uint64_t size, uint64_t *bad) {
    const uint64_t old = t->size, bs = t->bs;
    int rc;
    if (size == old) return 0;
    if (size > TK_MAX_PLAIN) return -EFBIG;
    if (size < old) {
        uint8_t *keep = NULL;
        size_t got = 0;
        if (size % bs && (rc = reserve(fs, t, fd, 1))) return rc;
        if (size % bs) {  /* verify the new partial block before anything changes */
            keep = malloc(bs);
            if (!keep) return -ENOMEM;
            rc = tk_taka_read_blocks(fs, t, fd, old, size / bs, size / bs, keep, &got, bad);
            if (rc) {
                free(keep);
                return rc;
            }
        }
        t->size = size;  /* header first when shrinking */
        uint32_t oldest = t->oldest;
        if (size == 0) t->oldest = t->wver;  /* v2: no block left of an older version */
        rc = write_header(t, fd);
        if (rc) t->oldest = oldest;
        if (rc == 0 && keep) rc = store_blocks(fs, t, fd, size / bs, keep, (size_t)(size % bs));
        if (keep) {
            OPENSSL_cleanse(keep, bs);
            free(keep);
        }
        if (rc == 0) rc = trunc_to(fd, tk_taka_stored_size(size, t->bs));
        t->phys_ok = rc == 0;
        return rc;
    }
    if (old % bs && (rc = reserve(fs, t, fd, 1))) return rc;
    if ((rc = drop_stale_tail(t, fd))) return rc;
    if (old % bs) {
        uint64_t k = (old - 1) / bs;
        uint64_t nl = size - k * bs < bs ? size - k * bs : bs;
        if ((rc = rewrite_block(fs, t, fd, k, nl, bad))) {
            t->phys_ok = 0;
            return rc;
        }
    }
    /* the rest is a hole: extend the stored length without writing anything */
    if ((rc = trunc_to(fd, tk_taka_stored_size(size, t->bs)))) {
        t->phys_ok = 0;
        return rc;
    }
    t->size = size;
    if ((rc = write_header(t, fd))) t->size = old;
    t->phys_ok = rc == 0;
    return rc;
}

int tk_taka_truncate0(tk_fs *fs, tk_inode *ino, int fd, uint64_t *bad) {
    tk_taka *t = &ino->taka;
    const size_t klen = strlen(fs->key_name);
    uint8_t key[32];
    uint32_t cur = 0;
    if (t->fmtv == 2 && t->hdr[32] == klen && memcmp(t->hdr + 33, fs->key_name, klen) == 0) {
        /* v2: the same file, emptied, then moved to the current version (oldest too) */
        int rc = tk_taka_truncate(fs, t, fd, 0, bad);
        return rc ? rc : move_version(fs, t, fd);
    }
    /* a file being rekeyed moves with the rekey (its copy is on the target version) */
    if (ino->rk || tk_key_get(fs, fs->key_name, 0, &cur, key) != 0)
        return tk_taka_truncate(fs, t, fd, 0, bad);
    if (get_le32(t->hdr + 12) == cur && t->hdr[32] == klen &&
        memcmp(t->hdr + 33, fs->key_name, klen) == 0) {
        OPENSSL_cleanse(key, sizeof key);
        return tk_taka_truncate(fs, t, fd, 0, bad);
    }
    tk_taka nt;
    memset(&nt, 0, sizeof nt);
    int rc = tk_taka_init_new(&nt, fs->key_name, cur, key, t->bs,
                              fs->cfg.format_version == 2 ? 2 : 1);
    OPENSSL_cleanse(key, sizeof key);
    if (rc) return tk_taka_truncate(fs, t, fd, 0, bad);  /* kept on its version */
    uint64_t chunk, soft, hard;
    nonce_limits(&chunk, &soft, &hard);
    put_lease(&nt, chunk);  /* the first lease, in the header written anyway */
    /* The new header first, over the old one: from then on the file is the empty file
     * of the new header (what follows it is a stale tail, ignored by every reader), so
     * a crash at any point leaves either the old file or an empty one; then the cut. */
    rc = write_header(&nt, fd);
    if (rc) {
        tk_taka_reset(&nt);
        t->phys_ok = 0;
        return rc;
    }
    uint64_t epoch = t->epoch;
    tk_taka_reset(t);
    *t = nt;
    t->epoch = epoch;
    t->phys_ok = trunc_to(fd, TK_HDR_SIZE) == 0;  /* else cut at the next growth */
    TK_INC(fs, header_renewals, 1);
    return 0;
}
