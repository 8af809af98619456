// SPDX-License-Identifier: GPL-2.0
/*
 * inode.c - names: lookup, create, mkdir, unlink, rename, links, symlinks, attributes
 * and extended attributes, each done on the lower directory with the caller's
 * credentials (the lower file system checks them and owns the new files by the caller).
 * Names and symlink targets are stored as they are (TAKA encrypts contents only).
 */
#include <linux/fs.h>
#include <linux/namei.h>
#include <linux/fs_stack.h>
#include <linux/pagemap.h>
#include <linux/xattr.h>
#include <linux/slab.h>
#include <linux/cred.h>

#include "tkfs.h"

/* the decision for an action on a name (decide.c); the view does not matter here */
static int may(struct dentry *dentry, u32 action, struct dentry *target)
{
	u32 eff;

	return tkfs_decide(dentry, action, target, &eff);
}

/* ---- dentries ----------------------------------------------------------------------- */

int tkfs_init_dentry(struct dentry *dentry, const struct path *lower)
{
	struct tkfs_dentry *d = kmem_cache_zalloc(tkfs_dentry_cachep, GFP_KERNEL);

	if (!d)
		return -ENOMEM;
	d->lower_path = *lower;
	d->id = tkfs_new_dentry_id();
	path_get(&d->lower_path);
	dentry->d_fsdata = d;
	return 0;
}

static void tkfs_d_release(struct dentry *dentry)
{
	struct tkfs_dentry *d = dentry->d_fsdata;

	if (d) {
		path_put(&d->lower_path);
		kmem_cache_free(tkfs_dentry_cachep, d);
	}
}

/*
 * A dentry stays valid while its lower dentry is hashed and agrees with it (positive or
 * negative, same inode): a change made in the lower directory behind the mount makes
 * the next lookup find it.  Only pointers are read, so it is safe in RCU walk.
 */
static int tkfs_d_revalidate(struct dentry *dentry, unsigned int flags)
{
	struct tkfs_dentry *d = READ_ONCE(dentry->d_fsdata);
	struct dentry *lower;
	struct inode *inode, *linode;

	if (!d)
		return 0;
	lower = d->lower_path.dentry;
	if (d_unhashed(lower))
		return 0;
	inode = d_inode_rcu(dentry);
	linode = d_inode_rcu(lower);
	if (!inode != !linode)
		return 0;
	if (inode && tkfs_lower_inode(inode) != linode)
		return 0;
	if (lower->d_flags & DCACHE_OP_REVALIDATE) {
		if (flags & LOOKUP_RCU)
			return -ECHILD;
		return lower->d_op->d_revalidate(lower, flags);
	}
	return 1;
}

const struct dentry_operations tkfs_dops = {
	.d_revalidate = tkfs_d_revalidate,
	.d_release = tkfs_d_release,
};

/* ---- inodes ------------------------------------------------------------------------- */

static int inode_test(struct inode *inode, void *lower)
{
	return tkfs_lower_inode(inode) == lower;
}

static int inode_set(struct inode *inode, void *lower)
{
	TKFS_I(inode)->lower_inode = lower;
	ihold(lower);
	inode->i_ino = ((struct inode *)lower)->i_ino;
	return 0;
}

/*
 * The upper inode of a lower one (hard links share it).  A regular file's lower file is
 * opened and its header read here, so `ls -l` shows the plaintext size; without its key
 * the stored size shows and the file's opens fail (EIO), as the FUSE engine does.
 */
struct inode *tkfs_iget(struct super_block *sb, struct inode *lower_inode)
{
	struct inode *inode;

