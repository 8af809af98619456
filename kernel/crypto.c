// SPDX-License-Identifier: GPL-2.0
/*
 * crypto.c - TAKA v1 header and block cryptography on the kernel crypto API:
 * HKDF-SHA256 per-file keys and the header tag on "hmac(sha256)", blocks on "gcm(aes)".
 * docs/file-format.md is the specification; tests/vectors/taka_v1.json its vectors.
 */
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/scatterlist.h>
#include <linux/highmem.h>
#include <linux/random.h>
#include <linux/string.h>
#include <linux/ctype.h>
#include <linux/mutex.h>
#include <crypto/algapi.h>
#include <crypto/aead.h>
#include <crypto/hash.h>
#include <asm/unaligned.h>

#include "tkfs.h"

static const char hkdf_info[] = "takakrypt/v1 file keys";

static bool keyid_char_ok(u8 c, bool first)
{
	if (isalnum(c) || c == '_')
		return true;
	return !first && (c == '.' || c == '-');
}

/* parse and check everything but the tag (which needs the file's mac key) */
int tkfs_hdr_parse(struct taka_header *h, const u8 *raw)
{
	u32 bs, klen, i;

	memcpy(h->raw, raw, TAKA_HDR_SIZE);
	if (memcmp(raw, "TAKA", 4) || raw[4] != 1 || raw[5] != TAKAKRYPT_ALG_AES_256_GCM)
		return -EBADMSG;
	if (get_unaligned_le16(raw + 6))
		return -EBADMSG;
	bs = get_unaligned_le32(raw + 8);
	if (bs < 512 || bs > (1u << 20) || (bs & (bs - 1)))
		return -EBADMSG;
	if (bs != TKFS_BS)
		return -EOPNOTSUPP;	/* valid TAKA, block size this engine does not serve */
	h->key_version = get_unaligned_le32(raw + 12);
	if (!h->key_version)
		return -EBADMSG;
	memcpy(h->file_id, raw + 16, 16);
	klen = raw[32];
	if (klen < 1 || klen > TAKA_KEYID_MAX)
		return -EBADMSG;
	for (i = 0; i < TAKA_KEYID_MAX; i++) {
		u8 c = raw[33 + i];

		if (i < klen ? !keyid_char_ok(c, i == 0) : c != 0)
			return -EBADMSG;
	}
	memcpy(h->key_id, raw + 33, klen);
	h->key_id[klen] = 0;
	h->size = get_unaligned_le64(raw + 96);
	if (h->size > (u64)S64_MAX)
		return -EBADMSG;
	h->encryptions = get_unaligned_le64(raw + 104);
	return 0;
}

/*
 * One hmac(sha256) transform for the module: HKDF and header tags are rare next to block
 * operations (at lookup, at header writes), so they share it under a mutex instead of a
 * transform per inode.
 */
static struct crypto_shash *tkfs_hmac;
static DEFINE_MUTEX(tkfs_hmac_lock);

/* HMAC-SHA256(key set last, a | b) with the shared transform; tkfs_hmac_lock held */
static int hmac_digest(const u8 *a, unsigned int alen, const u8 *b, unsigned int blen, u8 *out)
{
	SHASH_DESC_ON_STACK(desc, tkfs_hmac);
	int err;

	lockdep_assert_held(&tkfs_hmac_lock);
	desc->tfm = tkfs_hmac;
	err = crypto_shash_init(desc);
	if (!err && alen)
		err = crypto_shash_update(desc, a, alen);
	if (!err && blen)
		err = crypto_shash_update(desc, b, blen);
	if (!err)
		err = crypto_shash_final(desc, out);
	shash_desc_zero(desc);
	return err;
}

