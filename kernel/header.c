// SPDX-License-Identifier: GPL-2.0
/*
 * header.c - the TAKA header of an inode: load and verify it (keys from the agent),
 * create it for new files, rewrite it when the size or the encryption lease changes,
 * and the lower-file I/O everything else goes through.
 */
#include <linux/slab.h>
#include <linux/uio.h>
#include <linux/cred.h>
#include <linux/namei.h>
#include <linux/random.h>
#include <linux/workqueue.h>
#include <linux/sched/signal.h>
#include <linux/completion.h>
#include <asm/unaligned.h>

#include "tkfs.h"

/* ---- lower file I/O (the inode's persistent lower file) ----------------------------- */

/*
 * A task with a fatal signal pending gets short reads and writes from the lower file
 * system (generic_perform_write and filemap_read stop between pages).  A stored block
 * spans two lower pages: cut between them (a process killed inside fsync, whose
 * write-back runs in its own context) it would be half new, half old, and fail its tag.
 * So what such a task leaves undone is finished by a worker, which has no signals.
 */
static struct workqueue_struct *tkfs_io_wq;

struct lower_io {
	struct work_struct work;
	struct completion done;
	struct file *f;
	void *buf;
	size_t len;
	loff_t pos;
	bool write;
	ssize_t ret;
};

static ssize_t lower_rw(struct file *f, void *buf, size_t len, loff_t pos, bool write)
{
	size_t done = 0;

	while (done < len) {
		ssize_t r = write ? kernel_write(f, buf + done, len - done, &pos) :
				    kernel_read(f, buf + done, len - done, &pos);

		/* a write that failed part way failed (ENOSPC stays ENOSPC); a read
		 * returns what it got */
		if (r < 0)
			return done && !write ? done : r;
		if (r == 0)
			break;
		done += r;
	}
	return done;
}

static void lower_io_work(struct work_struct *w)
{
	struct lower_io *io = container_of(w, struct lower_io, work);

	io->ret = lower_rw(io->f, io->buf, io->len, io->pos, io->write);
	complete(&io->done);
}

static ssize_t lower_io(struct inode *inode, void *buf, size_t len, loff_t pos, bool write)
{
	struct file *f = TKFS_I(inode)->lower_file;
	struct lower_io io;
	ssize_t r;

	if (!f || (write && !(f->f_mode & FMODE_WRITE)))
		return -EIO;
	r = lower_rw(f, buf, len, pos, write);
	if ((r >= 0 && r == len) || !fatal_signal_pending(current) ||
	    (current->flags & PF_KTHREAD))
		return r;
	/* cut short by a fatal signal: a worker does the rest */
	if (r < 0)
		r = 0;
	INIT_WORK_ONSTACK(&io.work, lower_io_work);
	init_completion(&io.done);
	io.f = f;
	io.buf = buf + r;
	io.len = len - r;
	io.pos = pos + r;
	io.write = write;
	queue_work(tkfs_io_wq, &io.work);
	wait_for_completion(&io.done);
	destroy_work_on_stack(&io.work);
	return io.ret < 0 ? io.ret : r + io.ret;
}

ssize_t tkfs_lower_read(struct inode *inode, void *buf, size_t len, loff_t pos)
{
	return lower_io(inode, buf, len, pos, false);
}

ssize_t tkfs_lower_write(struct inode *inode, const void *buf, size_t len, loff_t pos)
{
	ssize_t r = lower_io(inode, (void *)buf, len, pos, true);

	return r >= 0 && r < len ? -EIO : r;
}

/*
 * A new file's header and keys (file id, HKDF, its gcm(aes) keyed) are made ahead by a
 * worker, queued when the file is created: on another CPU they are ready by the file's
 * first write-back instead of lengthening it (an untar creates files faster than write-
 * back starts).  Write-back makes them itself if the worker has not run yet; either way
 * under key_sem, so exactly once.  evict_inode cancels a worker not run.
 */
static struct workqueue_struct *tkfs_prep_wq;

