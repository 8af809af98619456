/*
 * aesgcm_impl.h -- Takakrypt AES-256-GCM block batch core (no Python).
 *
 * A plaintext of length L is cut into ceil(L / block_size) blocks (the last one may
 * be partial).  Block i is stored as
 *
 *     nonce (12) || ciphertext (n_i) || tag (16)
 *
 * with AAD = aad_prefix || uint64_le(first_block + i) (TAKA v1; v2 below, at
 * tk_gcm_new_versioned).  Stored blocks are laid out back to back, so stored block i
 * starts at i * (block_size + 28) in both.
 *
 * Two engines sit behind one opaque handle:
 *   TK_ENGINE_IPSECMB  intel-ipsec-mb direct GCM API (fast default)
 *   TK_ENGINE_OPENSSL  OpenSSL EVP (reference path / fallback)
 *
 * Key memory: the handle and the ipsec-mb key schedule live in secure memory
 * (secmem.h): locked, excluded from core dumps, zeroed in a fork()ed child (where
 * the handle then fails with TK_ERR_WIPED) and wiped by tk_gcm_free.
 *
 * Thread safety: a tk_gcm handle may be used by any number of threads at once for
 * tk_gcm_encrypt / tk_gcm_decrypt.  tk_gcm_free must not race with them (the caller
 * keeps an in-flight count; see aesgcm.pyx).
 */
#ifndef TAKAKRYPT_AESGCM_IMPL_H
#define TAKAKRYPT_AESGCM_IMPL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TK_GCM_KEY_SIZE        32
#define TK_GCM_NONCE_SIZE      12
#define TK_GCM_TAG_SIZE        16
#define TK_GCM_TAG_SIZE_V2     12     /* TAKA v2: 96-bit tag, then a u32 key version */
#define TK_GCM_OVERHEAD        (TK_GCM_NONCE_SIZE + TK_GCM_TAG_SIZE)
#define TK_GCM_MAX_AAD_PREFIX  256
#define TK_GCM_MIN_BLOCK       512
#define TK_GCM_MAX_BLOCK       (1u << 20)

typedef enum {
    TK_ENGINE_IPSECMB = 1,
    TK_ENGINE_OPENSSL = 2
} tk_engine;

/* Status codes (0 = success, negative = error). */
enum {
    TK_OK              = 0,
    TK_ERR_NOMEM       = -1,  /* allocation failed */
    TK_ERR_ENGINE      = -2,  /* engine unknown or not usable on this machine */
    TK_ERR_RANDOM      = -3,  /* getrandom(2) failed */
    TK_ERR_AUTH        = -4,  /* a block failed authentication */
    TK_ERR_SHORT_BLOCK = -5,  /* a stored block is shorter than 29 bytes */
    TK_ERR_CRYPTO      = -6,  /* the crypto library reported an internal error */
    TK_ERR_ARG         = -7,  /* bad argument (block size, aad length, size overflow) */
    TK_ERR_WIPED       = -8,  /* the handle was inherited across fork(): its key
                               * schedule is zero there (secmem.h); make a new one */
    TK_ERR_VERSION     = -9   /* v2: a stored block names another key version than the
                               * handle's (*bad_block says which): decrypt it with that
                               * version's handle */
};

typedef struct tk_gcm tk_gcm;

/* Human-readable text for a status code (static string, never NULL). */
const char *tk_gcm_strerror(int status);

/* 1 if the engine can be used in this process, else 0. */
int tk_gcm_engine_available(tk_engine engine);

/* Name of an engine ("ipsecmb" / "openssl"), "?" if unknown. */
const char *tk_gcm_engine_name(tk_engine engine);

/* 1 if block_size is a power of two in [TK_GCM_MIN_BLOCK, TK_GCM_MAX_BLOCK]. */
int tk_gcm_block_size_ok(size_t block_size);

/*
 * Expand a 32-byte key for `engine`.  The key bytes themselves are not retained, only
 * the engine's key schedule.  Returns NULL and sets *status on failure.
 */