	if (lower_inode->i_sb != TKFS_SB(sb)->lower_sb)
		return ERR_PTR(-EXDEV);
	inode = iget5_locked(sb, lower_inode->i_ino, inode_test, inode_set, lower_inode);
	if (!inode)
		return ERR_PTR(-ENOMEM);
	if (!(inode->i_state & I_NEW))
		return inode;
	fsstack_copy_attr_all(inode, lower_inode);
	switch (lower_inode->i_mode & S_IFMT) {
	case S_IFREG:
		inode->i_op = &tkfs_file_iops;
		inode->i_fop = &tkfs_file_fops;
		inode->i_mapping->a_ops = &tkfs_aops;
		i_size_write(inode, i_size_read(lower_inode));
		break;
	case S_IFDIR:
		inode->i_op = &tkfs_dir_iops;
		inode->i_fop = &tkfs_dir_fops;
		fsstack_copy_inode_size(inode, lower_inode);
		break;
	case S_IFLNK:
		inode->i_op = &tkfs_symlink_iops;
		fsstack_copy_inode_size(inode, lower_inode);
		break;
	default:
		inode->i_op = &tkfs_special_iops;
		init_special_inode(inode, lower_inode->i_mode, lower_inode->i_rdev);
		break;
	}
	unlock_new_inode(inode);
	if (S_ISREG(inode->i_mode)) {
		u64 plain;

		if (!i_size_read(lower_inode))
			tkfs_load_header(inode);	/* empty: no lower open needed */
		else if (tkfs_szc_get(TKFS_SB(sb), lower_inode, &plain))
			i_size_write(inode, plain);	/* header read at the first open */
		else if (!tkfs_get_lower_file(inode))
			tkfs_load_header(inode);	/* failure: shows the stored size */
	}
	return inode;
}

static int interpose(struct dentry *dentry, struct dentry *lower, struct super_block *sb)
{
	struct inode *inode = tkfs_iget(sb, d_inode(lower));

	if (IS_ERR(inode))
		return PTR_ERR(inode);
	d_instantiate(dentry, inode);
	return 0;
}

static struct dentry *tkfs_lookup(struct inode *dir, struct dentry *dentry, unsigned int flags)
{
	struct path lower_parent, lower;
	struct dentry *ld, *ret;
	struct inode *inode = NULL;
	int err;

	tkfs_lower_path(dentry->d_parent, &lower_parent);
	ld = lookup_one_len_unlocked(dentry->d_name.name, lower_parent.dentry,
				     dentry->d_name.len);
	if (IS_ERR(ld)) {
		path_put(&lower_parent);
		return ERR_CAST(ld);
	}
	lower.mnt = lower_parent.mnt;
	lower.dentry = ld;
	err = tkfs_init_dentry(dentry, &lower);
	fsstack_copy_attr_atime(dir, d_inode(lower_parent.dentry));
	path_put(&lower_parent);
	if (err) {
		dput(ld);
		return ERR_PTR(err);
	}
	if (d_really_is_positive(ld)) {
		inode = tkfs_iget(dir->i_sb, d_inode(ld));
		if (IS_ERR(inode)) {
			dput(ld);
			return ERR_CAST(inode);
		}
	}
	dput(ld);
	ret = d_splice_alias(inode, dentry);
	return ret;
}

static struct dentry *lock_parent(struct dentry *d)
{
	struct dentry *dir = dget_parent(d);

	inode_lock_nested(d_inode(dir), I_MUTEX_PARENT);
	return dir;
}

static void unlock_dir(struct dentry *dir)
{
	inode_unlock(d_inode(dir));
	dput(dir);
}

static void copy_dir_attrs(struct inode *dir, struct dentry *lower_dir)
{
	fsstack_copy_attr_times(dir, d_inode(lower_dir));
	fsstack_copy_inode_size(dir, d_inode(lower_dir));
	set_nlink(dir, d_inode(lower_dir)->i_nlink);
}

static int tkfs_create(struct user_namespace *ns, struct inode *dir, struct dentry *dentry,
		       umode_t mode, bool excl)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_CREATE, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	err = vfs_create(&init_user_ns, d_inode(ldir), ld, mode, excl);
	if (!err)
		err = interpose(dentry, ld, dir->i_sb);
	if (!err) {
		/* a new file: its header comes with its first write-back, or at its last
		 * close if it stays empty (file.c); without the key, no file */
		err = tkfs_get_lower_file(d_inode(dentry));
		if (!err)
			err = tkfs_key_available(d_inode(dentry));
		if (!err)
			tkfs_prepare_new(d_inode(dentry));
		if (err) {
			vfs_unlink(&init_user_ns, d_inode(ldir), ld, NULL);
			d_drop(dentry);
		}
	}
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	return err;
}

