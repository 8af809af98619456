/*
 * aesgcm_impl.c -- Takakrypt AES-256-GCM block batch core.  See aesgcm_impl.h.
 *
 * Engines:
 *   ipsec-mb  one process-wide IMB_MGR (read-only after init) + per-handle
 *             64-byte aligned gcm_key_data + per-call gcm_context_data on the stack.
 *   OpenSSL   a mutex-protected pool of EVP_CIPHER_CTX, each a copy of a keyed
 *             template context; a batch takes one context, resets only the IV per
 *             block, and returns it.
 *
 * Key memory: the handle, and with it the ipsec-mb key schedule, lives in secure
 * memory (secmem.h: locked, not dumped, zero in a fork()ed child, wiped on free).
 * A child that inherited a handle finds its canary zero and gets TK_ERR_WIPED, never
 * a schedule of zeros.  OpenSSL's contexts (and their schedules) are allocated by
 * OpenSSL and stay outside (docs/keys.md, "Keys in memory").
 */
#define _GNU_SOURCE 1

#include "aesgcm_impl.h"
#include "secmem.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <intel-ipsec-mb.h>

#define TK_OSSL_POOL_MAX 16

static int g_secure = 1; /* tk_gcm_set_secure_memory (benchmarks only) */
#define TK_NONCE_STACK_BLOCKS 256 /* 3 KiB of nonces on the stack, malloc beyond */

#define TK_GCM_LIVE 0x6576696c6d63676bULL /* "kgcmlive" */

struct tk_gcm {
    /* ipsec-mb key schedule: first, so 64-byte aligned in a secure slot */
    struct gcm_key_data imb_key __attribute__((aligned(64)));
    uint64_t live;                /* TK_GCM_LIVE; 0 in a fork()ed child */
    int heap;                     /* 1: plain heap (tk_gcm_set_secure_memory(0)) */
    tk_engine engine;
    size_t block_size;
    uint32_t version;             /* 0: TAKA v1 blocks; >= 1: TAKA v2 blocks of it */
    size_t tag_len;               /* 16 (v1) or 12 (v2) */
    size_t aad_tail;              /* 8 (v1: u64 index) or 12 (v2: + u32 version) */
    /* OpenSSL */
    pthread_mutex_t pool_mu;
    int pool_mu_init;
    EVP_CIPHER_CTX *tmpl;                       /* keyed template, never used for crypto */
    EVP_CIPHER_CTX *pool[TK_OSSL_POOL_MAX];     /* idle keyed contexts */
    int pool_n;
};

/* ------------------------------------------------------------------------- */
/* helpers                                                                    */

