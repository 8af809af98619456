// SPDX-License-Identifier: GPL-2.0
/*
 * raw.c - the raw view (docs/kernel.md "Views"): an open the policy permits without
 * apply_key reads and writes the stored TAKA bytes of the lower file, as a backup tool
 * must (tar of the guard point holds ciphertext; a restore writes it back).  The open
 * gets its own lower file, opened with the caller's credentials, and file operations
 * that go straight to it: no plaintext page of the mount is ever served through it,
 * whether by read, mmap (the mapping is the lower file's), splice or sendfile (those go
 * through read_iter/write_iter here); copy_file_range is refused (EXDEV: the VFS clamps
 * it by the mount inode's plaintext size), and cp and the rest fall back to read/write.
 *
 * A raw open first writes back the plaintext view's dirty pages, so the stored bytes it
 * reads or changes are the latest (a backup of a file written a moment ago through the
 * mount holds what was written, not the bytes of the last write-back, nor an empty file
 * whose header and blocks are still in memory; a raw stat's size is made current the
 * same way, tkfs_getattr), and every raw change (write,
 * truncate, fallocate, and the close of a writable raw open, for stores into a shared
 * mapping) drops the plaintext pages and the inode's header state and file keys: the
 * next plaintext access reads the header again.  Plaintext writes made through another
 * open at the same moment as a raw restore are lost to it (the restore wins), as with
 * any two writers of one file without locking.
 */
#include <linux/module.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/uio.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/falloc.h>
#include <linux/splice.h>
#include <linux/fs_stack.h>

#include "tkfs.h"

static struct file *lower_of(const struct file *file)
{
	return file->private_data;
}

/* the stored bytes changed behind the plaintext view */
void tkfs_raw_changed(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);

	tkfs_work_cancel(ii);
	/* the state first: a read from now on loads the header again; then the pages
	 * (not under key_sem: a read holding a page lock may be waiting for it) */
	down_write(&ii->key_sem);
	tkfs_drop_keys(ii);
	memzero_explicit(&ii->hdr, sizeof(ii->hdr));
	ii->state = TKFS_HDR_UNKNOWN;
	ii->hdr_pending = false;
	ii->disk_size = 0;
	ii->enc_count = 0;
	ii->tail_cut = false;
	ii->key_epoch = -1;
	/* the plaintext size is read again from the header at the next plaintext access;
	 * meanwhile the stored length (the VFS clamps raw copy_file_range by i_size) */
	i_size_write(inode, i_size_read(ii->lower_inode));
	up_write(&ii->key_sem);
	unmap_mapping_range(inode->i_mapping, 0, 0, 0);
	truncate_inode_pages(inode->i_mapping, 0);
	fsstack_copy_attr_times(inode, ii->lower_inode);
}

int tkfs_raw_open(struct inode *inode, struct file *file)
{
	struct path lower;
	struct file *lf;
	int err;

	/* fails (EIO) only when dirty pages cannot be stored (no key): the stored bytes
	 * are not the file's and none of them is served.  Not for takakryptd itself: a
	 * write-back needing a key would ask the very thread that waits here */
	if (!tkfs_is_agent()) {
		WRITE_ONCE(TKFS_I(inode)->keyless_wb, false);
		err = filemap_write_and_wait(inode->i_mapping);
		if (!err && READ_ONCE(TKFS_I(inode)->keyless_wb))
			err = -EIO;	/* pages left dirty: no key to store them */
		if (err)
			return err;
	}
	tkfs_lower_path(file->f_path.dentry, &lower);
	lf = dentry_open(&lower, file->f_flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC),
			 current_cred());
	path_put(&lower);
	if (IS_ERR(lf))
		return PTR_ERR(lf);
	file->private_data = lf;
	replace_fops(file, &tkfs_raw_fops);
	return 0;
}

