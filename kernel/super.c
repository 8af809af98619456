// SPDX-License-Identifier: GPL-2.0
/*
 * super.c - the file system type, mounts and the module.
 *
 *   mount -t takakryptfs -o key=NAME[,gp=ID][,format=1|2] LOWERDIR MOUNTPOINT
 *
 * LOWERDIR may be MOUNTPOINT itself (an in-place guard point: the lower directory is
 * resolved before the mount covers it).  key= names the data key new files are
 * encrypted with; gp= is the agent's guard point id (CONFIG_UPDATE), 0 = any; format=
 * the TAKA version new files are made in (default 1; files of both are read and written).
 */
#include <linux/module.h>
#include <linux/fs.h>
#include <linux/namei.h>
#include <linux/parser.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/statfs.h>
#include <linux/pagemap.h>
#include <linux/cred.h>
#include <linux/fs_stack.h>
#include <linux/file.h>
#include <linux/ctype.h>

#include "tkfs.h"

struct kmem_cache *tkfs_inode_cachep;
struct kmem_cache *tkfs_dentry_cachep;
DEFINE_MUTEX(tkfs_mounts_lock);
LIST_HEAD(tkfs_mounts);

/* ---- inodes ------------------------------------------------------------------------- */

static struct inode *tkfs_alloc_inode(struct super_block *sb)
{
	struct tkfs_inode *ii = alloc_inode_sb(sb, tkfs_inode_cachep, GFP_KERNEL);

	if (!ii)
		return NULL;
	ii->lower_inode = NULL;
	ii->lower_file = NULL;
	ii->state = TKFS_HDR_UNKNOWN;
	ii->bad_errno = 0;
	ii->key_epoch = 0;
	ii->disk_size = 0;
	ii->enc_count = 0;
	ii->tail_cut = false;
	ii->hdr_pending = false;
	ii->aead = NULL;
	ii->aead_ver = 0;
	ii->nvkeys = 0;
	memset(&ii->hdr, 0, sizeof(ii->hdr));
	memset(ii->enc_key, 0, sizeof(ii->enc_key));
	memset(ii->mac_key, 0, sizeof(ii->mac_key));
	return &ii->vfs_inode;
}

static void tkfs_free_inode(struct inode *inode)
{
	kmem_cache_free(tkfs_inode_cachep, TKFS_I(inode));
}

static void tkfs_inode_once(void *p)
{
	struct tkfs_inode *ii = p;

	inode_init_once(&ii->vfs_inode);
	mutex_init(&ii->lower_lock);
	init_rwsem(&ii->key_sem);
	mutex_init(&ii->hdr_lock);
	spin_lock_init(&ii->vkeys_lock);
	tkfs_work_init_once(ii);
}

static void tkfs_evict_inode(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);

	tkfs_work_cancel(ii);
	/* a verified size with every block and the size stored: kept for the next stat */
	if (S_ISREG(inode->i_mode) && ii->lower_inode && ii->state == TKFS_HDR_OK &&
	    ii->key_epoch > 0 && inode->i_nlink && ii->lower_inode->i_nlink &&
	    i_size_read(inode) == ii->disk_size &&
	    !mapping_tagged(&inode->i_data, PAGECACHE_TAG_DIRTY) &&
	    !mapping_tagged(&inode->i_data, PAGECACHE_TAG_WRITEBACK))
		tkfs_szc_put(TKFS_SB(inode->i_sb), ii->lower_inode, ii->disk_size, ii->key_epoch);
	truncate_inode_pages_final(&inode->i_data);
	clear_inode(inode);
	tkfs_drop_keys(ii);
	memzero_explicit(&ii->hdr, sizeof(ii->hdr));
	if (ii->lower_file)
		fput(ii->lower_file);
	ii->lower_file = NULL;
	iput(ii->lower_inode);
	ii->lower_inode = NULL;
}

/*
 * The agent withdrew the keys (or the mount goes away): every inode's file keys are
 * dropped and its clean plaintext pages discarded; a later access asks for the key again.
 */
void tkfs_wipe_sb_keys(struct super_block *sb)
{
	struct inode *inode, *prev = NULL;

	spin_lock(&sb->s_inode_list_lock);
	list_for_each_entry(inode, &sb->s_inodes, i_sb_list) {
		spin_lock(&inode->i_lock);
		if (inode->i_state & (I_FREEING | I_WILL_FREE | I_NEW)) {
			spin_unlock(&inode->i_lock);
			continue;
		}
		__iget(inode);
		spin_unlock(&inode->i_lock);
		spin_unlock(&sb->s_inode_list_lock);
		iput(prev);
		prev = inode;

		down_write(&TKFS_I(inode)->key_sem);
		tkfs_drop_keys(TKFS_I(inode));
		if (TKFS_I(inode)->state == TKFS_HDR_OK)
			TKFS_I(inode)->key_epoch = -1;	/* derive again before any use */
		up_write(&TKFS_I(inode)->key_sem);
		invalidate_mapping_pages(inode->i_mapping, 0, -1);

		spin_lock(&sb->s_inode_list_lock);
	}
	spin_unlock(&sb->s_inode_list_lock);
	iput(prev);
}