/* HMAC-SHA256(key, a | b) with the shared transform; tkfs_hmac_lock held */
static int hmac_sha256(const u8 *key, unsigned int klen, const u8 *a, unsigned int alen,
		       const u8 *b, unsigned int blen, u8 *out)
{
	int err;

	lockdep_assert_held(&tkfs_hmac_lock);
	err = crypto_shash_setkey(tkfs_hmac, key, klen);
	return err ? err : hmac_digest(a, alen, b, blen, out);
}

/* the header tag: first 16 bytes of HMAC-SHA256(mac_key, header[0..111]); lock held */
static int hdr_tag(struct tkfs_inode *ii, u8 *tag16)
{
	u8 full[32];
	int err = hmac_sha256(ii->mac_key, TAKA_KEY_LEN, ii->hdr.raw, TAKA_TAGGED_SIZE,
			      NULL, 0, full);

	memcpy(tag16, full, TAKA_TAG);
	memzero_explicit(full, sizeof(full));
	return err;
}

/*
 * HKDF-SHA256(IKM = data key, salt = file_id, info, L = 64): enc_key = okm[0:32],
 * mac_key = okm[32:64]; with verify, checks the header tag (-EBADMSG).  key_sem held for
 * writing.
 */
int tkfs_derive_keys(struct tkfs_inode *ii, const u8 *data_key, bool verify)
{
	u8 prk[32], okm[64], tag[TAKA_TAG], t[32 + sizeof(hkdf_info)], ctr = 1;
	const size_t ilen = sizeof(hkdf_info) - 1;
	int err;

	tkfs_drop_keys(ii);
	mutex_lock(&tkfs_hmac_lock);
	err = hmac_sha256(ii->hdr.file_id, 16, data_key, TAKA_KEY_LEN, NULL, 0, prk);
	/* both expand steps under the one PRK key */
	if (!err)
		err = hmac_sha256(prk, 32, hkdf_info, ilen, &ctr, 1, okm);
	if (!err) {
		memcpy(t, okm, 32);
		memcpy(t + 32, hkdf_info, ilen);
		t[32 + ilen] = 2;
		err = hmac_digest(t, 32 + ilen + 1, NULL, 0, okm + 32);
	}
	if (!err) {
		memcpy(ii->enc_key, okm, 32);
		memcpy(ii->mac_key, okm + 32, 32);
		if (verify) {
			err = hdr_tag(ii, tag);
			if (!err && crypto_memneq(tag, ii->hdr.raw + TAKA_TAGGED_SIZE, TAKA_TAG))
				err = -EBADMSG;
		}
	}
	mutex_unlock(&tkfs_hmac_lock);
	memzero_explicit(prk, sizeof(prk));
	memzero_explicit(okm, sizeof(okm));
	memzero_explicit(t, sizeof(t));
	memzero_explicit(tag, sizeof(tag));
	if (err)
		tkfs_drop_keys(ii);
	return err;
}

/*
 * gcm(aes) transforms are kept for reuse: making one (an algorithm lookup and three
 * allocations for the SIMD wrapper, its cryptd and the inner transform) cost more than
 * sealing a small file's block.  An idle transform is keyed with zeros first, which
 * overwrites the expanded key and hash key in its context; crypto_free_aead wipes it
 * too (kfree_sensitive) when the pool is full or the module goes.
 */
#define TKFS_AEAD_POOL	64
static DEFINE_SPINLOCK(tkfs_aead_pool_lock);
static struct crypto_aead *tkfs_aead_pool[TKFS_AEAD_POOL];
static unsigned int tkfs_aead_idle;

static struct crypto_aead *aead_get(void)
{
	struct crypto_aead *a = NULL;
	int err;

	spin_lock(&tkfs_aead_pool_lock);
	if (tkfs_aead_idle)
		a = tkfs_aead_pool[--tkfs_aead_idle];
	spin_unlock(&tkfs_aead_pool_lock);
	if (a)
		return a;
	a = crypto_alloc_aead("gcm(aes)", 0, 0);
	if (IS_ERR(a))
		return a;
	err = crypto_aead_setauthsize(a, TAKA_TAG);
	if (err) {
		crypto_free_aead(a);
		return ERR_PTR(err);
	}
	return a;
}

