// SPDX-License-Identifier: GPL-2.0
/*
 * crypto.c - TAKA v1 and v2 header and block cryptography on the kernel crypto API:
 * HKDF-SHA256 per-file keys and the header tag on "hmac(sha256)", blocks on "gcm(aes)".
 * docs/file-format.md is the specification; tests/vectors/taka_v1.json and
 * taka_v2.json its vectors.  A v2 block names its key version: blocks of the file's
 * other versions are opened with transforms made on first use (ii->vkeys).
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
static const char hkdf_info_v2[] = "takakrypt/v2 file keys";

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
	if (memcmp(raw, "TAKA", 4) || (raw[4] != 1 && raw[4] != 2) ||
	    raw[5] != TAKAKRYPT_ALG_AES_256_GCM)
		return -EBADMSG;
	h->fmtv = raw[4];
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
	if (h->fmtv == 2) {
		h->encryptions = get_unaligned_le32(raw + 104);
		h->oldest = get_unaligned_le32(raw + 108);
		if (!h->oldest || h->oldest > h->key_version)
			return -EBADMSG;
	} else {
		h->encryptions = get_unaligned_le64(raw + 104);
		h->oldest = h->key_version;
	}
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
 * okm = HKDF-SHA256(IKM = data key, salt = file_id, info of format fmtv, L = 64);
 * tkfs_hmac_lock held.
 */
static int hkdf_file_keys(const u8 *file_id, u8 fmtv, const u8 *data_key, u8 *okm)
{
	const char *info = fmtv == 2 ? hkdf_info_v2 : hkdf_info;
	u8 prk[32], t[32 + sizeof(hkdf_info)], ctr = 1;
	const size_t ilen = sizeof(hkdf_info) - 1;
	int err;

	BUILD_BUG_ON(sizeof(hkdf_info) != sizeof(hkdf_info_v2));
	err = hmac_sha256(file_id, 16, data_key, TAKA_KEY_LEN, NULL, 0, prk);
	/* both expand steps under the one PRK key */
	if (!err)
		err = hmac_sha256(prk, 32, info, ilen, &ctr, 1, okm);
	if (!err) {
		memcpy(t, okm, 32);
		memcpy(t + 32, info, ilen);
		t[32 + ilen] = 2;
		err = hmac_digest(t, 32 + ilen + 1, NULL, 0, okm + 32);
	}
	memzero_explicit(prk, sizeof(prk));
	memzero_explicit(t, sizeof(t));
	return err;
}

/*
 * The file keys of the header's key version: enc_key = okm[0:32], mac_key = okm[32:64];
 * with verify, checks the header tag (-EBADMSG).  key_sem held for writing.
 */
