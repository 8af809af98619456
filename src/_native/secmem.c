/*
 * secmem.c -- secure memory for key material.  See secmem.h.
 *
 * A chunk is CHUNK bytes (16 pages) aligned to CHUNK, so a slot's chunk is found by
 * masking its address.  Page 0 holds struct chunk and its slot bitmap; it is neither
 * locked nor wiped on fork (a child must still be able to free what it inherited).
 */
#define _GNU_SOURCE 1

#include "secmem.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ASan does not know mmap()ed slots: tell it which bytes are allocated, so an overrun
 * of a key schedule into the next slot is still reported in the sanitized build. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define CHUNK_PAGES 16
#define MAGIC 0x4d454d4345534b54ULL /* "TKSECMEM" */
#define NCLASS 8
#define LARGE NCLASS

/* 1280: one AES-GCM handle (aesgcm_impl.c) with its 1008-byte ipsec-mb key data. */
static const uint32_t class_size[NCLASS] = {64, 128, 256, 512, 1024, 1280, 2048, 4096};

struct chunk {
    uint64_t magic;
    uint32_t cls;                         /* size class, LARGE: a region of its own */
    uint32_t slot;                        /* slot size (LARGE: the whole data area) */
    uint32_t nslots, nfree;
    size_t len;                           /* the whole mapping, page 0 included */
    int locked;
    struct chunk *next_free, *prev_free;  /* chunks of cls with a free slot */
    struct chunk *next_all, *prev_all;
    uint64_t used[];                      /* slot bitmap, fits in page 0 */
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static size_t g_page, g_chunk;
static struct chunk *g_free[NCLASS];      /* per class: chunks with a free slot */
static unsigned g_empty[NCLASS];          /* per class: fully free chunks kept (<= 1) */
static struct chunk *g_all;
static tk_secmem_stats g_st;

static void atfork_prepare(void) { pthread_mutex_lock(&g_mu); }
static void atfork_release(void) { pthread_mutex_unlock(&g_mu); }

static void init_once(void)
{
    long ps = sysconf(_SC_PAGESIZE);
    g_page = ps > 0 ? (size_t)ps : 4096;
    g_chunk = g_page * CHUNK_PAGES;
    (void)pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

static inline unsigned char *data_of(struct chunk *c) { return (unsigned char *)c + g_page; }

/* Map len bytes aligned to g_chunk and protect everything past page 0. */
static struct chunk *map_chunk(size_t len)
{
    size_t span = len + g_chunk;
    unsigned char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    uintptr_t base = ((uintptr_t)raw + g_chunk - 1) & ~(uintptr_t)(g_chunk - 1);
    size_t head = base - (uintptr_t)raw, tail = span - head - len;
    if (head)
        munmap(raw, head);
    if (tail)
        munmap((unsigned char *)base + len, tail);
    struct chunk *c = (struct chunk *)base;
    unsigned char *d = (unsigned char *)base + g_page;
    size_t dlen = len - g_page;
    int advised = madvise(d, dlen, MADV_DONTDUMP) == 0;
#ifdef MADV_WIPEONFORK
    advised &= madvise(d, dlen, MADV_WIPEONFORK) == 0;
#else
    advised = 0;
#endif
    c->locked = mlock(d, dlen) == 0;
    POISON(d, dlen);
    c->len = len;
    c->magic = MAGIC;
    g_st.chunks++;
    g_st.bytes_mapped += dlen;
    if (c->locked)
        g_st.bytes_locked += dlen;
    else
        g_st.lock_failures++;
    if (!advised)
        g_st.advise_failures++;
    c->next_all = g_all;
    if (g_all)
        g_all->prev_all = c;
    g_all = c;
    return c;
}

static void unmap_chunk(struct chunk *c)
{
    size_t dlen = c->len - g_page;
    if (c->prev_all)
        c->prev_all->next_all = c->next_all;
    else
        g_all = c->next_all;
    if (c->next_all)
        c->next_all->prev_all = c->prev_all;
    g_st.chunks--;
    g_st.bytes_mapped -= dlen;
    if (c->locked)
        g_st.bytes_locked -= dlen;
    c->magic = 0;
    UNPOISON(data_of(c), dlen);
    munmap(c, c->len); /* the slots are already zero; munmap also unlocks */
}

static void free_list_push(struct chunk *c)
{
    c->prev_free = NULL;
    c->next_free = g_free[c->cls];
    if (c->next_free)
        c->next_free->prev_free = c;
    g_free[c->cls] = c;
}

static void free_list_drop(struct chunk *c)
{
    if (c->prev_free)
        c->prev_free->next_free = c->next_free;
    else
        g_free[c->cls] = c->next_free;
    if (c->next_free)
        c->next_free->prev_free = c->prev_free;
    c->next_free = c->prev_free = NULL;
}

static void *alloc_large(size_t n)
{
    size_t dlen = (n + g_page - 1) / g_page * g_page;
    struct chunk *c = map_chunk(dlen + g_page);
    if (c == NULL)
        return NULL;
    c->cls = LARGE;
    c->slot = (uint32_t)dlen;
    c->nslots = 1;
    c->nfree = 0;
    c->used[0] = 1;
    return data_of(c);
}

static void *alloc_small(unsigned cls)
{
    struct chunk *c = g_free[cls];
    if (c == NULL) {
        c = map_chunk(g_chunk);
        if (c == NULL)
            return NULL;
        c->cls = cls;
        c->slot = class_size[cls];
        c->nslots = c->nfree = (uint32_t)((g_chunk - g_page) / c->slot);
        free_list_push(c);
        g_empty[cls]++;
    }
    if (c->nfree == c->nslots)
        g_empty[cls]--;
    for (uint32_t w = 0;; w++) {
        uint64_t freebits = ~c->used[w];
        if (w == c->nslots / 64 && c->nslots % 64)
            freebits &= ((uint64_t)1 << (c->nslots % 64)) - 1;
        if (freebits == 0)
            continue; /* nfree > 0: some word below nslots has a free bit */
        uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(freebits);
        c->used[w] |= (uint64_t)1 << (i % 64);
        if (--c->nfree == 0)
            free_list_drop(c);
        return data_of(c) + (size_t)i * c->slot;
    }
}

void *tk_secmem_alloc(size_t n)
{
    if (n == 0 || n > ((size_t)1 << 30)) /* key material; keeps slot sizes in 32 bits */
        return NULL;
    pthread_once(&g_once, init_once);
    unsigned cls = 0;
    while (cls < NCLASS && class_size[cls] < n)
        cls++;
    pthread_mutex_lock(&g_mu);
    void *p = cls == LARGE ? alloc_large(n) : alloc_small(cls);
    if (p != NULL) {
        g_st.in_use++;
        UNPOISON(p, n);
    }
    pthread_mutex_unlock(&g_mu);
    return p; /* zero: fresh pages, or wiped by the last free */
}

void tk_secmem_free(void *p)
{
    if (p == NULL)
        return;
    struct chunk *c = (struct chunk *)((uintptr_t)p & ~(uintptr_t)(g_chunk - 1));
    pthread_mutex_lock(&g_mu);
    size_t off = (size_t)((unsigned char *)p - data_of(c));
    uint32_t i = c->magic == MAGIC ? (uint32_t)(off / c->slot) : 0;
    if (c->magic != MAGIC || (unsigned char *)p < data_of(c) || off % c->slot != 0 ||
        i >= c->nslots || !(c->used[i / 64] & ((uint64_t)1 << (i % 64))))
        abort(); /* not ours, or freed twice: a memory-safety bug, never go on */
    UNPOISON(p, c->slot);
    explicit_bzero(p, c->slot);
    POISON(p, c->slot);
    c->used[i / 64] &= ~((uint64_t)1 << (i % 64));
    g_st.in_use--;
    if (c->cls == LARGE) {
        unmap_chunk(c);
    } else {
        if (c->nfree++ == 0)
            free_list_push(c);
        if (c->nfree == c->nslots) {
            if (g_empty[c->cls] > 0) { /* keep one empty chunk per class, no more */
                free_list_drop(c);
                unmap_chunk(c);
            } else {
                g_empty[c->cls]++;
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
}

void tk_secmem_get_stats(tk_secmem_stats *s)
{
    pthread_mutex_lock(&g_mu);
    *s = g_st;
    pthread_mutex_unlock(&g_mu);
}

/* Byte copy that ASan does not check: the test hook reads freed (poisoned) slots. */
#if defined(__SANITIZE_ADDRESS__)
__attribute__((no_sanitize_address))
#endif
static void raw_copy(unsigned char *dst, const volatile unsigned char *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i];
}

int tk_secmem_peek(const void *p, size_t n, void *out)
{
    int found = 0;
    uintptr_t a = (uintptr_t)p;
    pthread_mutex_lock(&g_mu);
    for (struct chunk *c = g_all; c && !found; c = c->next_all) {
        uintptr_t lo = (uintptr_t)data_of(c), hi = (uintptr_t)c + c->len;
        found = a >= lo && a <= hi && n <= hi - a;
    }
    if (found)
        raw_copy(out, p, n);
    pthread_mutex_unlock(&g_mu);
    return found;
}

/*
 * Vector registers: AES code leaves round keys in them, and the next code that saves
 * them to the stack (the dynamic linker resolving a symbol with XSAVE, a function
 * spilling them) writes the schedule back into memory after any scrub.  All of them
 * are caller-saved in the SysV ABI, so zeroing them here disturbs no caller.
 */
#if defined(__x86_64__)
__attribute__((target("avx"), noinline)) static void zero_ymm(void)
{
    __asm__ volatile("vzeroall" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                     "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                     "xmm15");
}

__attribute__((target("avx512f"), noinline)) static void zero_zmm_high(void)
{
#define Z(n) "vpxord %%zmm" #n ", %%zmm" #n ", %%zmm" #n "\n\t"
    __asm__ volatile(Z(16) Z(17) Z(18) Z(19) Z(20) Z(21) Z(22) Z(23)
                     Z(24) Z(25) Z(26) Z(27) Z(28) Z(29) Z(30) Z(31)
                     ::: "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
                     "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30",
                     "xmm31");
#undef Z
}

__attribute__((noinline)) static void zero_xmm(void)
{
#define X(n) "pxor %%xmm" #n ", %%xmm" #n "\n\t"
    __asm__ volatile(X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)
                     X(13) X(14) X(15)
                     ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
                     "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#undef X
}

void tk_secmem_zero_registers(void)
{
    static int vec = -1; /* 1: AVX, 2: AVX-512F; a benign race, every thread agrees */
    int v = __atomic_load_n(&vec, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = (__builtin_cpu_supports("avx") ? 1 : 0) | (__builtin_cpu_supports("avx512f") ? 2 : 0);
        __atomic_store_n(&vec, v, __ATOMIC_RELAXED);
    }
    if (v & 1)
        zero_ymm();
    else
        zero_xmm();
    if (v & 2)
        zero_zmm_high();
}
#else
void tk_secmem_zero_registers(void) {}
#endif

#define SCRUB_BYTES (64 * 1024)

__attribute__((noinline)) void tk_secmem_scrub_stack(void)
{
    unsigned char area[SCRUB_BYTES];
    tk_secmem_zero_registers();
    explicit_bzero(area, sizeof area);
    __asm__ volatile("" : : "r"(area) : "memory"); /* keep the frame as large */
}