static void prep_work(struct work_struct *w)
{
	struct tkfs_inode *ii = container_of(w, struct tkfs_inode, prep_work);
	struct inode *inode = &ii->vfs_inode;

	if (READ_ONCE(ii->state) != TKFS_HDR_EMPTY || tkfs_create_header(inode, false))
		return;
	if (!tkfs_ensure_ready(inode)) {
		tkfs_crypt_prepare(ii);
		up_read(&ii->key_sem);
	}
}

void tkfs_prepare_new(struct inode *inode)
{
	queue_work(tkfs_prep_wq, &TKFS_I(inode)->prep_work);
}

void tkfs_work_init_once(struct tkfs_inode *ii)
{
	INIT_WORK(&ii->prep_work, prep_work);
}

void tkfs_work_cancel(struct tkfs_inode *ii)
{
	cancel_work_sync(&ii->prep_work);
}

int tkfs_io_init(void)
{
	tkfs_io_wq = alloc_workqueue("takakryptfs_io", WQ_MEM_RECLAIM | WQ_UNBOUND, 0);
	tkfs_prep_wq = alloc_workqueue("takakryptfs_prep", WQ_UNBOUND, 0);
	if (tkfs_io_wq && tkfs_prep_wq)
		return 0;
	tkfs_io_exit();
	return -ENOMEM;
}

void tkfs_io_exit(void)
{
	if (tkfs_io_wq)
		destroy_workqueue(tkfs_io_wq);
	if (tkfs_prep_wq)
		destroy_workqueue(tkfs_prep_wq);
	tkfs_io_wq = NULL;
	tkfs_prep_wq = NULL;
}

int tkfs_lower_truncate(struct inode *inode, loff_t len)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	const struct cred *old;
	int err;

	if (!ii->lower_file)
		return -EIO;
	old = override_creds(TKFS_SB(inode->i_sb)->mounter_cred);
	err = vfs_truncate(&ii->lower_file->f_path, len);
	revert_creds(old);
	return err;
}

void tkfs_report_eio(struct inode *inode, u64 block, const char *what)
{
	atomic64_inc(&TKFS_SB(inode->i_sb)->eio_count);
	atomic64_inc(&tkfs_st_eio);
	tkfs_audit_integrity(inode, block, what);
	if (block == U64_MAX)
		tkfs_err_rl("inode %lu (%s): %s: EIO\n", inode->i_ino,
			    TKFS_SB(inode->i_sb)->lower_name, what);
	else
		tkfs_err_rl("inode %lu (%s) block %llu: %s: EIO\n", inode->i_ino,
			    TKFS_SB(inode->i_sb)->lower_name, block, what);
}

/* ---- header state ------------------------------------------------------------------- */

/*
 * Read, parse and verify the header; derive the file keys.  key_sem held for writing.
 * Format errors make the inode BAD (every open fails with EIO until the inode is
 * evicted); a key that cannot be had leaves it UNKNOWN (retried at the next open).
 */