static int tkfs_mkdir(struct user_namespace *ns, struct inode *dir, struct dentry *dentry,
		      umode_t mode)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_MKDIR, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	err = vfs_mkdir(&init_user_ns, d_inode(ldir), ld, mode);
	if (!err) {
		if (d_really_is_negative(ld) || d_unhashed(ld))
			d_drop(dentry);	/* the lower fs did not instantiate it: look it up */
		else
			err = interpose(dentry, ld, dir->i_sb);
	}
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	return err;
}

static int tkfs_mknod(struct user_namespace *ns, struct inode *dir, struct dentry *dentry,
		      umode_t mode, dev_t rdev)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_CREATE, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	err = vfs_mknod(&init_user_ns, d_inode(ldir), ld, mode, rdev);
	if (!err)
		err = interpose(dentry, ld, dir->i_sb);
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	return err;
}

static int tkfs_symlink(struct user_namespace *ns, struct inode *dir, struct dentry *dentry,
			const char *target)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_CREATE, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	err = vfs_symlink(&init_user_ns, d_inode(ldir), ld, target);
	if (!err)
		err = interpose(dentry, ld, dir->i_sb);
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	return err;
}

static int tkfs_link(struct dentry *old, struct inode *dir, struct dentry *new)
{
	struct dentry *lold = tkfs_lower_dentry(old), *lnew = tkfs_lower_dentry(new), *ldir;
	int err;

	err = may(old, TAKAKRYPT_ACTION_LINK, new);
	if (!err)
		err = may(new, TAKAKRYPT_ACTION_LINK, new);
	if (err)
		return err;
	dget(lold);
	dget(lnew);
	ldir = lock_parent(lnew);
	err = vfs_link(lold, &init_user_ns, d_inode(ldir), lnew, NULL);
	if (!err && d_really_is_positive(lnew)) {
		err = interpose(new, lnew, dir->i_sb);
		set_nlink(d_inode(old), d_inode(lold)->i_nlink);
	}
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(lnew);
	dput(lold);
	return err;
}

static int tkfs_unlink(struct inode *dir, struct dentry *dentry)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	struct inode *inode = d_inode(dentry);
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_DELETE, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	if (ld->d_parent != ldir || d_unhashed(ld)) {
		err = -EINVAL;	/* changed in the lower directory behind the mount */
	} else {
		err = vfs_unlink(&init_user_ns, d_inode(ldir), ld, NULL);
	}
	if (!err) {
		set_nlink(inode, tkfs_lower_inode(inode)->i_nlink);
		inode->i_ctime = dir->i_ctime;
	}
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	if (!err)
		d_drop(dentry);	/* its lower dentry is gone: the next lookup makes a new one */
	return err;
}

static int tkfs_rmdir(struct inode *dir, struct dentry *dentry)
{
	struct dentry *ld = tkfs_lower_dentry(dentry), *ldir;
	int err;

	err = may(dentry, TAKAKRYPT_ACTION_RMDIR, NULL);
	if (err)
		return err;
	dget(ld);
	ldir = lock_parent(ld);
	if (ld->d_parent != ldir || d_unhashed(ld))
		err = -EINVAL;
	else
		err = vfs_rmdir(&init_user_ns, d_inode(ldir), ld);
	if (!err)
		clear_nlink(d_inode(dentry));
	copy_dir_attrs(dir, ldir);
	unlock_dir(ldir);
	dput(ld);
	if (!err)
		d_drop(dentry);
	return err;
}

static int tkfs_rename(struct user_namespace *ns, struct inode *old_dir, struct dentry *old,
		       struct inode *new_dir, struct dentry *new, unsigned int flags)
{
	struct dentry *lold = tkfs_lower_dentry(old), *lnew = tkfs_lower_dentry(new);
	struct dentry *lold_dir, *lnew_dir, *trap;
	struct renamedata rd = {};
	int err;

