// SPDX-License-Identifier: GPL-2.0
/*
 * rekey.c - live rekey of a TAKA v2 file in place (docs/kernel.md "Live rekey"), asked
 * for by takakryptd with the ioctls of include/uapi/takakrypt_ioctl.h.
 *
 * A v2 block carries its key version and is sealed alone, so a file moves to a new key
 * version one block at a time, with no copy and no swap of lower files: the header's
 * write version goes up first (tkfs_move_version, as for any writer after a rotation),
 * then each stored block under an older version is read into the page cache (decrypted
 * and verified), marked dirty and written back, which seals it under the write version.
 * A block is rewritten whole in one lower write, exactly as an application's write-back
 * rewrites it, so a killed takakryptd leaves each block old or new, both readable (the
 * header's range [oldest, write] covers both).  A power cut can tear a stored block (it
 * spans two lower pages): takakryptd journals each range's stored bytes before asking,
 * and each range is durable before the call returns, so it can put a torn block back
 * (agent/krekey.py).  Only when every stored block is at the target and durable does
 * the header's oldest version go up.
 *
 * Locking: each call holds the inode lock (i_rwsem) throughout, so application writes,
 * truncates and raw-view writes (raw.c takes the same lock) wait for one range of
 * blocks, never for the whole file; stores into a shared mapping go on meanwhile (the
 * page lock orders them, and whatever they dirty is sealed under the write version
 * anyway).  key_sem is not held across the page reads (read_folio takes it).
 */
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <asm/unaligned.h>

#include "tkfs.h"
#include "include/uapi/takakrypt_ioctl.h"

/* stored blocks per lower read */
#define RK_BATCH	TKFS_BATCH

/*
 * Header loaded, a v2 file of the mount's key, its write version at least target (moved
 * to target, the key fetched by version, when older).  0 with key_sem read-held; 1 for a
 * file with nothing stored (no header yet); else a negative errno, no lock held.
 */
static int rk_ready(struct inode *inode, u32 target)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	u8 key[TAKA_KEY_LEN];
	u32 got = 0;
	int err, tries;

	err = tkfs_get_lower_file(inode);
	if (err)
		return err;
	if (!(ii->lower_file->f_mode & FMODE_WRITE))
		return -EROFS;
	err = tkfs_key_get(sbi, sbi->key_name, target, key, &got);
	if (err)
		return err;
	for (tries = 0; ; tries++) {
		if (tkfs_ensure_keys(inode)) {
			err = -EIO;
			break;
		}
		if (ii->state == TKFS_HDR_EMPTY) {
			up_read(&ii->key_sem);
			err = 1;
			break;
		}
		err = ii->state != TKFS_HDR_OK ? -EIO :
		      ii->hdr.fmtv != 2 ? -EOPNOTSUPP :
		      strcmp(ii->hdr.key_id, sbi->key_name) ? -EXDEV : 0;
		if (err || READ_ONCE(ii->hdr.key_version) >= target) {
			if (err)
				up_read(&ii->key_sem);
			break;
		}
		mutex_lock(&ii->hdr_lock);
		err = ii->hdr.key_version < target ? tkfs_move_version(inode, target, key) : 0;
		mutex_unlock(&ii->hdr_lock);
		if (err < 0) {
			up_read(&ii->key_sem);
			break;
		}
		err = 0;
		if (READ_ONCE(ii->hdr.key_version) >= target)
			break;
		/* not moved: every slot for another version's transform is taken; they
		 * are freed with key_sem write-held (made again when a block needs one) */
		up_read(&ii->key_sem);
		if (tries) {
			err = -EBUSY;
			break;
		}
		down_write(&ii->key_sem);
		tkfs_vkeys_free(ii);
		up_write(&ii->key_sem);
	}
	memzero_explicit(key, sizeof(key));
	return err;
}

/*
 * The stored block i (len bytes at p, len its stored length by the header's size):
 * 0 hole or current, 1 under a version older than target.
 */