static int load_header_locked(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 raw[TAKA_HDR_SIZE], key[TAKA_KEY_LEN];
	bool first = ii->state == TKFS_HDR_UNKNOWN && !ii->hdr.size && !ii->disk_size &&
		     !inode->i_mapping->nrpages;
	loff_t lsize = i_size_read(ii->lower_inode);
	int epoch = atomic_read(&sbi->key_epoch);	/* before the key is fetched */
	ssize_t r;
	int err;

	if (ii->state == TKFS_HDR_BAD)
		return ii->bad_errno;
	if (lsize == 0 && (ii->state != TKFS_HDR_OK || ii->hdr_pending)) {
		/* nothing stored: a header made in memory is made again (new file id)
		 * when the first block is written back */
		tkfs_drop_keys(ii);
		ii->hdr_pending = false;
		ii->state = TKFS_HDR_EMPTY;
		ii->disk_size = 0;
		return 0;
	}
	/* the file keys count as current only once derived below (a failed load must not
	 * leave an OK inode with wiped keys looking current) */
	ii->key_epoch = -1;
	r = tkfs_lower_read(inode, raw, TAKA_HDR_SIZE, 0);
	if (r < 0)
		return r;
	if (r < TAKA_HDR_SIZE) {
		err = -EBADMSG;
		tkfs_report_eio(inode, U64_MAX, "header truncated");
		goto bad;
	}
	err = tkfs_hdr_parse(&ii->hdr, raw);
	if (err) {
		tkfs_report_eio(inode, U64_MAX, err == -EOPNOTSUPP ?
				"block size other than the page size" : "header invalid");
		goto bad;
	}
	err = tkfs_key_get(sbi, ii->hdr.key_id, ii->hdr.key_version, key, NULL);
	if (err) {
		tkfs_report_eio(inode, U64_MAX, "key unavailable");
		return -EIO;
	}
	err = tkfs_derive_keys(ii, key, true);
	memzero_explicit(key, sizeof(key));
	if (err) {
		tkfs_report_eio(inode, U64_MAX, "header tag mismatch");
		goto bad;
	}
	if (ii->state != TKFS_HDR_OK || first) {
		/* first load: the header is the truth.  After a key wipe (reload) the
		 * inode's own sizes stay: it may hold writes not yet on disk. */
		ii->disk_size = ii->hdr.size;
		ii->enc_count = ii->hdr.encryptions;
		ii->tail_cut = false;
		if (first || !inode->i_mapping->nrpages)
			i_size_write(inode, ii->hdr.size);
	}
	ii->state = TKFS_HDR_OK;
	ii->key_epoch = epoch;
	return 0;
bad:
	ii->state = TKFS_HDR_BAD;
	ii->bad_errno = -EIO;
	tkfs_drop_keys(ii);
	return -EIO;
}

int tkfs_load_header(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	int err;

	down_write(&ii->key_sem);
	err = load_header_locked(inode);
	up_write(&ii->key_sem);
	return err;
}

static bool keys_current(struct tkfs_inode *ii)
{
	struct tkfs_sb *sbi = TKFS_SB(ii->vfs_inode.i_sb);

	if (ii->state == TKFS_HDR_EMPTY)
		return true;
	return ii->state == TKFS_HDR_OK && ii->key_epoch == atomic_read(&sbi->key_epoch);
}

/*
 * Make sure the header is loaded and the file keys are those of the current key epoch;
 * returns 0 with key_sem held for reading (the caller up_reads it), or -EIO.
 */
int tkfs_ensure_keys(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	int err;

	down_read(&ii->key_sem);
	if (keys_current(ii))
		return 0;
	up_read(&ii->key_sem);
	down_write(&ii->key_sem);
	if (keys_current(ii)) {
		downgrade_write(&ii->key_sem);
		return 0;
	}
	if (ii->state == TKFS_HDR_OK)
		tkfs_drop_keys(ii);	/* the data key was wiped: derive again */
	err = load_header_locked(inode);
	if (err) {
		up_write(&ii->key_sem);
		return err;
	}
	downgrade_write(&ii->key_sem);
	return 0;
}

/* tkfs_ensure_keys for a file that has a header: -EIO (no lock held) for any other */
int tkfs_ensure_ready(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);

	if (tkfs_ensure_keys(inode))
		return -EIO;
	if (ii->state != TKFS_HDR_OK) {
		up_read(&ii->key_sem);
		return -EIO;
	}
	return 0;
}

/*
 * Whether the mount's key can be had for a new file (created, or a file of length 0
 * opened for writing): a write that could never be stored fails now, not at write-back.
 */
int tkfs_key_available(struct inode *inode)
{
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 key[TAKA_KEY_LEN];
	int err = tkfs_key_get(sbi, sbi->key_name, 0, key, NULL);

	memzero_explicit(key, sizeof(key));
	if (err) {
		tkfs_report_eio(inode, U64_MAX, "key unavailable for a new file");
		return -EIO;
	}
	return 0;
}

/* the static part of a new file's header: format, key name and version, a fresh file id
 * (v2: the oldest version is the version) */