	if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE))
		return -EINVAL;
	err = may(old, TAKAKRYPT_ACTION_RENAME, new);
	if (!err)
		err = may(new, TAKAKRYPT_ACTION_RENAME, new);
	if (err)
		return err;
	dget(lold);
	dget(lnew);
	lold_dir = dget_parent(lold);
	lnew_dir = dget_parent(lnew);
	trap = lock_rename(lold_dir, lnew_dir);
	err = -EINVAL;
	if (lold->d_parent != lold_dir || lnew->d_parent != lnew_dir)
		goto out;	/* moved in the lower directory behind the mount */
	if (trap == lold)
		goto out;	/* source is an ancestor of the target */
	if (trap == lnew) {
		err = -ENOTEMPTY;
		goto out;
	}
	rd.old_mnt_userns = &init_user_ns;
	rd.old_dir = d_inode(lold_dir);
	rd.old_dentry = lold;
	rd.new_mnt_userns = &init_user_ns;
	rd.new_dir = d_inode(lnew_dir);
	rd.new_dentry = lnew;
	rd.flags = flags;
	err = vfs_rename(&rd);
	if (err)
		goto out;
	/* the paths below the moved names changed: cached decisions by name go */
	atomic_inc(&TKFS_SB(old->d_sb)->name_gen);
	fsstack_copy_attr_all(new_dir, d_inode(lnew_dir));
	fsstack_copy_inode_size(new_dir, d_inode(lnew_dir));
	if (new_dir != old_dir) {
		fsstack_copy_attr_all(old_dir, d_inode(lold_dir));
		fsstack_copy_inode_size(old_dir, d_inode(lold_dir));
	}
out:
	unlock_rename(lold_dir, lnew_dir);
	dput(lnew_dir);
	dput(lold_dir);
	dput(lnew);
	dput(lold);
	return err;
}

static const char *tkfs_get_link(struct dentry *dentry, struct inode *inode,
				 struct delayed_call *done)
{
	int err;

	if (!dentry)
		return ERR_PTR(-ECHILD);
	err = may(dentry, TAKAKRYPT_ACTION_READ, NULL);
	if (err)
		return ERR_PTR(err);
	return vfs_get_link(tkfs_lower_dentry(dentry), done);
}

static int tkfs_permission(struct user_namespace *ns, struct inode *inode, int mask)
{
	return inode_permission(&init_user_ns, tkfs_lower_inode(inode), mask);
}

