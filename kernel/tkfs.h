/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tkfs.h - takakryptfs internals: a stackable file system whose regular files are TAKA v1
 * files (docs/file-format.md) in the lower directory, decrypted into the page cache.
 *
 * Objects (docs/kernel.md "Architecture"):
 *   tkfs_sb      one per mount: lower root, key name, guard point id, the key table
 *   tkfs_inode   one per lower inode (hard links share it): header state, derived keys,
 *                the persistent lower file used for page I/O (opened with the mounter's
 *                credentials, as eCryptfs and overlayfs do)
 *   tkfs_dentry  the lower path of each upper dentry
 */
#ifndef _TKFS_H
#define _TKFS_H

#include <linux/fs.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/path.h>
#include <linux/rwsem.h>
#include <linux/list.h>
#include <linux/types.h>
#include <linux/ratelimit.h>
#include <linux/workqueue.h>

#include "include/uapi/takakrypt.h"

#define TKFS_NAME		"takakryptfs"
#define TKFS_MAGIC		0x544b4653	/* "TKFS" */
#define TKFS_VERSION		((0u << 16) | (1u << 8) | 0u)

/* ---- TAKA v1 file format (docs/file-format.md) ---------------------------------- */
#define TAKA_HDR_SIZE		128
#define TAKA_STATIC_SIZE	96
#define TAKA_TAGGED_SIZE	112
#define TAKA_NONCE		12
#define TAKA_TAG		16
#define TAKA_OVERHEAD		(TAKA_NONCE + TAKA_TAG)
#define TAKA_KEY_LEN		32
#define TAKA_KEYID_MAX		63
#define TAKA_AAD_LEN		(TAKA_STATIC_SIZE + 8)
/* TAKA v2 (docs/file-format.md, "Version 2"): a 96-bit tag, then the block's key
 * version; the stride stays TAKA_OVERHEAD.  AAD: static header with the write version
 * zeroed | le64 index | le32 block version. */
#define TAKA_TAG_V2		12
#define TAKA_AAD_LEN_V2		(TAKA_STATIC_SIZE + 12)
#define TKFS_VKEYS		4	/* other key versions' transforms kept per inode */
/* the engine's block size is the page size; other sizes are refused (docs/kernel.md) */
#define TKFS_BS			PAGE_SIZE
#define TKFS_STORED_BS		(TKFS_BS + TAKA_OVERHEAD)
/* blocks per lower read (readahead) and lower write (write-back): 15 stored blocks
 * fit one order-4 allocation (64 KiB) */
#define TKFS_BATCH		15
#define TAKA_LEASE_CHUNK	65536ULL
#define TAKA_SOFT_LIMIT		(1ULL << 31)
#define TAKA_HARD_LIMIT		(3ULL << 30)

/* file offset of stored block i */
static inline loff_t tkfs_block_off(u64 i)
{
	return TAKA_HDR_SIZE + (loff_t)i * TKFS_STORED_BS;
}

/* stored length of a well-formed file holding size plaintext bytes */
static inline loff_t tkfs_stored_len(u64 size)
{
	return TAKA_HDR_SIZE + size + TAKA_OVERHEAD * DIV_ROUND_UP_ULL(size, TKFS_BS);
}

struct taka_header {
	u8 raw[TAKA_HDR_SIZE];		/* as stored; raw[0..95] is the static header */
	u8 fmtv;			/* format version: 1 or 2 */
	u32 key_version;		/* v2: the write version (changes: READ_ONCE) */
	u32 oldest;			/* v2: lowest block version; v1: key_version */
	u8 file_id[16];
	char key_id[TAKA_KEYID_MAX + 1];
	u64 size;
	u64 encryptions;
};

/* ---- keys --------------------------------------------------------------------------- */
struct tkfs_key {
	struct list_head list;
	char name[TAKA_KEYID_MAX + 1];
	u32 version;
	u8 key[TAKA_KEY_LEN];
};

struct tkfs_szent;

