// SPDX-License-Identifier: GPL-2.0
/*
 * decide.c - the policy chokepoint: every operation of the policy language calls
 * tkfs_decide() (docs/kernel.md "Decisions").  A mount with decide=agent (the default)
 * asks takakryptd POLICY_CHECK (version 2, docs/protocol.md) with the caller's identity
 * and the path, and keeps the answer in a per-mount decision cache; decide=none (data
 * path tests only) permits everything with the plaintext view.
 *
 * Caller identity: fsuid/fsgid, thread group id and thread id, the process's start time
 * (clock ticks after boot, /proc/PID/stat field 22) and its executable: path (d_path of
 * mm->exe_file), st_dev and st_ino with the ctime folded in, as the FUSE engine sends
 * them (procinfo.exe_ino_key), so a binary rewritten in place is a new identity.
 *
 * The cache (RCU-read, a spinlock for inserts): per mount TKFS_DC_SETS sets of
 * TKFS_DC_WAYS entries, each an immutable allocation replaced whole.  Key: the upper
 * dentry's id (a number given to each dentry of the mount, never reused), the target
 * dentry's id for rename and link, the action, uid, gid, pid, start time and executable;
 * FNV-1a 64 of the key picks the set and every field is compared.  An entry is valid
 * while its TTL (the agent's cache_ttl_ms) runs, the module's decision generation is the
 * one it was made under (bumped by every CONFIG_UPDATE and every agent registration or
 * departure) and the mount's name generation too (bumped by every rename in the mount,
 * which changes the paths of the moved dentry and everything below it).  An answer
 * marked ANY_PATH is stored with dentry id 0 and serves every path of the mount; one
 * marked ANY_PROCESS (a process-free policy) is stored without pid, start time and
 * executable and serves every process of that uid and gid.  Lookups try the
 * process-free keys first while the mount has had such an answer under the current
 * generation (pf_gen), so a process-free policy costs one lookup per hit.
 */
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/cred.h>
#include <linux/slab.h>
#include <linux/rcupdate.h>
#include <linux/jiffies.h>
#include <linux/namei.h>
#include <linux/file.h>
#include <linux/mm.h>
#include <asm/unaligned.h>

#include "tkfs.h"

#define TKFS_DC_SETS		1024
#define TKFS_DC_WAYS		4
#define TKFS_DC_MAX_TTL_MS	3600000u

struct tkfs_dkey {
	u64 dentry_id;
	u64 target_id;
	u64 start_time;
	u64 exe_dev;
	u64 exe_ino;
	u32 uid;
	u32 gid;
	u32 pid;
	u32 action;
};

struct tkfs_dent {
	struct rcu_head rcu;
	struct tkfs_dkey k;
	u64 hash;
	unsigned long expires;
	u32 gen;
	u32 name_gen;
	u32 effects;
	s32 rule;
};

static atomic_t decision_gen = ATOMIC_INIT(1);
static atomic64_t next_dentry_id = ATOMIC64_INIT(0);

/* counters for STATUS_REQUEST */
atomic64_t tkfs_st_hits, tkfs_st_misses, tkfs_st_denials, tkfs_st_fail_closed, tkfs_st_eio;
static atomic_t dc_entries;

void tkfs_decisions_changed(void)
{
	atomic_inc(&decision_gen);
}

u64 tkfs_new_dentry_id(void)
{
	return atomic64_inc_return(&next_dentry_id);
}

void tkfs_dc_counts(u32 *entries, u32 *capacity)
{
	struct tkfs_sb *sbi;
	u32 n = 0;

	mutex_lock(&tkfs_mounts_lock);
	list_for_each_entry(sbi, &tkfs_mounts, all)
		if (sbi->dc)
			n++;
	mutex_unlock(&tkfs_mounts_lock);
	*entries = atomic_read(&dc_entries);
	*capacity = n * TKFS_DC_SETS * TKFS_DC_WAYS;
}