static int tkfs_setattr(struct user_namespace *ns, struct dentry *dentry, struct iattr *ia)
{
	struct inode *inode = d_inode(dentry);
	struct dentry *ld = tkfs_lower_dentry(dentry);
	struct inode *linode = tkfs_lower_inode(inode);
	struct iattr lia;
	u32 teff = 0;
	bool raw = false;
	int err;

	err = setattr_prepare(&init_user_ns, dentry, ia);
	if (err)
		return err;
	/*
	 * O_TRUNC was decided at open (ATTR_OPEN); ftruncate and truncate ask `truncate`;
	 * mode, owner and times ask `setattr` (not the times a truncate moves, nor what the
	 * kernel does itself, ATTR_FORCE: suid bits dropped by a write)
	 */
	if ((ia->ia_valid & ATTR_SIZE) && !(ia->ia_valid & ATTR_OPEN)) {
		err = tkfs_decide(dentry, TAKAKRYPT_ACTION_TRUNCATE, NULL, &teff);
		raw = !(teff & TAKAKRYPT_EFFECT_APPLY_KEY);
	}
	if ((ia->ia_valid & ATTR_FILE) && ia->ia_file->f_op == &tkfs_raw_fops)
		raw = true;	/* a raw open's ftruncate or O_TRUNC: its view */
	if (!err && !(ia->ia_valid & ATTR_FORCE) &&
	    ((ia->ia_valid & (ATTR_MODE | ATTR_UID | ATTR_GID | ATTR_ATIME_SET |
			      ATTR_MTIME_SET | ATTR_TOUCH)) ||
	     (!(ia->ia_valid & ATTR_SIZE) && (ia->ia_valid & (ATTR_ATIME | ATTR_MTIME)))))
		err = may(dentry, TAKAKRYPT_ACTION_SETATTR, NULL);
	if (err)
		return err;
	if ((ia->ia_valid & ATTR_SIZE) && raw && S_ISREG(inode->i_mode)) {
		/* the stored length, with the times the truncate moves */
		err = tkfs_raw_truncate(inode, ld, ia->ia_size);
		if (err || !(ia->ia_valid & ~(ATTR_SIZE | ATTR_FILE | ATTR_OPEN | ATTR_MTIME |
					      ATTR_CTIME)))
			return err;
		ia->ia_valid &= ~ATTR_SIZE;
	}
	if ((ia->ia_valid & ATTR_SIZE) && S_ISREG(inode->i_mode)) {
		err = tkfs_get_lower_file(inode);
		/* to 0 also when empty already: a header on an older version is renewed */
		if (!err && (ia->ia_size != i_size_read(inode) || !ia->ia_size))
			err = tkfs_setsize(inode, ia->ia_size);
		if (err)
			return err;
	}
	lia = *ia;
	lia.ia_valid &= ~(ATTR_FILE | ATTR_OPEN);
	if (S_ISREG(inode->i_mode))
		lia.ia_valid &= ~ATTR_SIZE;	/* done above, in stored bytes */
	/* notify_change must not see ATTR_MODE with ATTR_KILL_S*ID (it recomputes them) */
	if (lia.ia_valid & (ATTR_KILL_SUID | ATTR_KILL_SGID))
		lia.ia_valid &= ~ATTR_MODE;
	if (lia.ia_valid & ~(ATTR_KILL_SUID | ATTR_KILL_SGID | ATTR_KILL_PRIV)) {
		inode_lock(linode);
		err = notify_change(&init_user_ns, ld, &lia, NULL);
		inode_unlock(linode);
	}
	fsstack_copy_attr_all(inode, linode);
	if (!S_ISREG(inode->i_mode))
		fsstack_copy_inode_size(inode, linode);
	return err;
}

static int tkfs_getattr(struct user_namespace *ns, const struct path *path,
			struct kstat *stat, u32 mask, unsigned int flags)
{
	struct inode *inode = d_inode(path->dentry);
	struct tkfs_inode *ii = TKFS_I(inode);
	struct kstat lstat;
	struct path lower;
	u32 eff;
	int err;

	err = tkfs_decide(path->dentry, TAKAKRYPT_ACTION_GETATTR, NULL, &eff);
	if (err)
		return err;
	/* the raw view's size is the stored length: the plaintext view's dirty pages are
	 * stored first, as a raw open does (raw.c), or a backup tool would take the length
	 * of the last write-back (an empty file before the first) and archive that much.
	 * A failure (no key) leaves the error to fsync and the raw open: the stored length
	 * as it is */
	if (S_ISREG(inode->i_mode) && !(eff & TAKAKRYPT_EFFECT_APPLY_KEY) &&
	    inode->i_mapping->nrpages && !tkfs_is_agent() &&
	    !filemap_fdatawrite(inode->i_mapping))
		filemap_fdatawait_keep_errors(inode->i_mapping);
	tkfs_lower_path(path->dentry, &lower);
	err = vfs_getattr(&lower, &lstat, mask, flags);
	path_put(&lower);
	if (err)
		return err;
	fsstack_copy_attr_all(inode, ii->lower_inode);
	generic_fillattr(&init_user_ns, inode, stat);
	stat->blocks = lstat.blocks;
	if (S_ISREG(inode->i_mode) && !(eff & TAKAKRYPT_EFFECT_APPLY_KEY)) {
		stat->size = lstat.size;	/* the raw view: the stored length */
	} else if (S_ISREG(inode->i_mode)) {
		u64 plain;

		if (ii->state == TKFS_HDR_UNKNOWN &&
		    tkfs_szc_get(TKFS_SB(inode->i_sb), ii->lower_inode, &plain)) {
			stat->size = plain;
			return 0;
		}
		/* a header not loaded yet (no agent at lookup) is tried again */
		if (ii->state == TKFS_HDR_UNKNOWN && tkfs_agent_present() &&
		    !tkfs_get_lower_file(inode))
			tkfs_load_header(inode);
		if (ii->state != TKFS_HDR_OK && ii->state != TKFS_HDR_EMPTY)
			stat->size = lstat.size;	/* no plaintext size known: the stored one */
	} else {
		stat->size = lstat.size;
	}
	return 0;
}

