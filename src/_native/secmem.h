/*
 * secmem.h -- Takakrypt secure memory for key material (no Python).
 *
 * Allocations come from 64 KiB chunks of anonymous memory, each aligned to its own
 * size.  Page 0 of a chunk holds the allocator's bookkeeping (nothing secret); the
 * other 15 pages hold the slots and are
 *
 *   mlock(2)ed                  never written to swap (fails soft: see below),
 *   madvise(MADV_DONTDUMP)      left out of core dumps,
 *   madvise(MADV_WIPEONFORK)    zero in a fork()ed child (kernel >= 4.14),
 *
 * and every slot is zeroed (explicit_bzero) when it is freed.  Small requests share
 * a chunk (size classes 64 .. 4096 bytes); larger ones get a region of their own.
 *
 * mlock fails soft: when RLIMIT_MEMLOCK refuses (an unprivileged user over the
 * limit; root has CAP_IPC_LOCK and is never refused) the chunk is still used, with
 * the dump and fork protection, and tk_secmem_stats counts it in lock_failures.
 * Refusing would make the CLI unusable for an ordinary user with the default 8 MiB
 * limit, while the agent runs as root and always gets its pages locked.
 *
 * After fork() a child sees every slot zeroed while its bookkeeping still says
 * "in use": callers that keep a handle across fork must detect the wipe (aesgcm_impl.c
 * keeps a non-zero canary in its handle) and may still free the slot.
 *
 * Thread safety: every function may be called from any thread; one mutex, held
 * across fork() (pthread_atfork) so a child never inherits it locked.
 */
#ifndef TAKAKRYPT_SECMEM_H
#define TAKAKRYPT_SECMEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* n bytes (1 <= n <= 1 GiB), zeroed, 64-byte aligned; NULL otherwise or without memory. */
void *tk_secmem_alloc(size_t n);

/* Zero and release; NULL is accepted.  p must come from tk_secmem_alloc. */
void tk_secmem_free(void *p);

/* Zero the vector registers (xmm/ymm/zmm): AES code leaves round keys in them, and
 * whatever saves them next (the dynamic linker's XSAVE, a spill) writes them to the
 * stack.  A few cycles; all are caller-saved, so no caller is disturbed. */
void tk_secmem_zero_registers(void);

/* Zero the vector registers, then 64 KiB of the calling thread's stack below this
 * call: the residue that a library just called at the same depth (a KDF, an AEAD
 * set-up) left there. */
void tk_secmem_scrub_stack(void);

typedef struct {
    uint64_t chunks;          /* mapped chunks and large regions */
    uint64_t bytes_mapped;    /* slot pages mapped (bookkeeping pages excluded) */
    uint64_t bytes_locked;    /* of those, locked with mlock */
    uint64_t lock_failures;   /* chunks whose mlock was refused (still used) */
    uint64_t advise_failures; /* chunks without DONTDUMP or WIPEONFORK */
    uint64_t in_use;          /* live allocations */
} tk_secmem_stats;

void tk_secmem_get_stats(tk_secmem_stats *s);

/* Test hook: copy [p, p + n) to out and return 1 if it lies inside the slot pages of
 * a chunk mapped right now, else return 0 (lets a test read a freed slot back without
 * touching unmapped memory, and without an ASan report in the sanitized build). */
int tk_secmem_peek(const void *p, size_t n, void *out);

#ifdef __cplusplus
}
#endif

#endif /* TAKAKRYPT_SECMEM_H */