static u64 fnv1a(const void *p, size_t n)
{
	const u8 *b = p;
	u64 h = 0xcbf29ce484222325ULL;

	while (n--) {
		h ^= *b++;
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* ---- caller identity ---------------------------------------------------------------- */

struct tkfs_who {
	struct tkfs_dkey k;	/* identity fields filled; ids and action by the caller */
	u32 tid;
	struct file *exe;	/* reference, or NULL (kernel thread, no mm) */
};

static void who_am_i(struct tkfs_who *w)
{
	struct task_struct *t = current;
	struct mm_struct *mm;

	memset(w, 0, sizeof(*w));
	w->k.uid = from_kuid(&init_user_ns, current_fsuid());
	w->k.gid = from_kgid(&init_user_ns, current_fsgid());
	w->k.pid = task_tgid_nr(t);
	w->tid = task_pid_nr(t);
	/* /proc/PID/stat field 22 of the thread group leader, in USER_HZ ticks */
	w->k.start_time = div_u64(t->group_leader->start_boottime, NSEC_PER_SEC / USER_HZ);
	mm = t->mm;
	if (!mm || (t->flags & PF_KTHREAD))
		return;
	rcu_read_lock();
	w->exe = rcu_dereference(mm->exe_file);
	if (w->exe && !get_file_rcu(w->exe))
		w->exe = NULL;
	rcu_read_unlock();
	if (w->exe) {
		/*
		 * The cache key's executable: the inode's own numbers, in memory (a stat
		 * here could be a network round trip for each access: a binary on NFS, 9p,
		 * FUSE); what the agent is told is exe_stat()'s
		 */
		struct inode *inode = file_inode(w->exe);
		u64 ctime_ns = (u64)inode->i_ctime.tv_sec * NSEC_PER_SEC + inode->i_ctime.tv_nsec;

		w->k.exe_dev = new_encode_dev(inode->i_sb->s_dev) ^ ((u64)inode->i_generation << 32);
		w->k.exe_ino = inode->i_ino ^ (ctime_ns * 0x9E3779B97F4A7C15ULL);
	}
}

/*
 * The executable's st_dev and st_ino with the ctime folded in, as stat(2) reports them
 * (btrfs and overlayfs report other numbers than the inode's own) and as the FUSE engine
 * sends them (procinfo.exe_ino_key): for the question to the agent, on a cache miss.  An
 * executable kept in a takakryptfs mount is read from its inode: its getattr would come
 * back here.
 */
static void exe_stat(const struct tkfs_who *w, u64 *dev, u64 *ino)
{
	struct kstat st;
	u64 ctime_ns;

	*dev = 0;
	*ino = 0;
	if (!w->exe)
		return;
	if (file_inode(w->exe)->i_sb->s_type == &tkfs_fs_type) {
		struct inode *inode = file_inode(w->exe);

		st.dev = inode->i_sb->s_dev;
		st.ino = inode->i_ino;
		st.ctime = inode->i_ctime;
	} else if (vfs_getattr(&w->exe->f_path, &st, STATX_INO | STATX_CTIME,
			       AT_STATX_SYNC_AS_STAT)) {
		return;
	}
	ctime_ns = (u64)st.ctime.tv_sec * NSEC_PER_SEC + st.ctime.tv_nsec;
	*dev = new_encode_dev(st.dev);
	*ino = st.ino ^ (ctime_ns * 0x9E3779B97F4A7C15ULL);
}

static void who_done(struct tkfs_who *w)
{
	if (w->exe)
		fput(w->exe);
}

/* ---- the cache ---------------------------------------------------------------------- */

int tkfs_dc_init(struct tkfs_sb *sbi)
{
	spin_lock_init(&sbi->dc_lock);
	sbi->dc = kvcalloc(TKFS_DC_SETS * TKFS_DC_WAYS, sizeof(*sbi->dc), GFP_KERNEL);
	return sbi->dc ? 0 : -ENOMEM;
}

void tkfs_dc_exit(struct tkfs_sb *sbi)
{
	unsigned int i;

	if (!sbi->dc)
		return;
	for (i = 0; i < TKFS_DC_SETS * TKFS_DC_WAYS; i++) {
		struct tkfs_dent *e = rcu_dereference_protected(sbi->dc[i], 1);

		if (e) {
			atomic_dec(&dc_entries);
			kfree_rcu(e, rcu);
		}
	}
	kvfree(sbi->dc);
	sbi->dc = NULL;
}

static bool dc_valid(const struct tkfs_dent *e, const struct tkfs_sb *sbi)
{
	return e->gen == (u32)atomic_read(&decision_gen) &&
	       e->name_gen == (u32)atomic_read(&sbi->name_gen) &&
	       time_before(jiffies, e->expires);
}

static bool dc_lookup(struct tkfs_sb *sbi, const struct tkfs_dkey *k, u32 *effects, s32 *rule)
{
	u64 h = fnv1a(k, sizeof(*k));
	unsigned int set = (h % TKFS_DC_SETS) * TKFS_DC_WAYS, i;
	bool hit = false;

	rcu_read_lock();
	for (i = 0; i < TKFS_DC_WAYS; i++) {
		struct tkfs_dent *e = rcu_dereference(sbi->dc[set + i]);

		if (e && e->hash == h && !memcmp(&e->k, k, sizeof(*k)) && dc_valid(e, sbi)) {
			*effects = e->effects;
			*rule = e->rule;
			hit = true;
			break;
		}
	}
	rcu_read_unlock();
	return hit;
}

static void dc_insert(struct tkfs_sb *sbi, const struct tkfs_dkey *k, u32 effects, s32 rule,
		      u32 ttl_ms, u32 gen, u32 name_gen)
{
	u64 h = fnv1a(k, sizeof(*k));
	unsigned int set = (h % TKFS_DC_SETS) * TKFS_DC_WAYS, i, victim = TKFS_DC_WAYS;
	struct tkfs_dent *e, *old;

	if (!ttl_ms)
		return;
	e = kmalloc(sizeof(*e), GFP_KERNEL);
	if (!e)
		return;
	e->k = *k;
	e->hash = h;
	e->expires = jiffies + msecs_to_jiffies(min(ttl_ms, TKFS_DC_MAX_TTL_MS));
	e->gen = gen;
	e->name_gen = name_gen;
	e->effects = effects;
	e->rule = rule;
	spin_lock(&sbi->dc_lock);
	for (i = 0; i < TKFS_DC_WAYS; i++) {
		old = rcu_dereference_protected(sbi->dc[set + i], lockdep_is_held(&sbi->dc_lock));
		/* the same key, an empty way or a stale entry first; else the one expiring first */
		if (!old || (old->hash == h && !memcmp(&old->k, k, sizeof(*k))) ||
		    !dc_valid(old, sbi)) {
			victim = i;
			break;
		}
		if (victim == TKFS_DC_WAYS ||
		    time_before(old->expires, rcu_dereference_protected(
				sbi->dc[set + victim], lockdep_is_held(&sbi->dc_lock))->expires))
			victim = i;
	}
	old = rcu_dereference_protected(sbi->dc[set + victim], lockdep_is_held(&sbi->dc_lock));
	rcu_assign_pointer(sbi->dc[set + victim], e);
	spin_unlock(&sbi->dc_lock);
	if (old)
		kfree_rcu(old, rcu);
	else
		atomic_inc(&dc_entries);
}

/*
 * Look k up for dentry (and target): the ANY_PATH entry first (dentry id 0: one entry for
 * every path; never for rename and link), then the name's own.  k's ids are the name's
 * afterwards, as an insert needs them.
 */
static bool dc_lookup_names(struct tkfs_sb *sbi, struct tkfs_dkey *k, struct dentry *dentry,
			    struct dentry *target, u32 *effects, s32 *rule)
{
	k->dentry_id = 0;
	k->target_id = 0;
	if (!target && dc_lookup(sbi, k, effects, rule))
		return true;
	k->dentry_id = TKFS_D(dentry)->id;
	k->target_id = target ? TKFS_D(target)->id : 0;
	return dc_lookup(sbi, k, effects, rule);
}

/* ---- the request -------------------------------------------------------------------- */

/*
 * The absolute path the agent matches: the guard point's path from CONFIG_UPDATE and the
 * dentry's path below the mount's root.  Into buf (PATH_MAX); a pointer into it.
 */
static char *gp_path_of(struct tkfs_sb *sbi, struct dentry *dentry, char *buf, int *len)
{
	const struct tkfs_gp *gp;
	char *rel;
	int rl, gl;

	rel = dentry_path_raw(dentry, buf, PATH_MAX);
	if (IS_ERR(rel))
		return rel;
	rl = strlen(rel);
	if (rl == 1)		/* the root: "/" */
		rl = 0;
	rcu_read_lock();
	gp = rcu_dereference(sbi->gp);
	if (!gp || gp->path_len > rel - buf) {
		rcu_read_unlock();
		return ERR_PTR(gp ? -ENAMETOOLONG : -ENOENT);
	}
	gl = gp->path_len;
	memcpy(rel - gl, gp->path, gl);
	rcu_read_unlock();
	*len = gl + rl;
	return rel - gl;
}

/* POLICY_CHECK v2 (docs/protocol.md); buffers: 3 x PATH_MAX for path, process, target */
static int ask_agent(struct tkfs_sb *sbi, const struct tkfs_who *w, u32 action,
		     struct dentry *dentry, struct dentry *target, u32 *effects, s32 *rule,
		     u32 *ttl_ms)
{
	const u32 fixed = TAKAKRYPT_HEADER_SIZE + 64;
	char *bufs, *path, *exe = NULL, *tgt = NULL;
	int plen, elen = 0, tlen = 0, err;
	u8 *m = NULL, *r = NULL;
	u32 rlen, klen, polen, relen, eff, allow, enc, aud;
	u64 exe_dev, exe_ino;

	bufs = kmalloc(3 * PATH_MAX, GFP_KERNEL);
	if (!bufs)
		return -ENOMEM;
	path = gp_path_of(sbi, dentry, bufs, &plen);
	if (IS_ERR(path)) {
		err = PTR_ERR(path);
		goto out;
	}
	if (target) {
		tgt = gp_path_of(sbi, target, bufs + 2 * PATH_MAX, &tlen);
		if (IS_ERR(tgt)) {
			err = PTR_ERR(tgt);
			goto out;
		}
	}
	if (w->exe) {
		exe = d_path(&w->exe->f_path, bufs + PATH_MAX, PATH_MAX);
		if (IS_ERR(exe))
			exe = NULL;
		else
			elen = strlen(exe);
	}
	err = -EINVAL;
	if (fixed + plen + elen + tlen > TAKAKRYPT_MAX_MSG_SIZE)
		goto out;
	err = -ENOMEM;
	m = kmalloc(fixed + plen + elen + tlen, GFP_KERNEL);
	if (!m)
		goto out;
	put_unaligned_le32(TAKAKRYPT_OP_POLICY_CHECK, m + 8);
	put_unaligned_le32(w->k.pid, m + 32);
	put_unaligned_le32(w->k.uid, m + 36);
	put_unaligned_le32(w->k.gid, m + 40);
	put_unaligned_le32(action, m + 44);
	put_unaligned_le32(plen, m + 48);
	put_unaligned_le32(elen, m + 52);
	put_unaligned_le32(0, m + 56);			/* cwd: not sent, as the FUSE engine */
	put_unaligned_le32(w->tid, m + 60);
	put_unaligned_le64(w->k.start_time, m + 64);
	exe_stat(w, &exe_dev, &exe_ino);
	put_unaligned_le64(exe_dev, m + 72);
	put_unaligned_le64(exe_ino, m + 80);
	put_unaligned_le32(sbi->gp_id, m + 88);
	put_unaligned_le32(tlen, m + 92);
	memcpy(m + fixed, path, plen);
	if (elen)
		memcpy(m + fixed + plen, exe, elen);
	if (tlen)
		memcpy(m + fixed + plen + elen, tgt, tlen);
	err = tkfs_nl_call(m, fixed + plen + elen + tlen, &r, &rlen);
	if (err)
		goto out;
	err = tkfs_nl_status(r);
	if (err)
		goto out;
	/* the answer must be well-formed or it denies (docs/protocol.md "Validation") */
	err = -EPROTO;
	if (get_unaligned_le32(r + 8) != (TAKAKRYPT_OP_POLICY_CHECK | TAKAKRYPT_MSG_RESPONSE) ||
	    get_unaligned_le32(r + 4) < 2 || rlen < TAKAKRYPT_HEADER_SIZE + 40)
		goto out;
	allow = get_unaligned_le32(r + 32);
	enc = get_unaligned_le32(r + 36);
	aud = get_unaligned_le32(r + 40);
	klen = get_unaligned_le32(r + 44);
	polen = get_unaligned_le32(r + 48);
	relen = get_unaligned_le32(r + 52);
	eff = get_unaligned_le32(r + 56);
	if ((u64)TAKAKRYPT_HEADER_SIZE + 40 + klen + polen + relen != rlen)
		goto out;
	if (eff & ~TAKAKRYPT_EFFECT_MASK)
		goto out;
	if (!(eff & TAKAKRYPT_EFFECT_PERMIT) == !(eff & TAKAKRYPT_EFFECT_DENY))
		goto out;
	if ((eff & (TAKAKRYPT_EFFECT_APPLY_KEY | TAKAKRYPT_EFFECT_WOULD_DENY)) &&
	    !(eff & TAKAKRYPT_EFFECT_PERMIT))
		goto out;
	if (allow != !!(eff & TAKAKRYPT_EFFECT_PERMIT) ||
	    enc != !!(eff & TAKAKRYPT_EFFECT_APPLY_KEY) ||
	    aud != !!(eff & TAKAKRYPT_EFFECT_AUDIT))
		goto out;
	*effects = eff;
	*rule = (s32)get_unaligned_le32(r + 60);
	*ttl_ms = get_unaligned_le32(r + 68);
	err = 0;
out:
	kfree(r);
	kfree(m);
	kfree(bufs);
	return err;
}

/* an AUDIT_EVENT for a decision the agent did not see (a cache hit) or could not make */
static void audit_decision(struct tkfs_sb *sbi, const struct tkfs_who *w, u32 action,
			   struct dentry *dentry, u32 kind, u32 effects, s32 rule, int err)
{
	struct tkfs_audit_ev ev = {
		.kind = kind, .pid = w->k.pid, .tid = w->tid, .uid = w->k.uid, .gid = w->k.gid,
		.action = action, .effects = effects, .rule = rule, .gp_id = sbi->gp_id,
		.error = effects & TAKAKRYPT_EFFECT_PERMIT ? 0 : EACCES,
	};
	char *bufs = kmalloc(2 * PATH_MAX, GFP_NOWAIT | __GFP_NOWARN);
	char *p;
	int len;

	if (!bufs) {
		tkfs_audit_dropped();
		return;
	}
	p = gp_path_of(sbi, dentry, bufs, &len);
	if (!IS_ERR(p)) {
		ev.path = p;
		ev.path_len = len;
	}
	if (w->exe) {
		p = d_path(&w->exe->f_path, bufs + PATH_MAX, PATH_MAX);
		if (!IS_ERR(p)) {
			ev.process = p;
			ev.process_len = strlen(p);
		}
	}
	if (kind == TAKAKRYPT_AUDIT_AGENT_UNAVAILABLE)
		ev.detail = err == -ETIMEDOUT ? "agent unavailable: no answer in 5 s" :
			    err == -ENOTCONN ? "agent unavailable: not connected" :
			    err == -EPROTO ? "malformed agent answer" :
			    err == -ENOENT ? "guard point not configured by the agent" :
			    "agent unavailable";
	else
		ev.detail = "cached decision";
	tkfs_audit(&ev);
	kfree(bufs);
}

/* an integrity failure (bad header, tag or length): EIO to the caller, audited */
void tkfs_audit_integrity(struct inode *inode, u64 block, const char *what)
{
	struct tkfs_sb *sbi = TKFS_SB(inode->i_sb);
	struct tkfs_audit_ev ev = {
		.kind = TAKAKRYPT_AUDIT_INTEGRITY, .pid = task_tgid_nr(current),
		.tid = task_pid_nr(current),
		.uid = from_kuid(&init_user_ns, current_fsuid()),
		.gid = from_kgid(&init_user_ns, current_fsgid()),
		.action = TAKAKRYPT_ACTION_READ, .effects = TAKAKRYPT_EFFECT_DENY, .rule = -1,
		.gp_id = sbi->gp_id, .error = EIO,
	};
	char *buf = kmalloc(PATH_MAX + 96, GFP_NOWAIT | __GFP_NOWARN);
	struct dentry *d;
	char *p;
	int len;

	if (!buf) {
		tkfs_audit_dropped();
		return;
	}
	d = d_find_alias(inode);
	if (d) {
		p = gp_path_of(sbi, d, buf, &len);
		if (!IS_ERR(p)) {
			ev.path = p;
			ev.path_len = len;
		}
		dput(d);
	}
	if (block == U64_MAX)
		snprintf(buf + PATH_MAX, 96, "%s", what);
	else
		snprintf(buf + PATH_MAX, 96, "%s (block %llu)", what, block);
	ev.detail = buf + PATH_MAX;
	tkfs_audit(&ev);
	kfree(buf);
}

/*
 * The chokepoint.  0 and *effects (PERMIT, with APPLY_KEY for the plaintext view) or
 * -EACCES: denied by the policy, or no decision could be had (no agent, timeout, a
 * malformed answer: fail closed).  target: the destination of rename and link.
 */
int tkfs_decide(struct dentry *dentry, u32 action, struct dentry *target, u32 *effects)
{
	struct tkfs_sb *sbi = TKFS_SB(dentry->d_sb);
	struct tkfs_who w;
	struct tkfs_dkey k;
	u32 eff = 0, ttl = 0, gen, name_gen;
	s32 rule = -1;
	int err;

	if (!sbi->decide) {
		*effects = TAKAKRYPT_EFFECT_PERMIT | TAKAKRYPT_EFFECT_APPLY_KEY;
		return 0;
	}
	/* takakryptd itself (hashing an executable kept in the guard point, say): the
	 * stored bytes, never a question to itself that it would have to answer */
	if (tkfs_is_agent()) {
		*effects = TAKAKRYPT_EFFECT_PERMIT;
		return 0;
	}
	who_am_i(&w);
	k = w.k;
	k.action = action;
	if (atomic_read(&sbi->pf_gen) == atomic_read(&decision_gen)) {
		/* ANY_PROCESS answers under this generation: uid and gid alone first */
		struct tkfs_dkey pk = { .uid = k.uid, .gid = k.gid, .action = action };

		if (dc_lookup_names(sbi, &pk, dentry, target, &eff, &rule))
			goto hit;
	}
	if (dc_lookup_names(sbi, &k, dentry, target, &eff, &rule))
		goto hit;
	atomic64_inc(&tkfs_st_misses);
	/* read before asking: a reload racing the question cannot leave a stale entry */
	gen = atomic_read(&decision_gen);
	name_gen = atomic_read(&sbi->name_gen);
	err = ask_agent(sbi, &w, action, dentry, target, &eff, &rule, &ttl);
	if (err) {
		atomic64_inc(&tkfs_st_fail_closed);
		audit_decision(sbi, &w, action, dentry, TAKAKRYPT_AUDIT_AGENT_UNAVAILABLE,
			       TAKAKRYPT_EFFECT_DENY, -1, err);
		who_done(&w);
		return -EACCES;
	}
	if (eff & TAKAKRYPT_EFFECT_ANY_PATH && !target) {
		k.dentry_id = 0;
		k.target_id = 0;
	}
	if (eff & TAKAKRYPT_EFFECT_ANY_PROCESS) {
		k.pid = 0;
		k.start_time = 0;
		k.exe_dev = 0;
		k.exe_ino = 0;
		if (ttl)
			atomic_set(&sbi->pf_gen, gen);
	}
	dc_insert(sbi, &k, eff, rule, ttl, gen, name_gen);
	who_done(&w);
	/* the agent audited this decision itself */
	goto decided;
hit:
	atomic64_inc(&tkfs_st_hits);
	/* a cached decision the agent never sees: audited from here */
	if (eff & (TAKAKRYPT_EFFECT_AUDIT | TAKAKRYPT_EFFECT_WOULD_DENY | TAKAKRYPT_EFFECT_DENY))
		audit_decision(sbi, &w, action, dentry, TAKAKRYPT_AUDIT_ACCESS, eff, rule,
			       0);
	who_done(&w);
decided:
	if (!(eff & TAKAKRYPT_EFFECT_PERMIT)) {
		atomic64_inc(&tkfs_st_denials);
		return -EACCES;
	}
	*effects = eff;
	return 0;
}