static void aead_put(struct crypto_aead *a)
{
	static const u8 zero[TAKA_KEY_LEN];

	if (!crypto_aead_setkey(a, zero, sizeof(zero))) {
		spin_lock(&tkfs_aead_pool_lock);
		if (tkfs_aead_idle < TKFS_AEAD_POOL) {
			tkfs_aead_pool[tkfs_aead_idle++] = a;
			a = NULL;
		}
		spin_unlock(&tkfs_aead_pool_lock);
	}
	if (a)
		crypto_free_aead(a);
}

void tkfs_drop_keys(struct tkfs_inode *ii)
{
	if (ii->aead)
		aead_put(ii->aead);
	ii->aead = NULL;
	memzero_explicit(ii->enc_key, sizeof(ii->enc_key));
	memzero_explicit(ii->mac_key, sizeof(ii->mac_key));
}

/* write size and encryptions into ii->hdr.raw and recompute the tag */
int tkfs_hdr_seal(struct tkfs_inode *ii, u64 size, u64 encryptions)
{
	u8 tag[TAKA_TAG];
	int err;

	put_unaligned_le64(size, ii->hdr.raw + 96);
	put_unaligned_le64(encryptions, ii->hdr.raw + 104);
	mutex_lock(&tkfs_hmac_lock);
	err = hdr_tag(ii, tag);
	mutex_unlock(&tkfs_hmac_lock);
	if (err)
		return err;
	memcpy(ii->hdr.raw + TAKA_TAGGED_SIZE, tag, TAKA_TAG);
	ii->hdr.size = size;
	ii->hdr.encryptions = encryptions;
	return 0;
}

/* the inode's gcm(aes), made at its first block operation (key_sem read-held) */
static struct crypto_aead *inode_aead(struct tkfs_inode *ii)
{
	struct crypto_aead *a = READ_ONCE(ii->aead);
	int err;

	if (a)
		return a;
	a = aead_get();
	if (IS_ERR(a))
		return a;
	err = crypto_aead_setkey(a, ii->enc_key, TAKA_KEY_LEN);
	if (err) {
		aead_put(a);
		return ERR_PTR(err);
	}
	if (cmpxchg(&ii->aead, NULL, a) != NULL) {
		aead_put(a);
		a = READ_ONCE(ii->aead);
	}
	return a;
}

/* the inode's gcm(aes), keyed now (key_sem read-held, header state OK) */
void tkfs_crypt_prepare(struct tkfs_inode *ii)
{
	inode_aead(ii);		/* a failure shows again at the first block operation */
}

/*
 * A run of block operations of one inode shares one request and one AAD buffer (the
 * static header, then the block index): readahead and write-back set them up once per
 * batch instead of once per block.  key_sem read-held from init to done.
 */
int tkfs_crypt_init(struct tkfs_inode *ii, struct tkfs_crypt *c)
{
	struct crypto_aead *tfm = inode_aead(ii);

	c->req = NULL;
	c->aad = NULL;
	if (IS_ERR(tfm))
		return PTR_ERR(tfm);
	c->aad = kmalloc(TAKA_AAD_LEN, GFP_NOFS);
	if (!c->aad)
		return -ENOMEM;
	c->req = aead_request_alloc(tfm, GFP_NOFS);
	if (!c->req) {
		kfree(c->aad);
		c->aad = NULL;
		return -ENOMEM;
	}
	memcpy(c->aad, ii->hdr.raw, TAKA_STATIC_SIZE);
	return 0;
}

void tkfs_crypt_done(struct tkfs_crypt *c)
{
	aead_request_free(c->req);	/* kfree_sensitive: the request context */
	kfree(c->aad);
	c->req = NULL;
	c->aad = NULL;
}

/*
 * One AEAD operation on a stored block laid out in buf as nonce | data (n) | tag, AAD =
 * static header | le64 index; in place, or (decryption only) into dst's first n bytes.
 * buf must be kmalloc memory (scatterlists).
 */
