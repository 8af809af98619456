// SPDX-License-Identifier: GPL-2.0
/*
 * file.c - open files.  A regular file's data goes through the page cache (aops.c) and
 * the inode's persistent lower file; a directory's open file wraps a lower one.
 *
 * O_DIRECT (docs/kernel.md): accepted and served through the page cache, a write being
 * stored before it returns (as ext4 does for encrypted files without inline crypto);
 * ciphertext blocks are not page aligned, so true direct I/O is impossible.
 */
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/uio.h>
#include <linux/cred.h>
#include <linux/fs_stack.h>
#include <linux/pagemap.h>
#include <linux/splice.h>

#include "tkfs.h"

/*
 * The inode's lower file for page I/O, opened with the mounter's credentials: read-write
 * if possible (a lower file being executed or a read-only lower fs give read-only).
 */
int tkfs_get_lower_file(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	struct dentry *ld;
	struct file *f;
	struct path p;
	int err = 0;

	if (READ_ONCE(ii->lower_file))
		return 0;
	mutex_lock(&ii->lower_lock);
	if (ii->lower_file)
		goto out;
	ld = d_find_any_alias(ii->lower_inode);
	if (!ld) {
		err = -ESTALE;
		goto out;
	}
	p.mnt = sbi->lower_root.mnt;
	p.dentry = ld;
	f = dentry_open(&p, O_RDWR | O_LARGEFILE, sbi->mounter_cred);
	if (IS_ERR(f))
		f = dentry_open(&p, O_RDONLY | O_LARGEFILE, sbi->mounter_cred);
	dput(ld);
	if (IS_ERR(f)) {
		err = PTR_ERR(f);
		goto out;
	}
	/* block and header writes leave the lower file's times alone: they happen at
	 * write-back, long after the write (and after a utimensat, as tar does); the
	 * writes themselves set the times (tkfs_file_modified) */
	f->f_mode |= FMODE_NOCMTIME;
	ii->lower_file = f;
out:
	mutex_unlock(&ii->lower_lock);
	return err;
}

/*
 * The open's view (docs/kernel.md "Views"): each access the open asks for is a decision
 * (read; write or append; truncate for O_TRUNC) and all must agree on the view: the
 * plaintext view (apply_key), or the raw view (the stored TAKA bytes, for backup and
 * restore).  Denied: EACCES.
 */
static int open_view(struct file *file, bool *raw)
{
	struct dentry *d = file->f_path.dentry;
	u32 acts[3], n = 0, i, eff, view = 0;
	int err;

	if (file->f_mode & FMODE_READ)
		acts[n++] = TAKAKRYPT_ACTION_READ;
	if (file->f_mode & FMODE_WRITE)
		acts[n++] = file->f_flags & O_APPEND ? TAKAKRYPT_ACTION_APPEND :
						       TAKAKRYPT_ACTION_WRITE;
	if ((file->f_flags & O_TRUNC) && (file->f_mode & FMODE_WRITE))
		acts[n++] = TAKAKRYPT_ACTION_TRUNCATE;
	if (!n)
		acts[n++] = TAKAKRYPT_ACTION_READ;	/* O_ACCMODE 3 (ioctls only): still asked */
	for (i = 0; i < n; i++) {
		err = tkfs_decide(d, acts[i], NULL, &eff);
		if (err)
			return err;
		eff &= TAKAKRYPT_EFFECT_APPLY_KEY;
		if (i && eff != view)
			return -EACCES;	/* one open, one view: a policy giving two is refused */
		view = eff;
	}
	*raw = !view;
	return 0;
}

static int tkfs_file_open(struct inode *inode, struct file *file)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	bool raw;
	int err;

	err = open_view(file, &raw);
	if (err)
		return err;
	if (raw)
		return tkfs_raw_open(inode, file);
	err = tkfs_get_lower_file(inode);
	if (err)
		return err;
	if ((file->f_mode & FMODE_WRITE) && !(ii->lower_file->f_mode & FMODE_WRITE))
		return -EROFS;
	/*
	 * The open that created the file: tkfs_create checked the key and queued the
	 * header's making (keys derived by a worker); there is nothing stored to load, so
	 * the open does not wait for that worker (key_sem)
	 */
	if (file->f_mode & FMODE_CREATED)
		goto ok;
	/* an empty file opened for writing gets its header at write-back or last close */
	if (READ_ONCE(ii->state) == TKFS_HDR_EMPTY && (file->f_mode & FMODE_WRITE)) {
		err = tkfs_key_available(inode);
		if (err)
			return err;
	}
	err = tkfs_ensure_keys(inode);
	if (err)
		return -EIO;
	up_read(&ii->key_sem);
ok:
	file->f_mode |= FMODE_CAN_ODIRECT;
	return 0;
}

static ssize_t tkfs_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	iocb->ki_flags &= ~IOCB_DIRECT;
	return generic_file_read_iter(iocb, to);
}

/*
 * A write or a shared-mmap store through the mount: the lower file's mtime and ctime
 * move now, as ext4's would, and the mount's inode shows them.
 */
static void tkfs_file_modified(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);

	if (ii->lower_file && (ii->lower_file->f_mode & FMODE_WRITE)) {
		file_update_time(ii->lower_file);
		fsstack_copy_attr_times(inode, ii->lower_inode);
	}
}