int tkfs_derive_keys(struct tkfs_inode *ii, const u8 *data_key, bool verify)
{
	u8 okm[64], tag[TAKA_TAG];
	int err;

	tkfs_drop_keys(ii);
	mutex_lock(&tkfs_hmac_lock);
	err = hkdf_file_keys(ii->hdr.file_id, ii->hdr.fmtv, data_key, okm);
	if (!err) {
		memcpy(ii->enc_key, okm, 32);
		memcpy(ii->mac_key, okm + 32, 32);
		ii->aead_ver = ii->hdr.key_version;
		if (verify) {
			err = hdr_tag(ii, tag);
			if (!err && crypto_memneq(tag, ii->hdr.raw + TAKA_TAGGED_SIZE, TAKA_TAG))
				err = -EBADMSG;
		}
	}
	mutex_unlock(&tkfs_hmac_lock);
	memzero_explicit(okm, sizeof(okm));
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
/* [0]: 128-bit tags (v1), [1]: 96-bit tags (v2) */
static struct crypto_aead *tkfs_aead_pool[2][TKFS_AEAD_POOL];
static unsigned int tkfs_aead_idle[2];

static inline unsigned int pool_of(unsigned int authsize)
{
	return authsize == TAKA_TAG ? 0 : 1;
}

static struct crypto_aead *aead_get(unsigned int authsize)
{
	unsigned int p = pool_of(authsize);
	struct crypto_aead *a = NULL;
	int err;

	spin_lock(&tkfs_aead_pool_lock);
	if (tkfs_aead_idle[p])
		a = tkfs_aead_pool[p][--tkfs_aead_idle[p]];
	spin_unlock(&tkfs_aead_pool_lock);
	if (a)
		return a;
	a = crypto_alloc_aead("gcm(aes)", 0, 0);
	if (IS_ERR(a))
		return a;
	err = crypto_aead_setauthsize(a, authsize);
	if (err) {
		crypto_free_aead(a);
		return ERR_PTR(err);
	}
	return a;
}

static void aead_put(struct crypto_aead *a)
{
	static const u8 zero[TAKA_KEY_LEN];
	unsigned int p = pool_of(crypto_aead_authsize(a));

	if (!crypto_aead_setkey(a, zero, sizeof(zero))) {
		spin_lock(&tkfs_aead_pool_lock);
		if (tkfs_aead_idle[p] < TKFS_AEAD_POOL) {
			tkfs_aead_pool[p][tkfs_aead_idle[p]++] = a;
			a = NULL;
		}
		spin_unlock(&tkfs_aead_pool_lock);
	}
	if (a)
		crypto_free_aead(a);
}

static unsigned int authsize_of(u8 fmtv)
{
	return fmtv == 2 ? TAKA_TAG_V2 : TAKA_TAG;
}

/* the other versions' transforms; key_sem write-held (or the inode is going away) */
void tkfs_vkeys_free(struct tkfs_inode *ii)
{
	unsigned int i, n = ii->nvkeys;

	ii->nvkeys = 0;
	for (i = 0; i < n; i++) {
		aead_put(ii->vkeys[i].aead);
		ii->vkeys[i].aead = NULL;
	}
}

void tkfs_drop_keys(struct tkfs_inode *ii)
{
	tkfs_vkeys_free(ii);
	if (ii->aead)
		aead_put(ii->aead);
	ii->aead = NULL;
	memzero_explicit(ii->enc_key, sizeof(ii->enc_key));
	memzero_explicit(ii->mac_key, sizeof(ii->mac_key));
}

/*
 * write size and encryptions (v2: and the versions) into ii->hdr.raw and recompute the
 * tag.  A v2 header of size 0 has no block left of an older version: oldest = write.
 */
int tkfs_hdr_seal(struct tkfs_inode *ii, u64 size, u64 encryptions)
{
	u8 tag[TAKA_TAG];
	int err;

	put_unaligned_le64(size, ii->hdr.raw + 96);
	if (ii->hdr.fmtv == 2) {
		if (!size)
			ii->hdr.oldest = ii->hdr.key_version;
		put_unaligned_le32(ii->hdr.key_version, ii->hdr.raw + 12);
		put_unaligned_le32((u32)encryptions, ii->hdr.raw + 104);
		put_unaligned_le32(ii->hdr.oldest, ii->hdr.raw + 108);
	} else {
		put_unaligned_le64(encryptions, ii->hdr.raw + 104);
	}
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
	a = aead_get(authsize_of(ii->hdr.fmtv));
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
 * v2: the file keys of one key version into okm (64 bytes; the caller wipes it) and a
 * 96-bit-tag gcm(aes) keyed with its block key.
 */
static struct crypto_aead *v2_keys(const u8 *file_id, const u8 *data_key, u8 *okm)
{
	struct crypto_aead *a;
	int err;

	mutex_lock(&tkfs_hmac_lock);
	err = hkdf_file_keys(file_id, 2, data_key, okm);
	mutex_unlock(&tkfs_hmac_lock);
	if (err)
		return ERR_PTR(err);
	a = aead_get(TAKA_TAG_V2);
	if (IS_ERR(a))
		return a;
	err = crypto_aead_setkey(a, okm, TAKA_KEY_LEN);
	if (err) {
		aead_put(a);
		return ERR_PTR(err);
	}
	return a;
}

/*
 * v2: the transform of key version v of the file, made on first use (key_sem
 * read-held): the data key (name, v) from the agent, the file keys of v, a 96-bit-tag
 * gcm(aes).  Kept in ii->vkeys; when that is full, *tmp says the caller puts it after
 * use.  -ENOKEY: no key of that version can be had.
 */
static struct crypto_aead *version_aead(struct tkfs_inode *ii, u32 v, bool *tmp)
{
	struct tkfs_sb *sbi = TKFS_SB(ii->vfs_inode.i_sb);
	struct crypto_aead *a, *have = NULL;
	u8 key[TAKA_KEY_LEN], okm[64];
	unsigned int i;
	int err;

	*tmp = false;
	spin_lock(&ii->vkeys_lock);
	for (i = 0; i < ii->nvkeys; i++)
		if (ii->vkeys[i].ver == v)
			have = ii->vkeys[i].aead;
	if (!have && ii->aead_ver == v && ii->aead)
		have = ii->aead;
	spin_unlock(&ii->vkeys_lock);
	if (have)
		return have;
	err = tkfs_key_get(sbi, ii->hdr.key_id, v, key, NULL);
	if (err)
		return ERR_PTR(-ENOKEY);
	a = v2_keys(ii->hdr.file_id, key, okm);
	memzero_explicit(key, sizeof(key));
	memzero_explicit(okm, sizeof(okm));
	if (IS_ERR(a))
		return a;
	spin_lock(&ii->vkeys_lock);
	for (i = 0; i < ii->nvkeys; i++)
		if (ii->vkeys[i].ver == v)
			have = ii->vkeys[i].aead;
	if (!have && ii->nvkeys < TKFS_VKEYS) {
		ii->vkeys[ii->nvkeys].ver = v;
		ii->vkeys[ii->nvkeys].aead = a;
		ii->nvkeys++;
	} else if (!have) {
		*tmp = true;
	}
	spin_unlock(&ii->vkeys_lock);
	if (have) {
		aead_put(a);	/* another reader made it first */
		return have;
	}
	return a;
}

/*
 * v2: seal new blocks under `version` from now on (docs/file-format.md, "Version 2",
 * writers): its file keys from data_key, its transform made, the old write version's
 * kept for reading (ii->vkeys), and the header with the new write version and a fresh
 * lease (the new file key's count starts at 0) written before any block of it.  hdr_lock
 * held, key_sem read-held.  1 if moved, 0 if not (no room to keep the old transform:
 * the file stays on its version until its keys are loaded again), or -errno.
 */
int tkfs_move_version(struct inode *inode, u32 version, const u8 *data_key)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct crypto_aead *old, *a;
	u8 okm[64];
	u32 old_ver;
	int err;

	lockdep_assert_held(&ii->hdr_lock);
	old = inode_aead(ii);	/* the old version's, made now if not yet */
	if (IS_ERR(old))
		return PTR_ERR(old);
	a = v2_keys(ii->hdr.file_id, data_key, okm);
	if (IS_ERR(a)) {
		memzero_explicit(okm, sizeof(okm));
		return PTR_ERR(a);
	}
	spin_lock(&ii->vkeys_lock);
	if (ii->nvkeys == TKFS_VKEYS) {
		spin_unlock(&ii->vkeys_lock);
		aead_put(a);
		memzero_explicit(okm, sizeof(okm));
		return 0;
	}
	old_ver = ii->aead_ver;
	ii->vkeys[ii->nvkeys].ver = old_ver;
	ii->vkeys[ii->nvkeys].aead = old;
	ii->nvkeys++;
	WRITE_ONCE(ii->aead, a);
	ii->aead_ver = version;
	WRITE_ONCE(ii->hdr.key_version, version);
	spin_unlock(&ii->vkeys_lock);
	memcpy(ii->enc_key, okm, 32);
	memcpy(ii->mac_key, okm + 32, 32);
	memzero_explicit(okm, sizeof(okm));
	if (!ii->disk_size)
		ii->hdr.oldest = version;
	ii->enc_count = 0;
	err = tkfs_write_header(inode, ii->disk_size, TAKA_LEASE_CHUNK);
	if (err) {
		/* no block of the new version before a header naming it: the next
		 * reservation writes the header again first */
		ii->hdr.encryptions = 0;
		return err;
	}
	return 1;
}

/*
 * A run of block operations of one inode shares one request and one AAD buffer (the
 * static header, then the block index, v2: then the block's version): readahead and
 * write-back set them up once per batch instead of once per block.  key_sem read-held
 * from init to done.
 */
int tkfs_crypt_init(struct tkfs_inode *ii, struct tkfs_crypt *c)
{
	struct crypto_aead *tfm = inode_aead(ii);

	c->ii = ii;
	c->req = NULL;
	c->aad = NULL;
	c->fmtv = ii->hdr.fmtv;
	if (IS_ERR(tfm))
		return PTR_ERR(tfm);
	if (c->fmtv == 2) {
		/* the write version's transform and its version, as one (a writer may
		 * move the file under hdr_lock meanwhile) */
		spin_lock(&ii->vkeys_lock);
		tfm = ii->aead;
		c->ver = ii->aead_ver;
		spin_unlock(&ii->vkeys_lock);
	} else {
		c->ver = ii->hdr.key_version;
	}
	c->tfm = tfm;
	c->reqsize = crypto_aead_reqsize(tfm);
	c->aad = kmalloc(TAKA_AAD_LEN_V2, GFP_NOFS);
	if (!c->aad)
		return -ENOMEM;
	c->req = aead_request_alloc(tfm, GFP_NOFS);
	if (!c->req) {
		kfree(c->aad);
		c->aad = NULL;
		return -ENOMEM;
	}
	memcpy(c->aad, ii->hdr.raw, TAKA_STATIC_SIZE);
	if (c->fmtv == 2)
		memset(c->aad + 12, 0, 4);	/* the write version is not bound */
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
 * One AEAD operation on a stored block laid out in buf as nonce | data (n) | tag (v1:
 * 16; v2: 12, then le32 version), AAD = static header | le64 index (v2: | le32 version);
 * in place, or (decryption only) into dst's first n bytes.  buf must be kmalloc memory
 * (scatterlists).  tfm: the version's transform (c->tfm or another of the same kind).
 */
static int block_crypt(struct tkfs_crypt *c, struct crypto_aead *tfm, u32 ver, u64 index,
		       u8 *buf, size_t n, bool enc, struct page *dst)
{
	const unsigned int tag = c->fmtv == 2 ? TAKA_TAG_V2 : TAKA_TAG;
	const unsigned int alen = c->fmtv == 2 ? TAKA_AAD_LEN_V2 : TAKA_AAD_LEN;
	struct scatterlist sg[2], dsg[2];
	DECLARE_CRYPTO_WAIT(wait);
	u8 iv[TAKA_NONCE];
	int err;

	put_unaligned_le64(index, c->aad + TAKA_STATIC_SIZE);
	if (c->fmtv == 2)
		put_unaligned_le32(ver, c->aad + TAKA_STATIC_SIZE + 8);
	memcpy(iv, buf, TAKA_NONCE);
	sg_init_table(sg, 2);
	sg_set_buf(&sg[0], c->aad, alen);
	sg_set_buf(&sg[1], buf + TAKA_NONCE, n + tag);
	if (dst) {
		sg_init_table(dsg, 2);
		sg_set_buf(&dsg[0], c->aad, alen);
		sg_set_page(&dsg[1], dst, n, 0);
	}
	if (tfm != c->tfm)
		aead_request_set_tfm(c->req, tfm);
	aead_request_set_callback(c->req, CRYPTO_TFM_REQ_MAY_BACKLOG | CRYPTO_TFM_REQ_MAY_SLEEP,
				  crypto_req_done, &wait);
	aead_request_set_ad(c->req, alen);
	aead_request_set_crypt(c->req, sg, dst ? dsg : sg, enc ? n : n + tag, iv);
	err = crypto_wait_req(enc ? crypto_aead_encrypt(c->req) : crypto_aead_decrypt(c->req),
			      &wait);
	if (tfm != c->tfm)
		aead_request_set_tfm(c->req, c->tfm);
	return err;
}

/* seal n plaintext bytes at buf + 12 in place; draws the nonce (never all zero) */
int tkfs_crypt_seal(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n)
{
	static const u8 zero[TAKA_NONCE];
	int err;

	do {
		get_random_bytes(buf, TAKA_NONCE);
	} while (!memcmp(buf, zero, TAKA_NONCE));
	err = block_crypt(c, c->tfm, c->ver, index, buf, n, true, NULL);
	if (!err && c->fmtv == 2)
		put_unaligned_le32(c->ver, buf + TAKA_NONCE + n + TAKA_TAG_V2);
	return err;
}

/*
 * Open a stored block of n plaintext bytes: in place (dst NULL), or into page dst
 * (unlocked, not up to date: on a bad tag its bytes are zeroed, never shown).
 * -EBADMSG on a bad tag or (v2) a block version outside the header's range, -ENOKEY
 * when the block's version has no key here.
 */
int tkfs_crypt_open(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n, struct page *dst)
{
	struct tkfs_inode *ii = c->ii;
	struct crypto_aead *tfm = c->tfm;
	u32 ver = c->ver;
	bool tmp = false;
	int err;

	if (c->fmtv == 2) {
		ver = get_unaligned_le32(buf + TAKA_NONCE + n + TAKA_TAG_V2);
		if (ver < READ_ONCE(ii->hdr.oldest) || ver > READ_ONCE(ii->hdr.key_version)) {
			err = -EBADMSG;
			goto out;
		}
		if (ver != c->ver) {
			tfm = version_aead(ii, ver, &tmp);
			if (IS_ERR(tfm)) {
				err = PTR_ERR(tfm);
				goto out;
			}
			/* one request serves every version: the same algorithm's
			 * transforms have the same request size */
			if (crypto_aead_reqsize(tfm) > c->reqsize) {
				if (tmp)
					aead_put(tfm);
				err = -EINVAL;
				goto out;
			}
		}
	}
	err = block_crypt(c, tfm, ver, index, buf, n, false, dst);
	if (tmp)
		aead_put(tfm);
out:
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
	unsigned int p;

	for (p = 0; p < 2; p++)
		while (tkfs_aead_idle[p])
			crypto_free_aead(tkfs_aead_pool[p][--tkfs_aead_idle[p]]);
	if (tkfs_hmac)
		crypto_free_shash(tkfs_hmac);
	tkfs_hmac = NULL;
}