/* ---- per mount ---------------------------------------------------------------------- */
struct tkfs_sb {
	struct path lower_root;
	struct super_block *lower_sb;
	const struct cred *mounter_cred;	/* lower page I/O runs with these */
	char key_name[TAKA_KEYID_MAX + 1];
	u32 gp_id;				/* guard point id (mount option gp=), 0 = any */
	u8 format;				/* TAKA version of new files (format=), 1 or 2 */
	char *lower_name;			/* mount source, for show_options/logs */

	struct mutex keys_lock;			/* keys, key_epoch writers */
	struct list_head keys;			/* struct tkfs_key */
	u32 current_version;			/* of key_name, 0 = not known yet */
	atomic_t key_epoch;			/* bumped when keys are wiped */
	bool keys_revoked;			/* the agent disabled this guard point */

	struct super_block *sb;
	struct work_struct wipe_work;		/* drops the inodes' file keys */
	unsigned int grace;			/* seconds keys outlive the agent (grace=) */
	struct delayed_work grace_work;		/* wipes the keys when the grace runs out */
	struct list_head all;			/* tkfs_mounts */
	atomic64_t eio_count;

	spinlock_t szc_lock;			/* sizecache.c */
	struct tkfs_szent *szc;

	/* decide.c */
	bool decide;				/* decide=agent (default) */
	struct tkfs_gp __rcu *gp;		/* this mount's guard point (CONFIG_UPDATE) */
	atomic_t name_gen;			/* bumped by every rename in the mount */
	atomic_t pf_gen;			/* decision_gen of the last ANY_PROCESS answer */
	spinlock_t dc_lock;			/* decision cache inserts */
	struct tkfs_dent __rcu **dc;
};

/* the guard point's configured path, as CONFIG_UPDATE sent it (RCU) */
struct tkfs_gp {
	struct rcu_head rcu;
	u32 path_len;
	char path[];
};

struct tkfs_dent;

enum tkfs_hdr_state {
	TKFS_HDR_UNKNOWN = 0,	/* not read yet, or keys wiped since */
	TKFS_HDR_EMPTY,		/* lower file of length 0: an empty file without header yet */
	TKFS_HDR_OK,		/* header verified, file keys derived */
	TKFS_HDR_BAD,		/* header invalid or key unavailable: opens fail with EIO */
};

struct crypto_aead;
struct aead_request;
struct tkfs_szent;

struct tkfs_inode {
	struct inode vfs_inode;
	struct inode *lower_inode;

	/* lower file for page I/O, opened once (mounter's credentials), closed at evict */
	struct mutex lower_lock;
	struct file *lower_file;

	/*
	 * key_sem: read-held by every user of the header state and file keys (page I/O,
	 * header writes); write-held to load or wipe them.  hdr_lock (inside key_sem)
	 * serialises header writes, the encryption lease and size changes of the lower
	 * file.
	 */
	struct rw_semaphore key_sem;
	struct mutex hdr_lock;
	enum tkfs_hdr_state state;
	int bad_errno;
	int key_epoch;
	struct taka_header hdr;
	u64 disk_size;		/* plaintext size in the header on disk */
	u64 enc_count;		/* block encryptions done (lease taken whole at load) */
	bool tail_cut;		/* stale stored bytes past disk_size were cut */
	bool hdr_pending;	/* header made in memory, not stored yet (lower length 0) */
	bool keyless_wb;	/* a write-back found no key: pages left dirty (raw open) */
	struct work_struct prep_work;	/* makes a new file's header and keys ahead */
	u8 enc_key[TAKA_KEY_LEN];	/* file keys (HKDF of the data key), wiped on drop */
	u8 mac_key[TAKA_KEY_LEN];
	struct crypto_aead *aead;	/* gcm(aes) keyed with enc_key, made at first use */
	/*
	 * v2: transforms of the file's other key versions, made when a block of one is
	 * read (key_sem read-held; added under vkeys_lock), or kept from the write version
	 * a writer moved away from (hdr_lock).  Freed only with key_sem write-held.
	 */
	spinlock_t vkeys_lock;
	unsigned int nvkeys;
	struct tkfs_vkey {
		u32 ver;
		struct crypto_aead *aead;
	} vkeys[TKFS_VKEYS];
	u32 aead_ver;			/* the version ii->aead is keyed for */
};