static int rk_old(const u8 *p, size_t len, u32 target)
{
	if (!memchr_inv(p, 0, len))
		return 0;	/* a hole (an all-zero stored block) stays one */
	return get_unaligned_le32(p + len - 4) < target;
}

/* stored length of block i of a file of size plaintext bytes (0: past the end) */
static size_t rk_stored_len(u64 size, u64 i)
{
	u64 start = i << PAGE_SHIFT;

	if (start >= size)
		return 0;
	return min_t(u64, TKFS_BS, size - start) + TAKA_OVERHEAD;
}

/* read block i into the page cache (verified) and mark it dirty */
static int rk_dirty(struct inode *inode, pgoff_t index)
{
	struct folio *folio = read_mapping_folio(inode->i_mapping, index, NULL);

	if (IS_ERR(folio))
		return PTR_ERR(folio);
	folio_lock(folio);
	if (folio->mapping == inode->i_mapping)	/* not truncated meanwhile */
		folio_mark_dirty(folio);
	folio_unlock(folio);
	folio_put(folio);
	return 0;
}

/*
 * Walk the stored blocks [first, end) of a file of stored plaintext size `size`; with
 * `dirty`, dirty each one under an older version (count in *n, *next the first block not
 * looked at), else count them.  buf holds RK_BATCH stored blocks.
 */
static int rk_walk(struct inode *inode, u8 *buf, u64 size, u64 first, u64 end, u32 target,
		   bool dirty, u64 *n, u64 *next)
{
	u64 i = first, j;
	int err = 0;

	*n = 0;
	while (i < end && !err) {
		u64 nb = min_t(u64, end - i, RK_BATCH);
		ssize_t got = tkfs_lower_read(inode, buf, nb * TKFS_STORED_BS, tkfs_block_off(i));

		if (got < 0) {
			err = got;
			break;
		}
		for (j = 0; j < nb && !err; j++) {
			size_t off = j * TKFS_STORED_BS, len = rk_stored_len(size, i + j);

			/* a block cut short is not sealed again: reading it fails (EIO) */
			if (!len || off + len > got || !rk_old(buf + off, len, target))
				continue;
			if (dirty)
				err = rk_dirty(inode, i + j);
			if (!err)
				(*n)++;
		}
		if (!err)
			i += nb;
		if (fatal_signal_pending(current))
			err = -EINTR;
		cond_resched();
	}
	if (next)
		*next = i;
	return err;
}