static void tkfs_wipe_work(struct work_struct *w)
{
	tkfs_wipe_sb_keys(container_of(w, struct tkfs_sb, wipe_work)->sb);
}

static void tkfs_grace_work(struct work_struct *w)
{
	struct tkfs_sb *sbi = container_of(to_delayed_work(w), struct tkfs_sb, grace_work);

	pr_info(TKFS_NAME ": %s: no agent for %u s: keys wiped\n", sbi->lower_name,
		sbi->grace);
	tkfs_keys_wipe(sbi);
	tkfs_wipe_sb_keys(sbi->sb);
}

/*
 * The agent went away without withdrawing the keys (killed, crashed): a mount keeps them
 * for its grace= seconds (default 0: wiped now), then every key and file key goes; the
 * agent's return within the grace keeps them.  Dirty pages that need a key meanwhile stay
 * dirty (aops.c) until the agent is back.
 */
void tkfs_agent_gone(void)
{
	struct tkfs_sb *sbi;

	mutex_lock(&tkfs_mounts_lock);
	list_for_each_entry(sbi, &tkfs_mounts, all)
		mod_delayed_work(system_wq, &sbi->grace_work, (unsigned long)sbi->grace * HZ);
	mutex_unlock(&tkfs_mounts_lock);
}

void tkfs_agent_back(void)
{
	struct tkfs_sb *sbi;

	mutex_lock(&tkfs_mounts_lock);
	list_for_each_entry(sbi, &tkfs_mounts, all)
		cancel_delayed_work(&sbi->grace_work);
	mutex_unlock(&tkfs_mounts_lock);
}

/* ---- super block -------------------------------------------------------------------- */

static int tkfs_statfs(struct dentry *dentry, struct kstatfs *buf)
{
	struct path lower;
	u32 eff;
	int err;

	err = tkfs_decide(dentry, TAKAKRYPT_ACTION_GETATTR, NULL, &eff);
	if (err)
		return err;
	tkfs_lower_path(dentry, &lower);
	err = vfs_statfs(&lower, buf);
	path_put(&lower);
	buf->f_type = TKFS_MAGIC;
	return err;
}

static int tkfs_show_options(struct seq_file *m, struct dentry *root)
{
	struct tkfs_sb *sbi = TKFS_SB(root->d_sb);

	seq_printf(m, ",key=%s", sbi->key_name);
	if (sbi->gp_id)
		seq_printf(m, ",gp=%u", sbi->gp_id);
	seq_puts(m, sbi->decide ? ",decide=agent" : ",decide=none");
	if (sbi->grace)
		seq_printf(m, ",grace=%u", sbi->grace);
	seq_printf(m, ",format=%u", sbi->format);
	return 0;
}

static const struct super_operations tkfs_sops = {
	.alloc_inode = tkfs_alloc_inode,
	.free_inode = tkfs_free_inode,
	.evict_inode = tkfs_evict_inode,
	.statfs = tkfs_statfs,
	.show_options = tkfs_show_options,
	/* no .drop_inode = generic_delete_inode (as pass-through stacks use): an inode
	 * dropped at its last iput would lose its dirty plaintext pages unwritten */
};

enum { OPT_KEY, OPT_GP, OPT_DECIDE_AGENT, OPT_DECIDE_NONE, OPT_GRACE, OPT_FORMAT, OPT_ERR };
static const match_table_t tkfs_tokens = {
	{ OPT_KEY, "key=%s" },
	{ OPT_FORMAT, "format=%u" },
	{ OPT_GP, "gp=%u" },
	{ OPT_GRACE, "grace=%u" },
	{ OPT_DECIDE_AGENT, "decide=agent" },
	{ OPT_DECIDE_NONE, "decide=none" },
	{ OPT_ERR, NULL },
};

static bool key_name_ok(const char *s)
{
	size_t i, n = strlen(s);

	if (n < 1 || n > TAKA_KEYID_MAX || s[0] == '.' || s[0] == '-')
		return false;
	for (i = 0; i < n; i++)
		if (!isalnum(s[i]) && s[i] != '_' && s[i] != '.' && s[i] != '-')
			return false;
	return true;
}