struct tkfs_dentry {
	struct path lower_path;
	u64 id;			/* decision cache key: unique per dentry of the module */
};

static inline struct tkfs_sb *TKFS_SB(const struct super_block *sb)
{
	return sb->s_fs_info;
}

static inline struct tkfs_inode *TKFS_I(const struct inode *inode)
{
	return container_of(inode, struct tkfs_inode, vfs_inode);
}

static inline struct inode *tkfs_lower_inode(const struct inode *inode)
{
	return TKFS_I(inode)->lower_inode;
}

static inline struct tkfs_dentry *TKFS_D(const struct dentry *dentry)
{
	return dentry->d_fsdata;
}

static inline void tkfs_lower_path(const struct dentry *dentry, struct path *p)
{
	*p = TKFS_D(dentry)->lower_path;
	path_get(p);
}

static inline struct dentry *tkfs_lower_dentry(const struct dentry *dentry)
{
	return TKFS_D(dentry)->lower_path.dentry;
}

#define tkfs_err_rl(fmt, ...) pr_err_ratelimited(TKFS_NAME ": " fmt, ##__VA_ARGS__)

/* super.c */
extern struct kmem_cache *tkfs_inode_cachep;
extern struct kmem_cache *tkfs_dentry_cachep;
extern struct file_system_type tkfs_fs_type;
extern struct mutex tkfs_mounts_lock;
extern struct list_head tkfs_mounts;
void tkfs_wipe_sb_keys(struct super_block *sb);
void tkfs_agent_gone(void);
void tkfs_agent_back(void);

/* inode.c */
extern const struct inode_operations tkfs_dir_iops;
extern const struct inode_operations tkfs_file_iops;
extern const struct inode_operations tkfs_symlink_iops;
extern const struct inode_operations tkfs_special_iops;
extern const struct dentry_operations tkfs_dops;
extern const struct xattr_handler *tkfs_xattr_handlers[];
struct inode *tkfs_iget(struct super_block *sb, struct inode *lower_inode);
int tkfs_init_dentry(struct dentry *dentry, const struct path *lower);

/* raw.c: the raw view */
extern const struct file_operations tkfs_raw_fops;
int tkfs_raw_open(struct inode *inode, struct file *file);
int tkfs_raw_truncate(struct inode *inode, struct dentry *ld, loff_t len);
void tkfs_raw_changed(struct inode *inode);
ssize_t tkfs_copy_file_range(struct file *in, loff_t pos_in, struct file *out, loff_t pos_out,
			     size_t len, unsigned int flags);

/* rekey.c: live rekey ioctls (include/uapi/takakrypt_ioctl.h) */
long tkfs_ioctl(struct file *file, unsigned int cmd, unsigned long arg);

/* file.c */
extern const struct file_operations tkfs_file_fops;
extern const struct file_operations tkfs_dir_fops;
int tkfs_get_lower_file(struct inode *inode);

/* aops.c */
extern const struct address_space_operations tkfs_aops;
int tkfs_setsize(struct inode *inode, loff_t newsize);
int tkfs_commit_size(struct inode *inode);

/* crypto.c: header and blocks */
int tkfs_hdr_parse(struct taka_header *h, const u8 *raw);
int tkfs_derive_keys(struct tkfs_inode *ii, const u8 *data_key, bool verify);
void tkfs_drop_keys(struct tkfs_inode *ii);
int tkfs_hdr_seal(struct tkfs_inode *ii, u64 size, u64 encryptions);
int tkfs_move_version(struct inode *inode, u32 version, const u8 *data_key);
void tkfs_vkeys_free(struct tkfs_inode *ii);
struct tkfs_crypt {
	struct tkfs_inode *ii;
	struct aead_request *req;
	struct crypto_aead *tfm;	/* the one req was made for (the write version's) */
	u32 ver;			/* its key version (v2: sealed blocks carry it) */
	unsigned int reqsize;
	u8 fmtv;
	u8 *aad;
};
int tkfs_crypt_init(struct tkfs_inode *ii, struct tkfs_crypt *c);
void tkfs_crypt_prepare(struct tkfs_inode *ii);
void tkfs_crypt_done(struct tkfs_crypt *c);
int tkfs_crypt_seal(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n);
int tkfs_crypt_open(struct tkfs_crypt *c, u64 index, u8 *buf, size_t n, struct page *dst);
int tkfs_block_seal(struct tkfs_inode *ii, u64 index, u8 *buf, size_t n);
int tkfs_block_open(struct tkfs_inode *ii, u64 index, u8 *buf, size_t n);
int tkfs_crypto_init(void);
void tkfs_crypto_exit(void);