static int raw_release(struct inode *inode, struct file *file)
{
	struct file *lf = lower_of(file);

	if (file->f_mode & FMODE_WRITE)
		tkfs_raw_changed(inode);
	fput(lf);
	return 0;
}

static ssize_t raw_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	struct file *lf = lower_of(iocb->ki_filp);
	ssize_t r;

	r = vfs_iter_read(lf, to, &iocb->ki_pos, 0);
	fsstack_copy_attr_atime(file_inode(iocb->ki_filp), file_inode(lf));
	return r;
}

static ssize_t raw_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	struct file *file = iocb->ki_filp, *lf = lower_of(file);
	ssize_t r;

	/* the mount inode's lock: a live rekey's range (rekey.c) is never interleaved
	 * with the stored bytes a restore writes */
	inode_lock(file_inode(file));
	file_start_write(lf);
	r = vfs_iter_write(lf, from, &iocb->ki_pos, 0);
	file_end_write(lf);
	inode_unlock(file_inode(file));
	if (r > 0)
		tkfs_raw_changed(file_inode(file));
	return r;
}

static loff_t raw_llseek(struct file *file, loff_t offset, int whence)
{
	struct file *lf = lower_of(file);
	loff_t r;

	lf->f_pos = file->f_pos;
	r = vfs_llseek(lf, offset, whence);
	file->f_pos = lf->f_pos;
	return r;
}

static int raw_fsync(struct file *file, loff_t start, loff_t end, int datasync)
{
	return vfs_fsync_range(lower_of(file), start, end, datasync);
}

/* the mapping is the lower file's: its pages are the stored bytes */
static int raw_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct file *lf = lower_of(file);

	if (!lf->f_op->mmap)
		return -ENODEV;
	vma_set_file(vma, lf);
	return call_mmap(lf, vma);
}

static long raw_fallocate(struct file *file, int mode, loff_t off, loff_t len)
{
	long r;

	inode_lock(file_inode(file));
	r = vfs_fallocate(lower_of(file), mode, off, len);
	inode_unlock(file_inode(file));

	if (!r && !(mode & FALLOC_FL_KEEP_SIZE))
		tkfs_raw_changed(file_inode(file));
	return r;
}

/* truncate in the raw view (a raw open's ftruncate or O_TRUNC, or a raw caller's
 * truncate(2)): the stored length (tkfs_setattr) */
int tkfs_raw_truncate(struct inode *inode, struct dentry *ld, loff_t len)
{
	struct iattr ia = { .ia_valid = ATTR_SIZE | ATTR_MTIME | ATTR_CTIME, .ia_size = len };
	int err;

	inode_lock(d_inode(ld));
	err = notify_change(&init_user_ns, ld, &ia, NULL);
	inode_unlock(d_inode(ld));
	if (!err)
		tkfs_raw_changed(inode);
	return err;
}

/*
 * copy_file_range with a raw open at either end: the VFS has clamped the length by the
 * mount's inode size, the plaintext size, which is not the raw length; refused with
 * EXDEV, on which cp and the rest copy by read and write (docs/kernel.md "Views").
 * Plaintext to plaintext: the page cache's ordinary copy.
 */
ssize_t tkfs_copy_file_range(struct file *in, loff_t pos_in, struct file *out, loff_t pos_out,
			     size_t len, unsigned int flags)
{
	if (in->f_op == &tkfs_raw_fops || out->f_op == &tkfs_raw_fops)
		return -EXDEV;
	return generic_copy_file_range(in, pos_in, out, pos_out, len, flags);
}

const struct file_operations tkfs_raw_fops = {
	.copy_file_range = tkfs_copy_file_range,
	.llseek = raw_llseek,
	.read_iter = raw_read_iter,
	.write_iter = raw_write_iter,
	.mmap = raw_mmap,
	.release = raw_release,
	.fsync = raw_fsync,
	.fallocate = raw_fallocate,
	.splice_read = generic_file_splice_read,
	.splice_write = iter_file_splice_write,
	.unlocked_ioctl = tkfs_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};
