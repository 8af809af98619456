/*
 * hotpaths.c -- the native hot paths of the performance gate, one per run, for
 * callgrind (benchmarks/perf/collect.py builds and runs it; docs/performance.md,
 * "Performance gate").
 *
 *   hotpaths SIGNAL REPS
 *
 * SIGNAL is one of the names in main() below.  Everything the signal needs is set up
 * and the operation is run once to warm up (lazy initialisation, the nonce pool) before
 * perf_measure() runs it REPS times: callgrind counts only inside perf_measure()
 * (--toggle-collect), so set-up and process start-up are not in the figure.
 *
 * The sources under test are compiled into this program from the tree being measured
 * (collect.py compiles the .c files of src/_native it needs), so a change there changes the counts.
 *
 * ipsec-mb: aesgcm_impl.c picks the code path for the CPU (init_mb_mgr_auto); here it
 * is forced to the AVX2 path, which valgrind emulates, so every host with AVX2 runs
 * the same instructions (the renaming below leaves aesgcm_impl.c itself unchanged).
 */
#define _GNU_SOURCE 1
#include <intel-ipsec-mb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void perf_init_mgr(IMB_MGR *m, IMB_ARCH *arch)
{
    init_mb_mgr_avx2(m);
    *arch = imb_get_errno(m) == 0 ? IMB_ARCH_AVX2 : IMB_ARCH_NONE;
}
#define init_mb_mgr_auto perf_init_mgr
#include "aesgcm_impl.c"
#undef init_mb_mgr_auto

#include "cache_impl.h"
#include "ring_impl.h"

#define NBLOCKS 64
#define BS 4096

static tk_gcm *g_gcm;
static uint8_t *g_pt, *g_ct, *g_out;
static tk_cache *g_cache;
static tk_ring *g_ring;
static uint8_t g_msg[256], g_reply[256];

static void die(const char *what, int rc)
{
    fprintf(stderr, "hotpaths: %s failed (%d)\n", what, rc);
    exit(1);
}

/* ---- AES-GCM: one batch of 64 x 4 KiB, random nonces (the production path) ---- */

static const uint8_t AAD[] = "takakrypt/perf aad prefix";

static int op_encrypt(void)
{
    return tk_gcm_encrypt(g_gcm, g_pt, NBLOCKS * BS, g_ct, AAD, sizeof AAD - 1, 7, NULL);
}

static int op_decrypt(void)
{
    size_t w;
    uint64_t bad;
    return tk_gcm_decrypt(g_gcm, g_ct, (size_t)NBLOCKS * (BS + TK_GCM_OVERHEAD), g_out,
                          AAD, sizeof AAD - 1, 7, 0, &w, &bad);
}

static void setup_gcm(tk_engine engine)
{
    uint8_t key[TK_GCM_KEY_SIZE];
    int st = 0;
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    if (!tk_gcm_engine_available(engine))
        die(engine == TK_ENGINE_IPSECMB ? "ipsec-mb AVX2 path (needs AVX2)" : "openssl", 0);
    g_gcm = tk_gcm_new(key, BS, engine, &st);
    if (g_gcm == NULL)
        die("tk_gcm_new", st);
    g_pt = malloc(NBLOCKS * BS);
    g_ct = malloc(NBLOCKS * (BS + TK_GCM_OVERHEAD));
    g_out = malloc(NBLOCKS * BS);
    if (!g_pt || !g_ct || !g_out)
        die("malloc", 0);
    for (size_t i = 0; i < NBLOCKS * BS; i++)
        g_pt[i] = (uint8_t)(i * 31 + (i >> 12));
    int rc = op_encrypt();
    if (rc != TK_OK)
        die("tk_gcm_encrypt", rc);
}

/* ---- decision cache: a hit, and a miss (a key never inserted) ---- */

static const char HIT_PATH[] = "base/16384/1259";
static const char MISS_PATH[] = "base/16384/2619";

static tk_cache_key cache_key(const char *path)
{
    tk_cache_key k = {999, 60000, 4242, 123456, 2049, 77, 0, (const uint8_t *)path,
                      strlen(path)};
    return k;
}