static int parse_options(struct tkfs_sb *sbi, char *opts)
{
	substring_t args[MAX_OPT_ARGS];
	char *p;
	int v;

	while (opts && (p = strsep(&opts, ",")) != NULL) {
		if (!*p)
			continue;
		switch (match_token(p, tkfs_tokens, args)) {
		case OPT_KEY:
			if (match_strlcpy(sbi->key_name, &args[0], sizeof(sbi->key_name)) >=
			    sizeof(sbi->key_name) || !key_name_ok(sbi->key_name)) {
				pr_err(TKFS_NAME ": key= must be a key name (1..63 of [A-Za-z0-9._-])\n");
				return -EINVAL;
			}
			break;
		case OPT_GP:
			if (match_int(&args[0], &v) || v < 0)
				return -EINVAL;
			sbi->gp_id = v;
			break;
		case OPT_DECIDE_AGENT:
			sbi->decide = true;
			break;
		case OPT_GRACE:
			if (match_int(&args[0], &v) || v < 0 || v > 86400)
				return -EINVAL;
			sbi->grace = v;
			break;
		case OPT_DECIDE_NONE:
			sbi->decide = false;
			break;
		case OPT_FORMAT:
			if (match_int(&args[0], &v) || (v != 1 && v != 2)) {
				pr_err(TKFS_NAME ": format= must be 1 or 2\n");
				return -EINVAL;
			}
			sbi->format = v;
			break;
		default:
			pr_err(TKFS_NAME ": unknown mount option \"%s\"\n", p);
			return -EINVAL;
		}
	}
	if (!sbi->key_name[0]) {
		pr_err(TKFS_NAME ": the key= mount option is required\n");
		return -EINVAL;
	}
	if (sbi->decide && !sbi->gp_id) {
		pr_err(TKFS_NAME ": decide=agent needs gp= (the agent's guard point id)\n");
		return -EINVAL;
	}
	return 0;
}

struct tkfs_mount_data {
	const char *dev_name;
	char *opts;
};

static int tkfs_fill_super(struct super_block *sb, void *data, int silent)
{
	struct tkfs_mount_data *md = data;
	struct tkfs_sb *sbi;
	struct inode *inode;
	struct super_block *lsb;
	int err;

	if (!md->dev_name || !*md->dev_name)
		return -EINVAL;
	sbi = kzalloc(sizeof(*sbi), GFP_KERNEL);
	if (!sbi)
		return -ENOMEM;
	mutex_init(&sbi->keys_lock);
	INIT_LIST_HEAD(&sbi->keys);
	INIT_LIST_HEAD(&sbi->all);
	INIT_WORK(&sbi->wipe_work, tkfs_wipe_work);
	INIT_DELAYED_WORK(&sbi->grace_work, tkfs_grace_work);
	atomic_set(&sbi->key_epoch, 1);
	sbi->decide = true;		/* every access is the agent's decision by default */
	sbi->format = 1;		/* TAKA v1 for new files unless format=2 */
	sbi->sb = sb;
	sb->s_fs_info = sbi;
	err = tkfs_szc_init(sbi);
	if (err)
		return err;
	err = tkfs_dc_init(sbi);
	if (err)
		return err;
	err = parse_options(sbi, md->opts);
	if (err)
		return err;	/* put_super frees sbi */
	sbi->lower_name = kstrdup(md->dev_name, GFP_KERNEL);
	if (!sbi->lower_name)
		return -ENOMEM;
	err = kern_path(md->dev_name, LOOKUP_FOLLOW | LOOKUP_DIRECTORY, &sbi->lower_root);
	if (err) {
		pr_err(TKFS_NAME ": lower directory %s: error %d\n", md->dev_name, err);
		return err;
	}
	sbi->mounter_cred = get_current_cred();
	lsb = sbi->lower_root.dentry->d_sb;
	sbi->lower_sb = lsb;
	sb->s_stack_depth = lsb->s_stack_depth + 1;
	if (sb->s_stack_depth > FILESYSTEM_MAX_STACK_DEPTH) {
		pr_err(TKFS_NAME ": maximum stacking depth exceeded\n");
		return -EINVAL;
	}
	/* the plaintext bound whose stored form still fits the lower file system */
	/* our own backing device: writeback of the plaintext pages (noop_bdi has none) */
	err = super_setup_bdi(sb);
	if (err)
		return err;
	sb->s_maxbytes = div_u64(lsb->s_maxbytes - TAKA_HDR_SIZE, TKFS_STORED_BS) * TKFS_BS;
	sb->s_blocksize = PAGE_SIZE;
	sb->s_blocksize_bits = PAGE_SHIFT;
	sb->s_magic = TKFS_MAGIC;
	sb->s_op = &tkfs_sops;
	sb->s_xattr = tkfs_xattr_handlers;
	sb->s_d_op = &tkfs_dops;
	sb->s_time_gran = lsb->s_time_gran;
	sb->s_flags |= lsb->s_flags & (SB_RDONLY | SB_NOSEC);

	inode = tkfs_iget(sb, d_inode(sbi->lower_root.dentry));
	if (IS_ERR(inode))
		return PTR_ERR(inode);
	sb->s_root = d_make_root(inode);
	if (!sb->s_root)
		return -ENOMEM;
	err = tkfs_init_dentry(sb->s_root, &sbi->lower_root);
	if (err)
		return err;
	if (!sbi->decide)
		pr_warn(TKFS_NAME ": %s mounted with decide=none: no access control, every caller gets plaintext (tests only)\n",
			md->dev_name);
	mutex_lock(&tkfs_mounts_lock);
	tkfs_gp_attach(sbi);
	list_add(&sbi->all, &tkfs_mounts);
	mutex_unlock(&tkfs_mounts_lock);
	return 0;
}