static ssize_t tkfs_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	bool direct = iocb->ki_flags & IOCB_DIRECT;
	ssize_t ret;
	int err;

	iocb->ki_flags &= ~IOCB_DIRECT;
	ret = generic_file_write_iter(iocb, from);
	if (ret > 0)
		tkfs_file_modified(file_inode(iocb->ki_filp));
	if (ret > 0 && direct) {
		struct inode *inode = file_inode(iocb->ki_filp);

		/* stored before it returns; a write that grew the file also gets the
		 * header's size, which waits for every dirty page (blocks before size) */
		err = filemap_write_and_wait_range(iocb->ki_filp->f_mapping,
						   iocb->ki_pos - ret, iocb->ki_pos - 1);
		if (!err && i_size_read(inode) != TKFS_I(inode)->disk_size) {
			err = filemap_write_and_wait(inode->i_mapping);
			if (!err)
				err = tkfs_commit_size(inode);
		}
		if (err)
			ret = err;
	}
	return ret;
}

static int tkfs_fsync(struct file *file, loff_t start, loff_t end, int datasync)
{
	struct inode *inode = file_inode(file);
	struct tkfs_inode *ii = TKFS_I(inode);
	int err;

	/* the whole file: the header's size is written once no page is dirty */
	err = file_write_and_wait(file);
	if (!err)
		err = tkfs_commit_size(inode);
	if (err)
		return err;
	return vfs_fsync(ii->lower_file, datasync);
}

static vm_fault_t tkfs_page_mkwrite(struct vm_fault *vmf)
{
	tkfs_file_modified(file_inode(vmf->vma->vm_file));
	return filemap_page_mkwrite(vmf);
}

static const struct vm_operations_struct tkfs_file_vm_ops = {
	.fault = filemap_fault,
	.map_pages = filemap_map_pages,
	.page_mkwrite = tkfs_page_mkwrite,
};

/*
 * A file created or opened empty for writing and left empty gets its header (size 0) at
 * its last close: the empty TAKA file is the header alone (docs/file-format.md).  Files
 * with data get theirs at write-back.  A failure leaves a lower file of length 0, which
 * both engines read as empty.
 */
static int tkfs_file_release(struct inode *inode, struct file *file)
{
	struct tkfs_inode *ii = TKFS_I(inode);

	if ((file->f_mode & FMODE_WRITE) &&
	    (READ_ONCE(ii->state) == TKFS_HDR_EMPTY || READ_ONCE(ii->hdr_pending)) &&
	    !i_size_read(inode) && !i_size_read(ii->lower_inode))
		tkfs_create_header(inode, true);
	return 0;
}

static int tkfs_file_mmap(struct file *file, struct vm_area_struct *vma)
{
	file_accessed(file);
	vma->vm_ops = &tkfs_file_vm_ops;
	return 0;
}

const struct file_operations tkfs_file_fops = {
	.llseek = generic_file_llseek,
	.read_iter = tkfs_read_iter,
	.write_iter = tkfs_write_iter,
	.mmap = tkfs_file_mmap,
	.open = tkfs_file_open,
	.release = tkfs_file_release,
	.fsync = tkfs_fsync,
	.splice_read = generic_file_splice_read,
	.splice_write = iter_file_splice_write,
	.copy_file_range = tkfs_copy_file_range,
	.unlocked_ioctl = tkfs_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

/* ---- directories -------------------------------------------------------------------- */

static int tkfs_dir_open(struct inode *inode, struct file *file)
{
	struct path lower;
	struct file *lf;
	u32 eff;
	int err;

	err = tkfs_decide(file->f_path.dentry, TAKAKRYPT_ACTION_LIST, NULL, &eff);
	if (err)
		return err;

	tkfs_lower_path(file->f_path.dentry, &lower);
	lf = dentry_open(&lower, file->f_flags, current_cred());
	path_put(&lower);
	if (IS_ERR(lf))
		return PTR_ERR(lf);
	file->private_data = lf;
	return 0;
}

static int tkfs_dir_release(struct inode *inode, struct file *file)
{
	if (file->private_data)
		fput(file->private_data);
	return 0;
}

static int tkfs_iterate(struct file *file, struct dir_context *ctx)
{
	struct file *lf = file->private_data;
	u32 eff;
	int err;

	err = tkfs_decide(file->f_path.dentry, TAKAKRYPT_ACTION_LIST, NULL, &eff);
	if (err)
		return err;
	lf->f_pos = ctx->pos;
	err = iterate_dir(lf, ctx);
	file->f_pos = lf->f_pos;
	if (err >= 0)
		fsstack_copy_attr_atime(file_inode(file), file_inode(lf));
	return err;
}

static loff_t tkfs_dir_llseek(struct file *file, loff_t offset, int whence)
{
	struct file *lf = file->private_data;
	loff_t r;

	lf->f_pos = file->f_pos;
	r = vfs_llseek(lf, offset, whence);
	if (r >= 0)
		file->f_pos = lf->f_pos;
	return r;
}

static int tkfs_dir_fsync(struct file *file, loff_t start, loff_t end, int datasync)
{
	return vfs_fsync_range(file->private_data, start, end, datasync);
}

const struct file_operations tkfs_dir_fops = {
	.llseek = tkfs_dir_llseek,
	.read = generic_read_dir,
	.iterate_shared = tkfs_iterate,
	.open = tkfs_dir_open,
	.release = tkfs_dir_release,
	.fsync = tkfs_dir_fsync,
};