/* header.c: header state of an inode */
int tkfs_load_header(struct inode *inode);
int tkfs_create_header(struct inode *inode, bool store);
int tkfs_renew_header(struct inode *inode);
int tkfs_key_available(struct inode *inode);
void tkfs_prepare_new(struct inode *inode);
void tkfs_work_init_once(struct tkfs_inode *ii);
void tkfs_work_cancel(struct tkfs_inode *ii);
int tkfs_ensure_keys(struct inode *inode);	/* down_read(key_sem) held on success */
int tkfs_ensure_ready(struct inode *inode);	/* the same, and the header state is OK */
int tkfs_write_header(struct inode *inode, u64 size, u64 lease);
int tkfs_reserve_encryptions(struct inode *inode, u64 n);
void tkfs_report_eio(struct inode *inode, u64 block, const char *what);
ssize_t tkfs_lower_read(struct inode *inode, void *buf, size_t len, loff_t pos);
ssize_t tkfs_lower_write(struct inode *inode, const void *buf, size_t len, loff_t pos);
int tkfs_lower_truncate(struct inode *inode, loff_t len);
int tkfs_io_init(void);
void tkfs_io_exit(void);

/* keys.c */
int tkfs_key_get(struct tkfs_sb *sbi, const char *name, u32 version, u8 *out, u32 *got_version);
void tkfs_keys_wipe(struct tkfs_sb *sbi);

/* decide.c: the policy chokepoint */
int tkfs_decide(struct dentry *dentry, u32 action, struct dentry *target, u32 *effects);
int tkfs_dc_init(struct tkfs_sb *sbi);
void tkfs_dc_exit(struct tkfs_sb *sbi);
void tkfs_dc_counts(u32 *entries, u32 *capacity);
void tkfs_decisions_changed(void);
void tkfs_audit_integrity(struct inode *inode, u64 block, const char *what);
u64 tkfs_new_dentry_id(void);
extern atomic64_t tkfs_st_hits, tkfs_st_misses, tkfs_st_denials, tkfs_st_fail_closed, tkfs_st_eio;

/* audit.c */
struct tkfs_audit_ev {
	u32 kind, pid, tid, uid, gid, action, effects, gp_id, error;
	s32 rule;
	const char *path;
	u32 path_len;
	const char *process;
	u32 process_len;
	const char *detail;	/* NUL-terminated or NULL */
};
void tkfs_audit(const struct tkfs_audit_ev *ev);
void tkfs_audit_dropped(void);
void tkfs_audit_exit(void);
extern atomic64_t tkfs_st_audit_sent, tkfs_st_audit_drops;

/* sizecache.c */
int tkfs_szc_init(struct tkfs_sb *sbi);
void tkfs_szc_exit(struct tkfs_sb *sbi);
bool tkfs_szc_get(struct tkfs_sb *sbi, struct inode *lower, u64 *plain);
void tkfs_szc_put(struct tkfs_sb *sbi, struct inode *lower, u64 plain, int epoch);

/* netlink.c */
int tkfs_nl_call(u8 *m, u32 len, u8 **resp, u32 *resp_len);
int tkfs_nl_status(const u8 *resp);
void tkfs_gp_attach(struct tkfs_sb *sbi);
int tkfs_nl_init(void);
void tkfs_nl_exit(void);
bool tkfs_agent_present(void);
bool tkfs_is_agent(void);
int tkfs_nl_key_request(u32 gp_id, const char *name, u32 version, u8 *key, u32 *got_version);

#endif /* _TKFS_H */