static inline void store_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void store_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static inline int all_zero(const uint8_t *p, size_t n)
{
    uint8_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

static int fill_random(uint8_t *buf, size_t len)
{
    while (len > 0) {
        ssize_t r = getrandom(buf, len, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return TK_ERR_RANDOM;
        }
        buf += r;
        len -= (size_t)r;
    }
    return TK_OK;
}

/*
 * Nonce randomness.  getrandom() costs about 1 us per call here, more than the
 * crypto of a 4 KiB block, so small batches take their nonces from a per-thread
 * pool of random bytes refilled by one getrandom() per 4 KiB.  The pool lives in its
 * own page marked MADV_WIPEONFORK: after fork() the child sees a zeroed page
 * (avail = 0) and refills, so parent and child can never hand out the same bytes.
 * Without WIPEONFORK (kernel < 4.14) every batch calls getrandom() directly.
 * Nonces are public, so the pool holds nothing secret.
 */
#define TK_RNG_PAGE 4096
struct tk_rng {
    size_t avail;                                   /* unread bytes at the end of buf */
    uint8_t buf[TK_RNG_PAGE - sizeof(size_t)];
};
static __thread struct tk_rng *tls_rng;             /* SAFETY: thread-local, no sharing */
static __thread int tls_rng_state;                  /* 0 untried, 1 pool, -1 direct */
static pthread_key_t rng_key;
static pthread_once_t rng_once = PTHREAD_ONCE_INIT;

static void rng_free(void *p)
{
    if (p)
        munmap(p, TK_RNG_PAGE);
}

static void rng_key_init(void)
{
    (void)pthread_key_create(&rng_key, rng_free);
}

static struct tk_rng *rng_pool(void)
{
    if (tls_rng_state == 0) {
        tls_rng_state = -1;
        pthread_once(&rng_once, rng_key_init);
        void *p = mmap(NULL, TK_RNG_PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED) {
#ifdef MADV_WIPEONFORK
            if (madvise(p, TK_RNG_PAGE, MADV_WIPEONFORK) == 0) {
                tls_rng = p;
                tls_rng_state = 1;
                (void)pthread_setspecific(rng_key, p);
            } else
#endif
                munmap(p, TK_RNG_PAGE);
        }
    }
    return tls_rng_state == 1 ? tls_rng : NULL;
}

static int random_bytes(uint8_t *out, size_t len)
{
    struct tk_rng *r = len <= sizeof(tls_rng->buf) / 2 ? rng_pool() : NULL;
    if (r == NULL)
        return fill_random(out, len);
    if (r->avail < len) {
        int rc = fill_random(r->buf, sizeof(r->buf));
        if (rc != TK_OK)
            return rc;
        r->avail = sizeof(r->buf);
    }
    uint8_t *src = r->buf + sizeof(r->buf) - r->avail;
    memcpy(out, src, len);
    memset(src, 0, len);  /* each byte is handed out once */
    r->avail -= len;
    return TK_OK;
}

/* Draw nblocks fresh random nonces; redraw any all-zero nonce
 * (all-zero stored blocks are reserved for sparse holes). */
static int draw_nonces(uint8_t *buf, uint64_t nblocks)
{
    int rc = random_bytes(buf, (size_t)nblocks * TK_GCM_NONCE_SIZE);
    if (rc != TK_OK)
        return rc;
    for (uint64_t i = 0; i < nblocks; i++) {
        uint8_t *n = buf + i * TK_GCM_NONCE_SIZE;
        while (all_zero(n, TK_GCM_NONCE_SIZE)) {
            rc = fill_random(n, TK_GCM_NONCE_SIZE);
            if (rc != TK_OK)
                return rc;
        }
    }
    return TK_OK;
}

const char *tk_gcm_strerror(int status)
{
    switch (status) {
    case TK_OK: return "ok";
    case TK_ERR_NOMEM: return "out of memory";
    case TK_ERR_ENGINE: return "engine not available";
    case TK_ERR_RANDOM: return "getrandom() failed";
    case TK_ERR_AUTH: return "authentication failed";
    case TK_ERR_SHORT_BLOCK: return "stored block shorter than 29 bytes";
    case TK_ERR_CRYPTO: return "crypto library error";
    case TK_ERR_ARG: return "invalid argument";
    case TK_ERR_WIPED: return "key schedule wiped (inherited across fork)";
    case TK_ERR_VERSION: return "block sealed under another key version";
    default: return "unknown error";
    }
}

const char *tk_gcm_engine_name(tk_engine engine)
{
    switch (engine) {
    case TK_ENGINE_IPSECMB: return "ipsecmb";
    case TK_ENGINE_OPENSSL: return "openssl";
    default: return "?";
    }
}

int tk_gcm_block_size_ok(size_t bs)
{
    return bs >= TK_GCM_MIN_BLOCK && bs <= TK_GCM_MAX_BLOCK && (bs & (bs - 1)) == 0;
}

int tk_gcm_encrypt_size(size_t pt_len, size_t bs, uint64_t *nblocks, size_t *out_len)
{
    if (!tk_gcm_block_size_ok(bs))
        return TK_ERR_ARG;
    uint64_t nb = pt_len / bs + (pt_len % bs != 0);
    size_t over;
    if (__builtin_mul_overflow((size_t)nb, (size_t)TK_GCM_OVERHEAD, &over))
        return TK_ERR_ARG;
    if (__builtin_add_overflow(pt_len, over, out_len))
        return TK_ERR_ARG;
    *nblocks = nb;
    return TK_OK;
}

int tk_gcm_decrypt_size(size_t ct_len, size_t bs, uint64_t *nblocks, size_t *out_len,
                        uint64_t *short_block)
{
    if (!tk_gcm_block_size_ok(bs))
        return TK_ERR_ARG;
    size_t sbs = bs + TK_GCM_OVERHEAD;
    uint64_t full = ct_len / sbs;
    size_t rem = ct_len % sbs;
    uint64_t nb = full + (rem != 0);
    if (rem != 0 && rem <= TK_GCM_OVERHEAD) {
        *short_block = full;
        return TK_ERR_SHORT_BLOCK;
    }
    *nblocks = nb;
    *out_len = ct_len - (size_t)nb * TK_GCM_OVERHEAD;
    return TK_OK;
}

/* ------------------------------------------------------------------------- */
/* ipsec-mb engine                                                            */

/*
 * SAFETY: one IMB_MGR is shared by all threads.  It is written once under
 * pthread_once and afterwards only read (we only call the direct GCM function
 * pointers it holds, which take the key and context explicitly; no job queue is
 * used).  All per-operation state (gcm_context_data) lives on the caller's stack.
 * (With SAFE_PARAM builds the library may store into its own global error code on
 * each direct call; we never read it, and it is a plain int, so concurrent calls
 * cannot corrupt our data through it.)
 */
static IMB_MGR *g_imb_mgr;
static pthread_once_t g_imb_once = PTHREAD_ONCE_INIT;

static void imb_init_once(void)
{
    IMB_MGR *m = alloc_mb_mgr(0);
    if (m == NULL)
        return;
    IMB_ARCH arch = IMB_ARCH_NONE;
    init_mb_mgr_auto(m, &arch);
    if (imb_get_errno(m) != 0 || arch == IMB_ARCH_NONE || m->gcm256_enc == NULL ||
        m->gcm256_dec == NULL || m->gcm256_pre == NULL) {
        free_mb_mgr(m);
        return;
    }
    g_imb_mgr = m; /* intentionally never freed: process lifetime singleton */
}

static IMB_MGR *imb_mgr(void)
{
    pthread_once(&g_imb_once, imb_init_once);
    return g_imb_mgr;
}

static int imb_setup(tk_gcm *g, const uint8_t *key)
{
    IMB_MGR *m = imb_mgr();
    if (m == NULL)
        return TK_ERR_ENGINE;
    IMB_AES256_GCM_PRE(m, key, &g->imb_key);
    return TK_OK;
}

static int imb_encrypt(tk_gcm *g, const uint8_t *pt, size_t pt_len, uint8_t *out,
                       uint8_t *aad, size_t aad_len, uint64_t first_block,
                       const uint8_t *nonces, uint64_t nblocks)
{
    IMB_MGR *m = g_imb_mgr; /* non-NULL: checked in imb_setup */
    const size_t bs = g->block_size;
    const size_t sbs = bs + TK_GCM_OVERHEAD;
    struct gcm_context_data ctx __attribute__((aligned(64)));

    for (uint64_t i = 0; i < nblocks; i++) {
        size_t off = (size_t)i * bs;
        size_t n = pt_len - off < bs ? pt_len - off : bs;
        uint8_t *dst = out + (size_t)i * sbs;
        memcpy(dst, nonces + i * TK_GCM_NONCE_SIZE, TK_GCM_NONCE_SIZE);
        store_le64(aad + aad_len, first_block + i);
        IMB_AES256_GCM_ENC(m, &g->imb_key, &ctx, dst + TK_GCM_NONCE_SIZE, pt + off, n,
                           dst, aad, aad_len + g->aad_tail, dst + TK_GCM_NONCE_SIZE + n,
                           g->tag_len);
        if (g->version)
            store_le32(dst + TK_GCM_NONCE_SIZE + n + g->tag_len, g->version);
    }
    if (nblocks)
        explicit_bzero(&ctx, sizeof ctx);
    return TK_OK;
}

static int imb_decrypt(tk_gcm *g, const uint8_t *ct, size_t ct_len, uint8_t *out,
                       uint8_t *aad, size_t aad_len, uint64_t first_block, int holes,
                       uint64_t nblocks, size_t pt_total, uint64_t *bad_block)
{
    IMB_MGR *m = g_imb_mgr;
    const size_t bs = g->block_size;
    const size_t sbs = bs + TK_GCM_OVERHEAD;
    struct gcm_context_data ctx __attribute__((aligned(64)));
    uint8_t tag[TK_GCM_TAG_SIZE];
    int rc = TK_OK;

    for (uint64_t i = 0; i < nblocks; i++) {
        size_t soff = (size_t)i * sbs;
        size_t sl = ct_len - soff < sbs ? ct_len - soff : sbs;
        size_t n = sl - TK_GCM_OVERHEAD;
        const uint8_t *src = ct + soff;
        uint8_t *dst = out + (size_t)i * bs;
        if (holes && all_zero(src + sl - TK_GCM_TAG_SIZE, TK_GCM_TAG_SIZE) &&
            all_zero(src, sl)) {
            memset(dst, 0, n);
            continue;
        }
        if (g->version && load_le32(src + sl - 4) != g->version) {
            /* nothing of it or after it was written: out is left as it was there (the
             * caller goes on with that version's handle; zeroing it here made reading a
             * file of alternating versions quadratic) */
            *bad_block = i;
            rc = TK_ERR_VERSION;
            break;
        }
        store_le64(aad + aad_len, first_block + i);
        IMB_AES256_GCM_DEC(m, &g->imb_key, &ctx, dst, src + TK_GCM_NONCE_SIZE, n, src,
                           aad, aad_len + g->aad_tail, tag, g->tag_len);
        if (CRYPTO_memcmp(tag, src + TK_GCM_NONCE_SIZE + n, g->tag_len) != 0) {
            memset(dst, 0, pt_total - (size_t)i * bs);
            *bad_block = i;
            rc = TK_ERR_AUTH;
            break;
        }
    }
    explicit_bzero(&ctx, sizeof ctx);
    explicit_bzero(tag, sizeof tag);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* OpenSSL engine                                                             */

static int ossl_setup(tk_gcm *g, const uint8_t *key)
{
    if (pthread_mutex_init(&g->pool_mu, NULL) != 0)
        return TK_ERR_NOMEM;
    g->pool_mu_init = 1;
    g->tmpl = EVP_CIPHER_CTX_new();
    if (g->tmpl == NULL)
        return TK_ERR_NOMEM;
    if (EVP_EncryptInit_ex(g->tmpl, EVP_aes_256_gcm(), NULL, key, NULL) != 1)
        return TK_ERR_CRYPTO;
    return TK_OK;
}

/* Take an idle keyed context from the pool, or copy a new one from the template. */
static EVP_CIPHER_CTX *ossl_acquire(tk_gcm *g)
{
    EVP_CIPHER_CTX *c = NULL;
    pthread_mutex_lock(&g->pool_mu);
    if (g->pool_n > 0) {
        c = g->pool[--g->pool_n];
        pthread_mutex_unlock(&g->pool_mu);
        return c;
    }
    pthread_mutex_unlock(&g->pool_mu);
    c = EVP_CIPHER_CTX_new();
    if (c == NULL)
        return NULL;
    /* SAFETY: the template is immutable after setup; copying only reads it, but we
     * still serialise copies under the pool mutex to not depend on that detail. */
    pthread_mutex_lock(&g->pool_mu);
    int ok = EVP_CIPHER_CTX_copy(c, g->tmpl);
    pthread_mutex_unlock(&g->pool_mu);
    if (ok != 1) {
        EVP_CIPHER_CTX_free(c);
        return NULL;
    }
    return c;
}

static void ossl_release(tk_gcm *g, EVP_CIPHER_CTX *c, int broken)
{
    if (!broken) {
        pthread_mutex_lock(&g->pool_mu);
        if (g->pool_n < TK_OSSL_POOL_MAX) {
            g->pool[g->pool_n++] = c;
            c = NULL;
        }
        pthread_mutex_unlock(&g->pool_mu);
    }
    EVP_CIPHER_CTX_free(c); /* clears the provider context; NULL is a no-op */
}

static int ossl_encrypt(tk_gcm *g, const uint8_t *pt, size_t pt_len, uint8_t *out,
                        uint8_t *aad, size_t aad_len, uint64_t first_block,
                        const uint8_t *nonces, uint64_t nblocks)
{
    const size_t bs = g->block_size;
    const size_t sbs = bs + TK_GCM_OVERHEAD;
    int rc = TK_OK;
    if (nblocks == 0)
        return TK_OK;
    EVP_CIPHER_CTX *c = ossl_acquire(g);
    if (c == NULL)
        return TK_ERR_CRYPTO;
    for (uint64_t i = 0; i < nblocks; i++) {
        size_t off = (size_t)i * bs;
        size_t n = pt_len - off < bs ? pt_len - off : bs;
        uint8_t *dst = out + (size_t)i * sbs;
        int l1 = 0, l2 = 0, l3 = 0;
        memcpy(dst, nonces + i * TK_GCM_NONCE_SIZE, TK_GCM_NONCE_SIZE);
        store_le64(aad + aad_len, first_block + i);
        /* n <= 1 MiB and aad_len <= 264, so the int casts below cannot truncate. */
        if (EVP_CipherInit_ex(c, NULL, NULL, NULL, dst, 1) != 1 ||
            EVP_CipherUpdate(c, NULL, &l1, aad, (int)(aad_len + g->aad_tail)) != 1 ||
            EVP_CipherUpdate(c, dst + TK_GCM_NONCE_SIZE, &l2, pt + off, (int)n) != 1 ||
            EVP_CipherFinal_ex(c, dst + TK_GCM_NONCE_SIZE + l2, &l3) != 1 ||
            (size_t)l2 + (size_t)l3 != n ||
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, (int)g->tag_len,
                                dst + TK_GCM_NONCE_SIZE + n) != 1) {
            rc = TK_ERR_CRYPTO;
            break;
        }
        if (g->version)
            store_le32(dst + TK_GCM_NONCE_SIZE + n + g->tag_len, g->version);
    }
    ossl_release(g, c, rc != TK_OK);
    return rc;
}

static int ossl_decrypt(tk_gcm *g, const uint8_t *ct, size_t ct_len, uint8_t *out,
                        uint8_t *aad, size_t aad_len, uint64_t first_block, int holes,
                        uint64_t nblocks, size_t pt_total, uint64_t *bad_block)
{
    const size_t bs = g->block_size;
    const size_t sbs = bs + TK_GCM_OVERHEAD;
    int rc = TK_OK;
    if (nblocks == 0)
        return TK_OK;
    EVP_CIPHER_CTX *c = ossl_acquire(g);
    if (c == NULL)
        return TK_ERR_CRYPTO;
    for (uint64_t i = 0; i < nblocks; i++) {
        size_t soff = (size_t)i * sbs;
        size_t sl = ct_len - soff < sbs ? ct_len - soff : sbs;
        size_t n = sl - TK_GCM_OVERHEAD;
        const uint8_t *src = ct + soff;
        uint8_t *dst = out + (size_t)i * bs;
        int l1 = 0, l2 = 0, l3 = 0;
        if (holes && all_zero(src + sl - TK_GCM_TAG_SIZE, TK_GCM_TAG_SIZE) &&
            all_zero(src, sl)) {
            memset(dst, 0, n);
            continue;
        }
        if (g->version && load_le32(src + sl - 4) != g->version) {
            /* nothing of it or after it was written: out is left as it was there (the
             * caller goes on with that version's handle; zeroing it here made reading a
             * file of alternating versions quadratic) */
            *bad_block = i;
            rc = TK_ERR_VERSION;
            break;
        }
        store_le64(aad + aad_len, first_block + i);
        if (EVP_CipherInit_ex(c, NULL, NULL, NULL, src, 0) != 1 ||
            EVP_CipherUpdate(c, NULL, &l1, aad, (int)(aad_len + g->aad_tail)) != 1 ||
            EVP_CipherUpdate(c, dst, &l2, src + TK_GCM_NONCE_SIZE, (int)n) != 1 ||
            (size_t)l2 != n ||
            /* SET_TAG takes a non-const pointer but only reads the tag's bytes. */
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, (int)g->tag_len,
                                (void *)(src + TK_GCM_NONCE_SIZE + n)) != 1) {
            memset(dst, 0, pt_total - (size_t)i * bs);
            rc = TK_ERR_CRYPTO;
            break;
        }
        if (EVP_CipherFinal_ex(c, dst + l2, &l3) != 1) {
            memset(dst, 0, pt_total - (size_t)i * bs);
            *bad_block = i;
            rc = TK_ERR_AUTH;
            break;
        }
    }
    /* An auth failure leaves the context reusable (the next block re-inits the IV). */
    ossl_release(g, c, rc == TK_ERR_CRYPTO);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* public API                                                                 */

int tk_gcm_engine_available(tk_engine engine)
{
    switch (engine) {
    case TK_ENGINE_IPSECMB: return imb_mgr() != NULL;
    case TK_ENGINE_OPENSSL: return 1;
    default: return 0;
    }
}

tk_gcm *tk_gcm_new(const uint8_t key[TK_GCM_KEY_SIZE], size_t block_size,
                   tk_engine engine, int *status)
{
    return tk_gcm_new_versioned(key, block_size, engine, 0, status);
}

tk_gcm *tk_gcm_new_versioned(const uint8_t key[TK_GCM_KEY_SIZE], size_t block_size,
                             tk_engine engine, uint32_t block_version, int *status)
{
    int rc;
    if (!tk_gcm_block_size_ok(block_size)) {
        *status = TK_ERR_ARG;
        return NULL;
    }
    if (engine != TK_ENGINE_IPSECMB && engine != TK_ENGINE_OPENSSL) {
        *status = TK_ERR_ENGINE;
        return NULL;
    }
    int heap = !__atomic_load_n(&g_secure, __ATOMIC_RELAXED);
    tk_gcm *g = NULL;
    if (heap) {
        void *p = NULL;
        if (posix_memalign(&p, 64, sizeof *g) == 0)
            g = memset(p, 0, sizeof *g);
    } else {
        g = tk_secmem_alloc(sizeof *g); /* zeroed */
    }
    if (g == NULL) {
        *status = TK_ERR_NOMEM;
        return NULL;
    }
    g->live = TK_GCM_LIVE;
    g->heap = heap;
    g->engine = engine;
    g->block_size = block_size;
    g->version = block_version;
    g->tag_len = block_version ? TK_GCM_TAG_SIZE_V2 : TK_GCM_TAG_SIZE;
    g->aad_tail = block_version ? 12 : 8;
    rc = engine == TK_ENGINE_IPSECMB ? imb_setup(g, key) : ossl_setup(g, key);
    tk_secmem_zero_registers();
    if (rc != TK_OK) {
        tk_gcm_free(g);
        *status = rc;
        return NULL;
    }
    *status = TK_OK;
    return g;
}

void tk_gcm_free(tk_gcm *g)
{
    if (g == NULL)
        return;
    /* EVP_CIPHER_CTX_free cleanses the provider context (incl. the key schedule).
     * In a fork()ed child all of this reads zero: nothing to free but the slot. */
    for (int i = 0; i < g->pool_n; i++)
        EVP_CIPHER_CTX_free(g->pool[i]);
    EVP_CIPHER_CTX_free(g->tmpl);
    if (g->pool_mu_init)
        pthread_mutex_destroy(&g->pool_mu);
    if (g->heap) {
        OPENSSL_cleanse(g, sizeof *g);
        free(g);
    } else {
        tk_secmem_free(g); /* zeroes the slot */
    }
}

void tk_gcm_set_secure_memory(int on)
{
    __atomic_store_n(&g_secure, on != 0, __ATOMIC_RELAXED);
}

const void *tk_gcm_key_area(const tk_gcm *g, size_t *len)
{
    *len = g->engine == TK_ENGINE_IPSECMB ? sizeof g->imb_key : 0;
    return *len ? (const void *)&g->imb_key : NULL;
}

tk_engine tk_gcm_engine(const tk_gcm *g) { return g->engine; }
uint32_t tk_gcm_block_version(const tk_gcm *g) { return g->version; }
size_t tk_gcm_block_size(const tk_gcm *g) { return g->block_size; }

/*
 * SAFETY (buffers shared across threads): pt/ct, aad_prefix and nonces may be
 * Python-owned buffers that other threads can write to while we run without the GIL
 * (e.g. a bytearray).  We only read them once per block and never size anything
 * from their contents, so a concurrent writer can at worst change the bytes we
 * encrypt/authenticate, not make us access out of bounds.  The same holds for `out`.
 * The aad buffer we actually pass to the engines is our own stack copy.
 */
int tk_gcm_encrypt(tk_gcm *g, const uint8_t *pt, size_t pt_len, uint8_t *out,
                   const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                   const uint8_t *nonces)
{
    uint8_t aad[TK_GCM_MAX_AAD_PREFIX + 12];
    uint8_t nonce_stack[TK_NONCE_STACK_BLOCKS * TK_GCM_NONCE_SIZE];
    uint8_t *nonce_heap = NULL;
    uint64_t nblocks;
    size_t out_len;
    int rc;

    if (g->live != TK_GCM_LIVE)
        return TK_ERR_WIPED;
    if (aad_len > TK_GCM_MAX_AAD_PREFIX)
        return TK_ERR_ARG;
    rc = tk_gcm_encrypt_size(pt_len, g->block_size, &nblocks, &out_len);
    if (rc != TK_OK)
        return rc;
    if (nblocks == 0)
        return TK_OK;
    if (nblocks - 1 > UINT64_MAX - first_block)
        return TK_ERR_ARG;
    if (aad_len)
        memcpy(aad, aad_prefix, aad_len);
    store_le32(aad + aad_len + 8, g->version); /* read only by v2 handles (aad_tail 12) */

    if (nonces == NULL) {
        uint8_t *buf = nonce_stack;
        if (nblocks > TK_NONCE_STACK_BLOCKS) {
            nonce_heap = malloc((size_t)nblocks * TK_GCM_NONCE_SIZE);
            if (nonce_heap == NULL)
                return TK_ERR_NOMEM;
            buf = nonce_heap;
        }
        rc = draw_nonces(buf, nblocks);
        if (rc != TK_OK) {
            free(nonce_heap);
            return rc;
        }
        nonces = buf;
    }

    if (g->engine == TK_ENGINE_IPSECMB)
        rc = imb_encrypt(g, pt, pt_len, out, aad, aad_len, first_block, nonces, nblocks);
    else
        rc = ossl_encrypt(g, pt, pt_len, out, aad, aad_len, first_block, nonces, nblocks);
    free(nonce_heap); /* nonces are public: no wipe needed */
    tk_secmem_zero_registers(); /* round keys must not be spilled to the stack later */
    if (rc != TK_OK)
        memset(out, 0, out_len);
    return rc;
}

int tk_gcm_decrypt(tk_gcm *g, const uint8_t *ct, size_t ct_len, uint8_t *out,
                   const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                   int holes, size_t *written, uint64_t *bad_block)
{
    uint8_t aad[TK_GCM_MAX_AAD_PREFIX + 12];
    uint64_t nblocks, short_block = 0;
    size_t pt_total;
    int rc;

    *written = 0;
    if (g->live != TK_GCM_LIVE)
        return TK_ERR_WIPED;
    if (aad_len > TK_GCM_MAX_AAD_PREFIX)
        return TK_ERR_ARG;
    rc = tk_gcm_decrypt_size(ct_len, g->block_size, &nblocks, &pt_total, &short_block);
    if (rc == TK_ERR_SHORT_BLOCK) {
        *bad_block = short_block;
        return rc;
    }
    if (rc != TK_OK)
        return rc;
    if (nblocks == 0)
        return TK_OK;
    if (nblocks - 1 > UINT64_MAX - first_block)
        return TK_ERR_ARG;
    if (aad_len)
        memcpy(aad, aad_prefix, aad_len);
    store_le32(aad + aad_len + 8, g->version); /* read only by v2 handles (aad_tail 12) */

    if (g->engine == TK_ENGINE_IPSECMB)
        rc = imb_decrypt(g, ct, ct_len, out, aad, aad_len, first_block, holes != 0,
                         nblocks, pt_total, bad_block);
    else
        rc = ossl_decrypt(g, ct, ct_len, out, aad, aad_len, first_block, holes != 0,
                          nblocks, pt_total, bad_block);
    tk_secmem_zero_registers();
    if (rc == TK_OK)
        *written = pt_total;
    return rc;
}