tk_gcm *tk_gcm_new(const uint8_t key[TK_GCM_KEY_SIZE], size_t block_size,
                   tk_engine engine, int *status);

/*
 * The same for TAKA v2 blocks of key version `block_version` (>= 1):
 *
 *     nonce (12) || ciphertext (n_i) || tag (12) || uint32_le(block_version)
 *
 * with AAD = aad_prefix || uint64_le(first_block + i) || uint32_le(block_version).
 * The stride is unchanged (28 bytes per block).  block_version 0 is tk_gcm_new (v1).
 * Decrypting a block whose stored version differs from the handle's stops there with
 * TK_ERR_VERSION: blocks before it are decrypted; out from that block on is left as it
 * was (unlike TK_ERR_AUTH, nothing there was written).
 */
tk_gcm *tk_gcm_new_versioned(const uint8_t key[TK_GCM_KEY_SIZE], size_t block_size,
                             tk_engine engine, uint32_t block_version, int *status);

/* The handle's block version: 0 for v1 blocks. */
uint32_t tk_gcm_block_version(const tk_gcm *g);

/* Wipe the key schedule and free the handle.  NULL is accepted. */
void tk_gcm_free(tk_gcm *g);

/* Benchmarks only: 0 makes later tk_gcm_new calls use the plain heap (the cost of
 * secure memory measured in one run); 1 (the default) restores secure memory. */
void tk_gcm_set_secure_memory(int on);

/* Test hook: the address and size of the ipsec-mb key schedule inside the handle
 * (NULL, *len = 0 for the OpenSSL engine, whose schedule OpenSSL allocates). */
const void *tk_gcm_key_area(const tk_gcm *g, size_t *len);

tk_engine tk_gcm_engine(const tk_gcm *g);
size_t tk_gcm_block_size(const tk_gcm *g);

/*
 * Size helpers (no handle needed).  Return TK_OK or TK_ERR_ARG (overflow) /
 * TK_ERR_SHORT_BLOCK (decrypt: *short_block receives the relative index of the
 * offending stored block).
 */
int tk_gcm_encrypt_size(size_t pt_len, size_t block_size,
                        uint64_t *nblocks, size_t *out_len);
int tk_gcm_decrypt_size(size_t ct_len, size_t block_size,
                        uint64_t *nblocks, size_t *out_len, uint64_t *short_block);

/*
 * Encrypt pt[0..pt_len) into out (which must hold tk_gcm_encrypt_size() bytes).
 * nonces: NULL -> fresh random nonces, one getrandom(2) call for the whole batch
 * (an all-zero nonce is redrawn); otherwise nblocks * 12 bytes.
 * The caller guarantees: aad_len <= 256, first_block + nblocks - 1 does not wrap,
 * and out does not overlap pt / aad_prefix / nonces.
 * Does not touch any interpreter state: may run without the GIL.
 */
int tk_gcm_encrypt(tk_gcm *g, const uint8_t *pt, size_t pt_len, uint8_t *out,
                   const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                   const uint8_t *nonces);

/*
 * Decrypt ct[0..ct_len) into out (which must hold the tk_gcm_decrypt_size() bytes).
 * On success *written = plaintext bytes.  On TK_ERR_AUTH (and TK_ERR_VERSION),
 * *bad_block = relative index
 * of the first failing block, blocks before it are decrypted in out and out is zeroed
 * from the failing block's offset to the end of the plaintext region.
 * holes != 0: an all-zero stored block decrypts to zeros without a tag check.
 */
int tk_gcm_decrypt(tk_gcm *g, const uint8_t *ct, size_t ct_len, uint8_t *out,
                   const uint8_t *aad_prefix, size_t aad_len, uint64_t first_block,
                   int holes, size_t *written, uint64_t *bad_block);

#ifdef __cplusplus
}
#endif

#endif /* TAKAKRYPT_AESGCM_IMPL_H */