static struct dentry *tkfs_mount(struct file_system_type *fs_type, int flags,
				 const char *dev_name, void *opts)
{
	struct tkfs_mount_data md = { .dev_name = dev_name, .opts = opts };

	return mount_nodev(fs_type, flags, &md, tkfs_fill_super);
}

/* also after a failed fill_super, where put_super would not run */
static void tkfs_kill_sb(struct super_block *sb)
{
	struct tkfs_sb *sbi = TKFS_SB(sb);

	if (sbi) {
		mutex_lock(&tkfs_mounts_lock);
		list_del_init(&sbi->all);
		mutex_unlock(&tkfs_mounts_lock);
		cancel_delayed_work_sync(&sbi->grace_work);
		cancel_work_sync(&sbi->wipe_work);
	}
	kill_anon_super(sb);
	if (!sbi)
		return;
	tkfs_keys_wipe(sbi);
	path_put(&sbi->lower_root);
	if (sbi->mounter_cred)
		put_cred(sbi->mounter_cred);
	kfree(sbi->lower_name);
	tkfs_szc_exit(sbi);
	tkfs_dc_exit(sbi);
	kfree(rcu_dereference_protected(sbi->gp, 1));
	kfree(sbi);
}

struct file_system_type tkfs_fs_type = {
	.owner = THIS_MODULE,
	.name = TKFS_NAME,
	.mount = tkfs_mount,
	.kill_sb = tkfs_kill_sb,
	.fs_flags = 0,
};
MODULE_ALIAS_FS(TKFS_NAME);

/* ---- module ------------------------------------------------------------------------- */

static int __init tkfs_init(void)
{
	int err;

	err = tkfs_crypto_init();
	if (err) {
		pr_err(TKFS_NAME ": gcm(aes) or hmac(sha256) unavailable: %d\n", err);
		return err;
	}
	err = -ENOMEM;
	tkfs_inode_cachep = kmem_cache_create("takakryptfs_inode", sizeof(struct tkfs_inode),
					      0, SLAB_RECLAIM_ACCOUNT | SLAB_ACCOUNT,
					      tkfs_inode_once);
	tkfs_dentry_cachep = KMEM_CACHE(tkfs_dentry, SLAB_RECLAIM_ACCOUNT);
	if (!tkfs_inode_cachep || !tkfs_dentry_cachep)
		goto fail;
	err = tkfs_io_init();
	if (err)
		goto fail;
	err = tkfs_nl_init();
	if (err) {
		tkfs_io_exit();
		goto fail;
	}
	err = register_filesystem(&tkfs_fs_type);
	if (err) {
		tkfs_nl_exit();
		tkfs_io_exit();
		goto fail;
	}
	pr_info(TKFS_NAME ": loaded (TAKA v1, page-size blocks, generic netlink family \"%s\")\n",
		TAKAKRYPT_GENL_NAME);
	return 0;
fail:
	kmem_cache_destroy(tkfs_inode_cachep);
	kmem_cache_destroy(tkfs_dentry_cachep);
	tkfs_crypto_exit();
	return err;
}

static void __exit tkfs_exit(void)
{
	unregister_filesystem(&tkfs_fs_type);
	tkfs_audit_exit();
	tkfs_nl_exit();
	tkfs_io_exit();
	rcu_barrier();	/* inodes freed by RCU before their cache goes */
	kmem_cache_destroy(tkfs_inode_cachep);
	kmem_cache_destroy(tkfs_dentry_cachep);
	tkfs_crypto_exit();
}

module_init(tkfs_init);
module_exit(tkfs_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("Takakrypt developers");
MODULE_DESCRIPTION("takakryptfs: transparent TAKA v1 file encryption, keys from takakryptd");
MODULE_SOFTDEP("pre: gcm aes");