static int block_crypt(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n, bool enc,
		       struct page *dst)
{
	struct scatterlist sg[2], dsg[2];
	DECLARE_CRYPTO_WAIT(wait);
	u8 iv[TAKA_NONCE];

	put_unaligned_le64(index, c->aad + TAKA_STATIC_SIZE);
	memcpy(iv, buf, TAKA_NONCE);
	sg_init_table(sg, 2);
	sg_set_buf(&sg[0], c->aad, TAKA_AAD_LEN);
	sg_set_buf(&sg[1], buf + TAKA_NONCE, n + TAKA_TAG);
	if (dst) {
		sg_init_table(dsg, 2);
		sg_set_buf(&dsg[0], c->aad, TAKA_AAD_LEN);
		sg_set_page(&dsg[1], dst, n, 0);
	}
	aead_request_set_callback(c->req, CRYPTO_TFM_REQ_MAY_BACKLOG | CRYPTO_TFM_REQ_MAY_SLEEP,
				  crypto_req_done, &wait);
	aead_request_set_ad(c->req, TAKA_AAD_LEN);
	aead_request_set_crypt(c->req, sg, dst ? dsg : sg, enc ? n : n + TAKA_TAG, iv);
	return crypto_wait_req(enc ? crypto_aead_encrypt(c->req) : crypto_aead_decrypt(c->req),
			       &wait);
}

/* seal n plaintext bytes at buf + 12 in place; draws the nonce (never all zero) */
int tkfs_crypt_seal(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n)
{
	static const u8 zero[TAKA_NONCE];

	do {
		get_random_bytes(buf, TAKA_NONCE);
	} while (!memcmp(buf, zero, TAKA_NONCE));
	return block_crypt(c, index, buf, n, true, NULL);
}

/*
 * Open a stored block of n plaintext bytes: in place (dst NULL), or into page dst
 * (unlocked, not up to date: on a bad tag its bytes are zeroed, never shown).
 * -EBADMSG on a bad tag.
 */
int tkfs_crypt_open(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n, struct page *dst)
{
	int err = block_crypt(c, index, buf, n, false, dst);

	if (err && dst)
		zero_user(dst, 0, PAGE_SIZE);
	return err;
}

int tkfs_block_seal(struct tkfs_inode *ii, u64 index, u8 *buf, size_t n)
{
	struct tkfs_crypt c;
	int err = tkfs_crypt_init(ii, &c);

	if (!err)
		err = tkfs_crypt_seal(&c, index, buf, n);
	tkfs_crypt_done(&c);
	return err;
}

int tkfs_block_open(struct tkfs_inode *ii, u64 index, u8 *buf, size_t n)
{
	struct tkfs_crypt c;
	int err = tkfs_crypt_init(ii, &c);

	if (!err)
		err = tkfs_crypt_open(&c, index, buf, n, NULL);
	tkfs_crypt_done(&c);
	return err;
}

/* at module load: both algorithms exist (gcm(aes) may be a module: this loads it) */
int tkfs_crypto_init(void)
{
	struct crypto_aead *a = crypto_alloc_aead("gcm(aes)", 0, 0);

	if (IS_ERR(a))
		return PTR_ERR(a);
	crypto_free_aead(a);
	tkfs_hmac = crypto_alloc_shash("hmac(sha256)", 0, 0);
	if (IS_ERR(tkfs_hmac)) {
		int err = PTR_ERR(tkfs_hmac);

		tkfs_hmac = NULL;
		return err;
	}
	return 0;
}

void tkfs_crypto_exit(void)
{
	while (tkfs_aead_idle)
		crypto_free_aead(tkfs_aead_pool[--tkfs_aead_idle]);
	if (tkfs_hmac)
		crypto_free_shash(tkfs_hmac);
	tkfs_hmac = NULL;
}