static ssize_t tkfs_listxattr(struct dentry *dentry, char *list, size_t size)
{
	int err = may(dentry, TAKAKRYPT_ACTION_GETXATTR, NULL);

	if (err)
		return err;
	return vfs_listxattr(tkfs_lower_dentry(dentry), list, size);
}

/* user.* names are the policy's (getxattr/setxattr); security.* and the rest are the
 * kernel's own business (capabilities read at exec, LSM labels) and pass */
static bool policy_xattr(const char *name)
{
	return !strncmp(name, XATTR_USER_PREFIX, XATTR_USER_PREFIX_LEN);
}

static int xattr_get(const struct xattr_handler *h, struct dentry *dentry, struct inode *inode,
		     const char *name, void *buf, size_t size)
{
	if (policy_xattr(name)) {
		int err = may(dentry, TAKAKRYPT_ACTION_GETXATTR, NULL);

		if (err)
			return err;
	}
	return vfs_getxattr(&init_user_ns, tkfs_lower_dentry(dentry), name, buf, size);
}

static int xattr_set(const struct xattr_handler *h, struct user_namespace *ns,
		     struct dentry *dentry, struct inode *inode, const char *name,
		     const void *value, size_t size, int flags)
{
	struct dentry *ld = tkfs_lower_dentry(dentry);
	int err;

	if (policy_xattr(name)) {
		err = may(dentry, TAKAKRYPT_ACTION_SETXATTR, NULL);
		if (err)
			return err;
	}
	if (value)
		err = vfs_setxattr(&init_user_ns, ld, name, value, size, flags);
	else
		err = vfs_removexattr(&init_user_ns, ld, name);
	if (!err && inode)
		fsstack_copy_attr_all(inode, d_inode(ld));
	return err;
}

/* every name goes to the lower inode as it is */
static const struct xattr_handler tkfs_xattr_handler = {
	.prefix = "",
	.get = xattr_get,
	.set = xattr_set,
};

const struct xattr_handler *tkfs_xattr_handlers[] = {
	&tkfs_xattr_handler,
	NULL,
};

const struct inode_operations tkfs_dir_iops = {
	.lookup = tkfs_lookup,
	.create = tkfs_create,
	.mkdir = tkfs_mkdir,
	.mknod = tkfs_mknod,
	.symlink = tkfs_symlink,
	.link = tkfs_link,
	.unlink = tkfs_unlink,
	.rmdir = tkfs_rmdir,
	.rename = tkfs_rename,
	.permission = tkfs_permission,
	.setattr = tkfs_setattr,
	.getattr = tkfs_getattr,
	.listxattr = tkfs_listxattr,
};

const struct inode_operations tkfs_file_iops = {
	.permission = tkfs_permission,
	.setattr = tkfs_setattr,
	.getattr = tkfs_getattr,
	.listxattr = tkfs_listxattr,
};

const struct inode_operations tkfs_symlink_iops = {
	.get_link = tkfs_get_link,
	.permission = tkfs_permission,
	.setattr = tkfs_setattr,
	.getattr = tkfs_getattr,
	.listxattr = tkfs_listxattr,
};

const struct inode_operations tkfs_special_iops = {
	.permission = tkfs_permission,
	.setattr = tkfs_setattr,
	.getattr = tkfs_getattr,
	.listxattr = tkfs_listxattr,
};