static int op_cache_hit(void)
{
    tk_cache_key k = cache_key(HIT_PATH);
    tk_cache_value v;
    return tk_cache_lookup(g_cache, &k, &v) == TK_CACHE_HIT ? 0 : -1;
}

static int op_cache_miss(void)
{
    tk_cache_key k = cache_key(MISS_PATH);
    tk_cache_value v;
    return tk_cache_lookup(g_cache, &k, &v) == TK_CACHE_MISS ? 0 : -1;
}

static void setup_cache(void)
{
    int st = 0;
    g_cache = tk_cache_new(65536, 3600ull * 1000000000ull, &st);
    if (g_cache == NULL)
        die("tk_cache_new", st);
    /* a few hundred other entries, so probing is not into an empty table */
    char p[64];
    for (int i = 0; i < 500; i++) {
        snprintf(p, sizeof p, "base/16384/%d", 20000 + i);
        tk_cache_key k = cache_key(p);
        tk_cache_value v = {5, 19, 0, 0};
        tk_cache_insert(g_cache, &k, &v, 3600ull * 1000000000ull, tk_cache_generation(g_cache));
    }
    tk_cache_key k = cache_key(HIT_PATH);
    tk_cache_value v = {5, 19, 0, 0};
    if (tk_cache_insert(g_cache, &k, &v, 3600ull * 1000000000ull,
                        tk_cache_generation(g_cache)) != TK_CACHE_STORED)
        die("tk_cache_insert", 0);
}

/* ---- request ring: submit, drain (the consumer replies), collect; one thread ---- */

static int echo(void *ctx, uint64_t ticket, const void *msg, size_t len)
{
    (void)ctx;
    return tk_ring_reply(g_ring, ticket, msg, len) != 0;
}

static int op_ring(void)
{
    uint64_t t;
    size_t len;
    int armed;
    int rc = tk_ring_submit(g_ring, g_msg, sizeof g_msg, &t);
    if (rc != 0)
        return rc;
    tk_ring_ack(g_ring);
    if (tk_ring_drain(g_ring, echo, NULL, 16, &armed) != 1)
        return -1;
    rc = tk_ring_wait_reply(g_ring, t, g_reply, sizeof g_reply, &len, 0);
    return rc != 0 ? rc : (len == sizeof g_msg ? 0 : -1);
}

static void setup_ring(void)
{
    int err = 0;
    g_ring = tk_ring_new(256, 512, 256, &err);
    if (g_ring == NULL)
        die("tk_ring_new", err);
    for (size_t i = 0; i < sizeof g_msg; i++)
        g_msg[i] = (uint8_t)i;
}

/* ---- the measured region ---- */

__attribute__((noinline)) int perf_measure(int (*op)(void), long reps)
{
    int rc = 0;
    for (long i = 0; i < reps && rc == 0; i++)
        rc = op();
    return rc;
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*op)(void);
        int what; /* 1 ipsec-mb, 2 openssl, 3 cache, 4 ring */
    } SIGNALS[] = {
        {"encrypt_ipsecmb", op_encrypt, 1}, {"decrypt_ipsecmb", op_decrypt, 1},
        {"encrypt_openssl", op_encrypt, 2}, {"decrypt_openssl", op_decrypt, 2},
        {"cache_hit", op_cache_hit, 3},     {"cache_miss", op_cache_miss, 3},
        {"ring_round_trip", op_ring, 4},
    };
    if (argc != 3) {
        fprintf(stderr, "usage: hotpaths SIGNAL REPS\n");
        return 2;
    }
    long reps = strtol(argv[2], NULL, 10);
    for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++) {
        if (strcmp(argv[1], SIGNALS[i].name) != 0)
            continue;
        switch (SIGNALS[i].what) {
        case 1: setup_gcm(TK_ENGINE_IPSECMB); break;
        case 2: setup_gcm(TK_ENGINE_OPENSSL); break;
        case 3: setup_cache(); break;
        default: setup_ring(); break;
        }
        int rc = SIGNALS[i].op(); /* warm-up */
        if (rc == 0)
            rc = perf_measure(SIGNALS[i].op, reps);
        if (rc != 0)
            die(argv[1], rc);
        return 0;
    }
    fprintf(stderr, "hotpaths: unknown signal %s\n", argv[1]);
    return 2;
}