static long rk_range(struct file *file, struct takakrypt_rekey_range __user *arg)
{
	struct inode *inode = file_inode(file);
	struct tkfs_inode *ii = TKFS_I(inode);
	struct takakrypt_rekey_range r;
	u64 size, nblocks, end;
	u8 *buf;
	int err;

	if (copy_from_user(&r, arg, sizeof(r)))
		return -EFAULT;
	if (!r.version || !r.count || r.count > TAKAKRYPT_REKEY_MAX_BLOCKS || r.reserved)
		return -EINVAL;
	buf = kvmalloc(RK_BATCH * TKFS_STORED_BS, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	r.rewritten = 0;
	r.next = r.start;
	r.blocks = 0;
	r.write_version = 0;
	inode_lock(inode);
	err = rk_ready(inode, r.version);
	if (err == 1) {			/* nothing stored */
		err = 0;
		goto unlock;
	}
	if (err)
		goto unlock;
	r.write_version = READ_ONCE(ii->hdr.key_version);
	/* blocks past the stored size are not stored yet: their write-back seals them
	 * under the write version anyway */
	size = min_t(u64, ii->disk_size, i_size_read(inode));
	up_read(&ii->key_sem);
	nblocks = DIV_ROUND_UP_ULL(size, TKFS_BS);
	r.blocks = DIV_ROUND_UP_ULL(i_size_read(inode), TKFS_BS);
	end = r.start < nblocks ? min_t(u64, nblocks, r.start + r.count) : r.start;
	WRITE_ONCE(ii->keyless_wb, false);
	err = rk_walk(inode, buf, size, r.start, end, r.version, true, &r.rewritten, &r.next);
	if (!err && r.next < end)
		err = -EIO;
	if (r.rewritten) {
		int err2 = filemap_write_and_wait_range(inode->i_mapping,
							(loff_t)r.start << PAGE_SHIFT,
							((loff_t)r.next << PAGE_SHIFT) - 1);

		if (!err2 && READ_ONCE(ii->keyless_wb))
			err2 = -ENOKEY;	/* no key at write-back: the pages stay dirty */
		/* durable before takakryptd drops its copy of the old blocks (its journal,
		 * agent/krekey.py): a block torn by a power cut is put back from there.
		 * From offset 0: the header's page too, whose move to the new write version
		 * (rk_ready) may not be stored yet, and without which the new blocks would
		 * name a version outside the header's range */
		if (!err2)
			err2 = vfs_fsync_range(ii->lower_file, 0, tkfs_block_off(r.next) - 1, 1);
		if (!err)
			err = err2;
	}
	if (!err && r.next >= nblocks)
		r.next = max_t(u64, r.next, r.blocks);
unlock:
	inode_unlock(inode);
	kvfree(buf);
	if (err)
		return err;
	return copy_to_user(arg, &r, sizeof(r)) ? -EFAULT : 0;
}

static long rk_finish(struct file *file, struct takakrypt_rekey_finish __user *arg)
{
	struct inode *inode = file_inode(file);
	struct tkfs_inode *ii = TKFS_I(inode);
	struct takakrypt_rekey_finish f;
	u64 size;
	u8 *buf;
	int err;

	if (copy_from_user(&f, arg, sizeof(f)))
		return -EFAULT;
	if (!f.version)
		return -EINVAL;
	buf = kvmalloc(RK_BATCH * TKFS_STORED_BS, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	f.stale = 0;
	f.oldest = 0;
	inode_lock(inode);
	WRITE_ONCE(ii->keyless_wb, false);
	err = filemap_write_and_wait(inode->i_mapping);
	if (!err && READ_ONCE(ii->keyless_wb))
		err = -ENOKEY;
	if (err)
		goto unlock;
	err = rk_ready(inode, f.version);
	if (err == 1) {
		err = 0;
		goto unlock;
	}
	if (err)
		goto unlock;
	mutex_lock(&ii->hdr_lock);
	size = ii->disk_size;
	err = rk_walk(inode, buf, size, 0, DIV_ROUND_UP_ULL(size, TKFS_BS), f.version, false,
		      &f.stale, NULL);
	if (!err && f.stale)
		err = -EAGAIN;
	if (!err && size && ii->hdr.oldest < f.version) {
		u32 was = ii->hdr.oldest;

		/* the blocks durable before a header that no longer covers their old
		 * versions; then the header */
		err = vfs_fsync(ii->lower_file, 1);
		if (!err) {
			ii->hdr.oldest = f.version;
			err = tkfs_write_header(inode, size, ii->hdr.encryptions);
			if (err)
				ii->hdr.oldest = was;
		}
		if (!err)
			err = vfs_fsync(ii->lower_file, 1);
	}
	f.oldest = ii->hdr.oldest;
	mutex_unlock(&ii->hdr_lock);
	up_read(&ii->key_sem);
unlock:
	inode_unlock(inode);
	kvfree(buf);
	if (err && err != -EAGAIN)
		return err;
	if (copy_to_user(arg, &f, sizeof(f)))
		return -EFAULT;
	return err;
}

/* file_operations.unlocked_ioctl of the mount's regular files, both views */
long tkfs_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	if (cmd != TAKAKRYPT_IOC_REKEY_RANGE && cmd != TAKAKRYPT_IOC_REKEY_FINISH)
		return -ENOTTY;
	if (!tkfs_is_agent())
		return -EPERM;
	if (!S_ISREG(file_inode(file)->i_mode))
		return -ENOTTY;
	if (cmd == TAKAKRYPT_IOC_REKEY_RANGE)
		return rk_range(file, (struct takakrypt_rekey_range __user *)arg);
	return rk_finish(file, (struct takakrypt_rekey_finish __user *)arg);
}