static void new_static_header(u8 *raw, u8 fmtv, const char *key_name, u32 version)
{
	size_t klen = strlen(key_name);

	memset(raw, 0, TAKA_HDR_SIZE);
	memcpy(raw, "TAKA", 4);
	raw[4] = fmtv;
	if (fmtv == 2)
		put_unaligned_le32(version, raw + 108);
	raw[5] = TAKAKRYPT_ALG_AES_256_GCM;
	put_unaligned_le32(TKFS_BS, raw + 8);
	put_unaligned_le32(version, raw + 12);
	get_random_bytes(raw + 16, 16);
	raw[32] = klen;
	memcpy(raw + 33, key_name, klen);
}

/*
 * The header of a file with nothing stored (state EMPTY): fresh file id, the mount's key
 * at its current version, size 0, the first encryption lease.  With store, written now
 * (a truncate, an empty file closed); else kept in memory (hdr_pending) and stored with
 * the first write-back, in the same lower write as the blocks (aops.c).
 */
int tkfs_create_header(struct inode *inode, bool store)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 key[TAKA_KEY_LEN], *raw = ii->hdr.raw;
	int epoch = atomic_read(&sbi->key_epoch);	/* before the key is fetched */
	u32 version = 0;
	int err;

	down_write(&ii->key_sem);
	if (ii->state == TKFS_HDR_OK) {
		err = 0;
		if (store && ii->hdr_pending) {	/* made ahead, stored now */
			err = tkfs_hdr_seal(ii, 0, ii->hdr.encryptions);
			if (!err) {
				ssize_t w = tkfs_lower_write(inode, ii->hdr.raw, TAKA_HDR_SIZE, 0);

				err = w < 0 ? w : 0;
			}
			if (!err)
				ii->hdr_pending = false;
		}
		up_write(&ii->key_sem);
		return err;
	}
	err = tkfs_key_get(sbi, sbi->key_name, 0, key, &version);
	if (err) {
		tkfs_report_eio(inode, U64_MAX, "key unavailable for a new file");
		up_write(&ii->key_sem);
		return -EIO;
	}
	new_static_header(raw, sbi->format, sbi->key_name, version);
	err = tkfs_hdr_parse(&ii->hdr, raw);
	if (!err)
		err = tkfs_derive_keys(ii, key, false);
	memzero_explicit(key, sizeof(key));
	/* the first lease is taken at creation: no second header write at the first
	 * block; a header kept in memory is sealed when it is stored */
	if (!err && store)
		err = tkfs_hdr_seal(ii, 0, TAKA_LEASE_CHUNK);
	if (!err && !store)
		ii->hdr.encryptions = TAKA_LEASE_CHUNK;
	if (!err && store) {
		ssize_t w = tkfs_lower_write(inode, ii->hdr.raw, TAKA_HDR_SIZE, 0);

		err = w < 0 ? w : 0;
	}
	if (err) {
		tkfs_drop_keys(ii);
		up_write(&ii->key_sem);
		return err;
	}
	ii->hdr_pending = !store;
	ii->key_epoch = epoch;
	ii->state = TKFS_HDR_OK;
	ii->disk_size = 0;
	ii->enc_count = 0;
	ii->tail_cut = true;
	up_write(&ii->key_sem);
	return 0;
}

/*
 * A truncate to 0 (tkfs_setsize): an empty file has no block bound to its header, so a
 * file whose header names another version than the mount key's current one (or another
 * key) takes a new header -- new file id, the current version, the first lease --
 * written over the old one before the caller cuts the lower file: a crash leaves the
 * old file or an empty one (what follows a header of size 0 is a stale tail).  Dirty
 * pages were stored by the caller (inode lock held, key_sem not held).  1 if renewed,
 * 0 if there was nothing to renew (or no key: the truncate keeps the version), or a
 * negative errno, after which the header is read again from the lower file.
 */
int tkfs_renew_header(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 key[TAKA_KEY_LEN], *raw = ii->hdr.raw;
	int epoch = atomic_read(&sbi->key_epoch);	/* before the key is fetched */
	u32 version = 0;
	ssize_t w;
	int err;

	if (tkfs_key_get(sbi, sbi->key_name, 0, key, &version))
		return 0;
	down_write(&ii->key_sem);
	if (ii->state != TKFS_HDR_OK || ii->hdr_pending ||
	    (ii->hdr.key_version == version && !strcmp(ii->hdr.key_id, sbi->key_name))) {
		up_write(&ii->key_sem);
		memzero_explicit(key, sizeof(key));
		return 0;
	}
	tkfs_drop_keys(ii);
	new_static_header(raw, sbi->format, sbi->key_name, version);
	err = tkfs_hdr_parse(&ii->hdr, raw);
	if (!err)
		err = tkfs_derive_keys(ii, key, false);
	memzero_explicit(key, sizeof(key));
	if (!err)
		err = tkfs_hdr_seal(ii, 0, TAKA_LEASE_CHUNK);
	if (!err) {
		w = tkfs_lower_write(inode, raw, TAKA_HDR_SIZE, 0);
		err = w < 0 ? w : 0;
	}
	if (err) {
		/* whatever the lower file holds now is read again at the next use */
		tkfs_drop_keys(ii);
		ii->state = TKFS_HDR_UNKNOWN;
		up_write(&ii->key_sem);
		return err;
	}
	ii->key_epoch = epoch;
	ii->disk_size = 0;
	ii->enc_count = 0;
	ii->tail_cut = false;	/* the old blocks are still stored after the header */
	up_write(&ii->key_sem);
	return 1;
}

/* rewrite the header (size, lease); key_sem read-held, hdr_lock held */
int tkfs_write_header(struct inode *inode, u64 size, u64 lease)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	ssize_t w;
	int err;

	lockdep_assert_held(&ii->hdr_lock);
	err = tkfs_hdr_seal(ii, size, lease);
	if (err)
		return err;
	w = tkfs_lower_write(inode, ii->hdr.raw, TAKA_HDR_SIZE, 0);
	if (w < 0)
		return w;
	ii->disk_size = size;
	ii->hdr_pending = false;
	return 0;
}

/*
 * v2: a file of the mount's key whose write version is older than the key's current one
 * moves to it before the blocks about to be sealed (docs/file-format.md, "Version 2"):
 * rewritten blocks use the new version at once.  The current version is the mount's
 * (known since the agent's last CONFIG_UPDATE, else asked for once).  hdr_lock held,
 * key_sem read-held.  Without a key the file stays where it is.
 */
static int maybe_move(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 key[TAKA_KEY_LEN];
	u32 cur = READ_ONCE(sbi->current_version);
	int err;

	if (ii->hdr.fmtv != 2 || strcmp(ii->hdr.key_id, sbi->key_name))
		return 0;
	if (cur && cur <= ii->hdr.key_version)
		return 0;
	err = tkfs_key_get(sbi, sbi->key_name, cur, key, &cur);
	if (err || cur <= ii->hdr.key_version) {
		memzero_explicit(key, sizeof(key));
		return 0;
	}
	err = tkfs_move_version(inode, cur, key);
	memzero_explicit(key, sizeof(key));
	return err < 0 ? err : 0;
}

/*
 * Take n block encryptions from the header's lease (docs/file-format.md "Encryption
 * count"), writing a larger lease first when it runs out.  hdr_lock held.
 */
int tkfs_reserve_encryptions(struct inode *inode, u64 n)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	int err;

	lockdep_assert_held(&ii->hdr_lock);
	err = maybe_move(inode);
	if (err)
		return err;
	if (ii->enc_count + n > TAKA_HARD_LIMIT) {
		tkfs_err_rl("inode %lu: encryption limit reached, copy the file: EKEYEXPIRED\n",
			    inode->i_ino);
		return -EKEYEXPIRED;
	}
	if (ii->enc_count + n > ii->hdr.encryptions) {
		u64 lease = ii->enc_count + n + TAKA_LEASE_CHUNK;

		if (lease > TAKA_SOFT_LIMIT)
			pr_warn_ratelimited(TKFS_NAME ": inode %lu: %llu block encryptions under one file key, copy the file\n",
					    inode->i_ino, lease);
		err = tkfs_write_header(inode, ii->disk_size, lease);
		if (err)
			return err;
	}
	ii->enc_count += n;
	return 0;
}
