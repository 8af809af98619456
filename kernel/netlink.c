// SPDX-License-Identifier: GPL-2.0
/*
 * netlink.c - the TAKA protocol (docs/protocol.md) over generic netlink family
 * "takakrypt": the agent registers its port (CMD_REGISTER), the module sends it requests
 * (KEY_REQUEST in part 1) as CMD_MSG unicasts and waits for the answer by sequence
 * number (5 s, then fail closed); the agent's own requests (CONFIG_UPDATE,
 * STATUS_REQUEST, HEALTH_CHECK) are answered with a CMD_MSG reply.  Both commands need
 * CAP_NET_ADMIN (GENL_ADMIN_PERM): an unprivileged sender gets EPERM from genetlink.
 *
 * Errors (the netlink ack) for what the agent sends: a missing/short/oversize ATTR_MSG
 * or a TAKA message that fails validation: EINVAL; a response from a port that is not
 * the registered agent: ESRCH; a response nobody waits for (late, or unknown sequence):
 * ENOENT.  An agent request of an operation the module does not serve gets a TAKA
 * error response (ERROR_INVALID), not a netlink error.
 *
 * Health: while an agent is registered the module sends it HEALTH_CHECK every
 * health_interval seconds (module parameter, default 60; 0: never).  After health_misses
 * (default 3) unanswered ones in a row (timeout or error status; after a miss the next
 * check comes after min(health_interval, 5) s, so a hang is confirmed in about 30 s
 * rather than three intervals) the agent is marked disconnected although its socket is
 * open (hung, stopped, starved): every request but HEALTH_CHECK then fails at once
 * (-ENOTCONN: decisions deny, keys are not fetched), the mounts' grace= runs as for an
 * agent that left, and the checks go on every min(health_interval, 5) s; the first
 * answer ends it (agent back: decisions asked again, keys fetched again).  A new
 * registration (systemd restarted takakryptd) ends it too.
 */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/completion.h>
#include <linux/jiffies.h>
#include <linux/ktime.h>
#include <linux/timekeeping.h>
#include <linux/workqueue.h>
#include <net/genetlink.h>
#include <asm/unaligned.h>

#include "tkfs.h"

struct tkfs_pending {
	struct list_head list;
	u32 seq;
	u32 op;
	struct completion done;
	u8 *resp;		/* kmalloc copy of the answer; wiped and freed by the waiter */
	u32 resp_len;
	int err;
};

static DEFINE_SPINLOCK(nl_lock);	/* agent_portid, pending, the health state */
static u32 agent_portid;
static pid_t agent_tgid;		/* the registered agent's process */
static bool agent_disconnected;		/* registered, but missed health_misses checks */
static unsigned int health_missed;	/* unanswered health checks in a row */
static u32 agent_epoch;			/* +1 per registration: a late check is ignored */
static LIST_HEAD(pending);
static atomic_t next_seq = ATOMIC_INIT(0);
static u64 load_time;

static atomic64_t st_requests, st_timeouts;
static u32 config_generation;
static u32 config_count;

static const struct nla_policy tkfs_nl_policy[TAKAKRYPT_ATTR_MAX + 1] = {
	/* no length here: an oversize message is EINVAL (check_header), not ERANGE */
	[TAKAKRYPT_ATTR_MSG] = { .type = NLA_BINARY },
};

static struct genl_family tkfs_family;

/* an agent is registered and answers (not marked disconnected by the health checks) */
bool tkfs_agent_present(void)
{
	return READ_ONCE(agent_portid) != 0 && !READ_ONCE(agent_disconnected);
}

/* the caller is the registered agent (its questions would come back to itself) */
bool tkfs_is_agent(void)
{
	pid_t t = READ_ONCE(agent_tgid);

	return t && t == task_tgid_nr(current);
}

/* fail every waiter (the agent went away) */
static void fail_pending(int err)
{
	struct tkfs_pending *p;

	spin_lock(&nl_lock);
	list_for_each_entry(p, &pending, list) {
		if (!completion_done(&p->done)) {
			p->err = err;
			complete(&p->done);
		}
	}
	spin_unlock(&nl_lock);
}

static void put_header(u8 *m, u32 op, u32 seq, u32 payload, u32 status)
{
	put_unaligned_le32(TAKAKRYPT_MSG_MAGIC, m);
	put_unaligned_le32(TAKAKRYPT_PROTOCOL_VERSION, m + 4);
	put_unaligned_le32(op, m + 8);
	put_unaligned_le32(seq, m + 12);
	put_unaligned_le32(payload, m + 16);
	put_unaligned_le32(status, m + 20);
	put_unaligned_le64(ktime_get_real_ns(), m + 24);
}

/* header checks of docs/protocol.md "Validation" */
static int check_header(const u8 *m, u32 len)
{
	u32 op, status, version;

	if (len < TAKAKRYPT_HEADER_SIZE || len > TAKAKRYPT_MAX_MSG_SIZE)
		return -EINVAL;
	if (get_unaligned_le32(m) != TAKAKRYPT_MSG_MAGIC)
		return -EINVAL;
	version = get_unaligned_le32(m + 4);
	if (version < TAKAKRYPT_PROTOCOL_MIN_VERSION || version > TAKAKRYPT_PROTOCOL_VERSION)
		return -EINVAL;
	op = get_unaligned_le32(m + 8) & ~TAKAKRYPT_MSG_RESPONSE;
	if (op > TAKAKRYPT_OP_STATUS_REQUEST)
		return -EINVAL;
	status = get_unaligned_le32(m + 20);
	if (status > TAKAKRYPT_ERROR_INTERNAL)
		return -EINVAL;
	if (!(get_unaligned_le32(m + 8) & TAKAKRYPT_MSG_RESPONSE) && status)
		return -EINVAL;
	if (get_unaligned_le32(m + 16) != len - TAKAKRYPT_HEADER_SIZE)
		return -EINVAL;
	return 0;
}

static int send_msg(u32 portid, const u8 *m, u32 len, struct genl_info *reply_to)
{
	struct sk_buff *skb;
	void *hdr;

	skb = genlmsg_new(nla_total_size(len), GFP_KERNEL);
	if (!skb)
		return -ENOMEM;
	if (reply_to)
		hdr = genlmsg_put_reply(skb, reply_to, &tkfs_family, 0, TAKAKRYPT_CMD_MSG);
	else
		hdr = genlmsg_put(skb, 0, 0, &tkfs_family, 0, TAKAKRYPT_CMD_MSG);
	if (!hdr || nla_put(skb, TAKAKRYPT_ATTR_MSG, len, m)) {
		nlmsg_free(skb);
		return -EMSGSIZE;
	}
	genlmsg_end(skb, hdr);
	if (reply_to)
		return genlmsg_reply(skb, reply_to);
	return genlmsg_unicast(&init_net, skb, portid);
}

/*
 * Send request m (header filled here: sequence, timestamp) to the agent and wait for
 * its answer: 0 with *resp (kmalloc, the caller wipes and frees it) or a negative errno:
 * -ENOTCONN no agent / it left / it is marked disconnected, -ETIMEDOUT after
 * TAKAKRYPT_TIMEOUT_MS.
 */
int tkfs_nl_call(u8 *m, u32 len, u8 **resp, u32 *resp_len)
{
	struct tkfs_pending p = { .err = 0 };
	u32 portid;
	long left;
	int err;

	init_completion(&p.done);
	p.op = get_unaligned_le32(m + 8);
	p.seq = (u32)atomic_inc_return(&next_seq);
	put_header(m, p.op, p.seq, len - TAKAKRYPT_HEADER_SIZE, 0);

	spin_lock(&nl_lock);
	portid = agent_portid;
	if (agent_disconnected && p.op != TAKAKRYPT_OP_HEALTH_CHECK)
		portid = 0;	/* a hung agent: deny now, not after 5 s each */
	if (portid)
		list_add_tail(&p.list, &pending);
	spin_unlock(&nl_lock);
	if (!portid)
		return -ENOTCONN;

	atomic64_inc(&st_requests);
	err = send_msg(portid, m, len, NULL);
	if (!err) {
		/* not killable: write-back of a killed task's fsync may be waiting here, and
		 * failing it would lose the page; 5 s at most */
		left = wait_for_completion_timeout(&p.done,
						   msecs_to_jiffies(TAKAKRYPT_TIMEOUT_MS));
		if (left == 0) {
			err = -ETIMEDOUT;
			atomic64_inc(&st_timeouts);
		}
	}
	spin_lock(&nl_lock);
	list_del(&p.list);
	spin_unlock(&nl_lock);
	/* answered after all (a race with the timeout): the answer wins only if complete */
	if (err && completion_done(&p.done) && p.resp)
		err = 0;
	if (!err)
		err = p.err;
	if (err) {
		kfree_sensitive(p.resp);
		return err;
	}
	*resp = p.resp;
	*resp_len = p.resp_len;
	return 0;
}

/* a response's non-SUCCESS TAKA status as an errno: every one denies (fail closed) */
int tkfs_nl_status(const u8 *resp)
{
	switch (get_unaligned_le32(resp + 20)) {
	case TAKAKRYPT_SUCCESS:
		return 0;
	case TAKAKRYPT_ERROR_DENIED:
		return -EACCES;
	case TAKAKRYPT_ERROR_NOT_FOUND:
		return -ENOKEY;
	case TAKAKRYPT_ERROR_TIMEOUT:
		return -ETIMEDOUT;
	default:
		return -EIO;
	}
}

int tkfs_nl_key_request(u32 gp_id, const char *name, u32 version, u8 *key, u32 *got_version)
{
	const u32 fixed = TAKAKRYPT_HEADER_SIZE + 12;
	size_t nlen = strlen(name);
	u8 m[TAKAKRYPT_HEADER_SIZE + 12 + TAKA_KEYID_MAX];
	u8 *r = NULL;
	u32 rlen = 0, idlen, klen, v;
	int err;

	if (!nlen || nlen > TAKA_KEYID_MAX)
		return -EINVAL;
	put_unaligned_le32(TAKAKRYPT_OP_KEY_REQUEST, m + 8);
	put_unaligned_le32(gp_id, m + 32);
	put_unaligned_le32(version, m + 36);
	put_unaligned_le32(nlen, m + 40);
	memcpy(m + fixed, name, nlen);
	err = tkfs_nl_call(m, fixed + nlen, &r, &rlen);
	if (err) {
		atomic64_inc(&tkfs_st_fail_closed);
		return err;
	}
	err = tkfs_nl_status(r);
	if (err)
		goto out;
	err = -EPROTO;
	if (get_unaligned_le32(r + 8) != (TAKAKRYPT_OP_KEY_REQUEST | TAKAKRYPT_MSG_RESPONSE))
		goto out;
	if (rlen < TAKAKRYPT_HEADER_SIZE + 16)
		goto out;
	v = get_unaligned_le32(r + 36);
	idlen = get_unaligned_le32(r + 40);
	klen = get_unaligned_le32(r + 44);
	if (get_unaligned_le32(r + 32) != TAKAKRYPT_ALG_AES_256_GCM || klen != TAKA_KEY_LEN ||
	    idlen != nlen || rlen != TAKAKRYPT_HEADER_SIZE + 16 + idlen + klen ||
	    memcmp(r + 48, name, nlen) || !v || (version && v != version))
		goto out;
	memcpy(key, r + 48 + idlen, TAKA_KEY_LEN);
	*got_version = v;
	err = 0;
out:
	kfree_sensitive(r);
	return err;
}

/* ---- health checks ------------------------------------------------------------------ */

static void health_fn(struct work_struct *w);
static DECLARE_DELAYED_WORK(health_work, health_fn);
static unsigned int health_interval = 60;
static unsigned int health_misses = 3;
static atomic64_t st_health_misses, st_disconnects;

static void health_arm(bool soon)
{
	unsigned int s = READ_ONCE(health_interval);

	if (!s || !READ_ONCE(agent_portid))
		return;
	if (soon)
		s = min(s, 5u);
	mod_delayed_work(system_unbound_wq, &health_work, (unsigned long)s * HZ);
}

static void health_fn(struct work_struct *w)
{
	u8 m[TAKAKRYPT_HEADER_SIZE] = { 0 };
	bool lost = false, back = false;
	u32 epoch, rlen;
	u8 *r = NULL;
	int err;

	spin_lock(&nl_lock);
	epoch = agent_epoch;
	spin_unlock(&nl_lock);
	if (!READ_ONCE(agent_portid) || !READ_ONCE(health_interval))
		return;
	put_unaligned_le32(TAKAKRYPT_OP_HEALTH_CHECK, m + 8);
	err = tkfs_nl_call(m, sizeof(m), &r, &rlen);
	if (!err)
		err = tkfs_nl_status(r);
	kfree_sensitive(r);

	spin_lock(&nl_lock);
	if (!agent_portid || epoch != agent_epoch) {	/* left, or another registered */
		spin_unlock(&nl_lock);
		return;
	}
	if (!err) {
		health_missed = 0;
		back = agent_disconnected;
		agent_disconnected = false;
	} else if (++health_missed >= max(READ_ONCE(health_misses), 1u) && !agent_disconnected) {
		agent_disconnected = true;
		lost = true;
	}
	spin_unlock(&nl_lock);
	if (err)
		atomic64_inc(&st_health_misses);
	if (lost) {
		atomic64_inc(&st_disconnects);
		pr_warn(TKFS_NAME ": agent (pid %d) missed %u health checks in a row (last: %d): "
			"disconnected, access denied until it answers\n", READ_ONCE(agent_tgid),
			health_missed, err);
		fail_pending(-ENOTCONN);
		tkfs_agent_gone();
	}
	if (back) {
		pr_info(TKFS_NAME ": agent (pid %d) answers again: reconnected\n",
			READ_ONCE(agent_tgid));
		tkfs_decisions_changed();
		tkfs_agent_back();
	}
	health_arm(READ_ONCE(agent_disconnected) || READ_ONCE(health_missed));
}

/* writing either parameter takes effect at once: the next check is rescheduled */
static int health_param_set(const char *val, const struct kernel_param *kp)
{
	int err = param_set_uint(val, kp);

	if (err)
		return err;
	if (!READ_ONCE(health_interval))
		cancel_delayed_work(&health_work);
	else
		health_arm(READ_ONCE(agent_disconnected));
	return 0;
}

static const struct kernel_param_ops health_param_ops = {
	.set = health_param_set,
	.get = param_get_uint,
};
module_param_cb(health_interval, &health_param_ops, &health_interval, 0644);
MODULE_PARM_DESC(health_interval,
		 "seconds between HEALTH_CHECKs to the agent (default 60; 0: none)");
module_param_cb(health_misses, &health_param_ops, &health_misses, 0644);
MODULE_PARM_DESC(health_misses,
		 "unanswered HEALTH_CHECKs in a row that mark the agent disconnected (default 3)");

static int reply_error(struct genl_info *info, const u8 *req, u32 status, const char *reason)
{
	u32 rlen = strlen(reason);
	u8 m[TAKAKRYPT_HEADER_SIZE + 4 + 96];

	if (rlen > 96)
		rlen = 96;
	put_header(m, get_unaligned_le32(req + 8) | TAKAKRYPT_MSG_RESPONSE,
		   get_unaligned_le32(req + 12), 4 + rlen, status);
	put_unaligned_le32(rlen, m + 32);
	memcpy(m + 36, reason, rlen);
	return send_msg(0, m, TAKAKRYPT_HEADER_SIZE + 4 + rlen, info);
}

static int serve_health(struct genl_info *info, const u8 *req)
{
	u8 m[TAKAKRYPT_HEADER_SIZE + 16];

	put_header(m, TAKAKRYPT_OP_HEALTH_CHECK | TAKAKRYPT_MSG_RESPONSE,
		   get_unaligned_le32(req + 12), 16, 0);
	put_unaligned_le32(TKFS_VERSION, m + 32);
	put_unaligned_le32((u32)((ktime_get_boottime_ns() - load_time) / NSEC_PER_SEC), m + 36);
	put_unaligned_le32(0, m + 40);
	put_unaligned_le32((u32)atomic64_read(&st_requests), m + 44);
	return send_msg(0, m, sizeof(m), info);
}

static int serve_status(struct genl_info *info, const u8 *req)
{
	u8 m[TAKAKRYPT_HEADER_SIZE + 104] = { 0 };
	u32 npending = 0, entries, capacity;
	struct tkfs_pending *p;

	spin_lock(&nl_lock);
	list_for_each_entry(p, &pending, list)
		npending++;
	spin_unlock(&nl_lock);
	put_header(m, TAKAKRYPT_OP_STATUS_REQUEST | TAKAKRYPT_MSG_RESPONSE,
		   get_unaligned_le32(req + 12), 104, 0);
	tkfs_dc_counts(&entries, &capacity);
	put_unaligned_le32(TAKAKRYPT_ENFORCER_KERNEL, m + 32);
	put_unaligned_le32(TKFS_VERSION, m + 36);
	put_unaligned_le32(tkfs_agent_present(), m + 40);
	put_unaligned_le32(READ_ONCE(config_count), m + 44);
	put_unaligned_le32(READ_ONCE(config_generation), m + 48);
	put_unaligned_le32(entries, m + 52);
	put_unaligned_le32(capacity, m + 56);
	put_unaligned_le32(npending, m + 60);
	put_unaligned_le64(atomic64_read(&tkfs_st_hits), m + 64);
	put_unaligned_le64(atomic64_read(&tkfs_st_misses), m + 72);
	put_unaligned_le64(atomic64_read(&st_requests), m + 80);
	put_unaligned_le64(atomic64_read(&st_timeouts), m + 88);
	put_unaligned_le64(atomic64_read(&tkfs_st_fail_closed), m + 96);
	put_unaligned_le64(atomic64_read(&tkfs_st_denials), m + 104);
	put_unaligned_le64(atomic64_read(&tkfs_st_eio), m + 112);
	put_unaligned_le64(atomic64_read(&tkfs_st_audit_sent), m + 120);
	put_unaligned_le64(atomic64_read(&tkfs_st_audit_drops), m + 128);
	return send_msg(0, m, sizeof(m), info);
}

/*
 * CONFIG_UPDATE: the complete set of guard points, all or nothing.  Part 1 uses it for
 * keys: a mount whose gp= id is not enabled in the set loses its keys (wiped) and gets
 * none until a later CONFIG_UPDATE enables it again; a mount without gp= follows "any
 * enabled guard point" (an empty set wipes it too).  An entry's `enabled` 2 (closed: the
 * agent cannot have its key, or its key cache dropped it) keeps the guard point's path
 * for the decisions but withdraws its keys as 0 does.
 */
#define TKFS_MAX_GP 1024
/* the last CONFIG_UPDATE applied (validated), for mounts made after it; tkfs_mounts_lock */
static u8 *last_cfg;
static u32 last_cfg_len;

/*
 * The enabled guard point id of a validated CONFIG_UPDATE as the path POLICY_CHECK names
 * files by (decide.c), without a trailing slash ("/" becomes ""); NULL if absent.  Its
 * state (enum takakrypt_gp_state) in *state unless state is NULL.
 */
static struct tkfs_gp *gp_from_cfg(const u8 *req, u32 len, u32 id, u32 *state)
{
	u32 version = get_unaligned_le32(req + 4);
	u32 fixed = version >= 2 ? 12 : 8, efixed = version >= 2 ? 20 : 16;
	u32 count = get_unaligned_le32(req + 32), off = TAKAKRYPT_HEADER_SIZE + fixed, i;
	struct tkfs_gp *gp;

	for (i = 0; i < count; i++) {
		u32 en = get_unaligned_le32(req + off);
		u32 nl = get_unaligned_le32(req + off + 4);
		u32 pl = get_unaligned_le32(req + off + 8);
		u32 ql = get_unaligned_le32(req + off + 12);
		u32 eid = version >= 2 ? get_unaligned_le32(req + off + 16) : i + 1;

		off += efixed;
		if (en && id && eid == id) {
			if (state)
				*state = en;
			gp = kmalloc(sizeof(*gp) + pl + 1, GFP_KERNEL);
			if (!gp)
				return NULL;
			memcpy(gp->path, req + off + nl, pl);
			while (pl > 1 && gp->path[pl - 1] == '/')
				pl--;
			if (pl == 1)
				pl = 0;
			gp->path[pl] = 0;
			gp->path_len = pl;
			return gp;
		}
		off += nl + pl + ql;
	}
	return NULL;
}

/* a new mount takes its guard point's path from the last CONFIG_UPDATE; tkfs_mounts_lock */
void tkfs_gp_attach(struct tkfs_sb *sbi)
{
	u32 state = 0;
	struct tkfs_gp *gp = last_cfg ? gp_from_cfg(last_cfg, last_cfg_len, sbi->gp_id,
						    &state) : NULL;

	rcu_assign_pointer(sbi->gp, gp);
	if (state == TAKAKRYPT_GP_CLOSED) {	/* no key until a CONFIG_UPDATE opens it */
		mutex_lock(&sbi->keys_lock);
		sbi->keys_revoked = true;
		mutex_unlock(&sbi->keys_lock);
	}
}

static int serve_config(struct genl_info *info, const u8 *req, u32 len)
{
	u32 version = get_unaligned_le32(req + 4);
	u32 fixed = version >= 2 ? 12 : 8, efixed = version >= 2 ? 20 : 16;
	u32 count, total, gen = 0, off, i;
	u32 *enabled_ids, *ids;
	u8 *copy;
	struct tkfs_sb *sbi;
	u8 m[TAKAKRYPT_HEADER_SIZE + 8];
	int err = 0;

	if (len < TAKAKRYPT_HEADER_SIZE + fixed)
		return -EINVAL;
	count = get_unaligned_le32(req + 32);
	total = get_unaligned_le32(req + 36);
	if (version >= 2)
		gen = get_unaligned_le32(req + 40);
	if (count > TKFS_MAX_GP || total != len - TAKAKRYPT_HEADER_SIZE - fixed)
		return -EINVAL;
	enabled_ids = kcalloc(2 * (count + 1), sizeof(u32), GFP_KERNEL);
	if (!enabled_ids)
		return -ENOMEM;
	ids = enabled_ids + count + 1;
	off = TAKAKRYPT_HEADER_SIZE + fixed;
	for (i = 0; i < count; i++) {
		u32 en, nl, pl, ql, id = i + 1, j;

		if (len - off < efixed) {
			err = -EINVAL;
			goto out;
		}
		en = get_unaligned_le32(req + off);
		nl = get_unaligned_le32(req + off + 4);
		pl = get_unaligned_le32(req + off + 8);
		ql = get_unaligned_le32(req + off + 12);
		if (version >= 2)
			id = get_unaligned_le32(req + off + 16);
		off += efixed;
		if (en > TAKAKRYPT_GP_CLOSED || !id || nl > len - off || pl > len - off - nl ||
		    ql > len - off - nl - pl) {
			err = -EINVAL;
			goto out;
		}
		for (j = 0; j < i; j++)		/* ids unique in the message */
			if (ids[j] == id) {
				err = -EINVAL;
				goto out;
			}
		if (memchr(req + off, 0, nl + pl + ql)) {
			err = -EINVAL;
			goto out;
		}
		if (en && (!pl || req[off + nl] != '/' || pl >= PATH_MAX)) {
			err = -EINVAL;	/* a guard point's path is absolute */
			goto out;
		}
		off += nl + pl + ql;
		ids[i] = id;
		enabled_ids[i] = en == TAKAKRYPT_GP_ENABLED ? id : 0;	/* not CLOSED */
	}
	if (off != len) {
		err = -EINVAL;
		goto out;
	}
	copy = kmemdup(req, len, GFP_KERNEL);
	if (!copy) {
		err = -ENOMEM;
		goto out;
	}
	WRITE_ONCE(config_generation, gen);
	WRITE_ONCE(config_count, count);
	mutex_lock(&tkfs_mounts_lock);
	kfree(last_cfg);
	last_cfg = copy;
	last_cfg_len = len;
	list_for_each_entry(sbi, &tkfs_mounts, all) {
		struct tkfs_gp *gp = NULL, *old;
		bool on = false;

		for (i = 0; i < count; i++)
			if (enabled_ids[i] && (!sbi->gp_id || enabled_ids[i] == sbi->gp_id))
				on = true;
		gp = gp_from_cfg(req, len, sbi->gp_id, NULL);
		old = rcu_replace_pointer(sbi->gp, gp, lockdep_is_held(&tkfs_mounts_lock));
		if (old)
			kfree_rcu(old, rcu);
		mutex_lock(&sbi->keys_lock);
		sbi->keys_revoked = !on;
		sbi->current_version = 0;	/* a reload may have rotated the key */
		mutex_unlock(&sbi->keys_lock);
		if (!on) {
			/* data keys now; the inodes' file keys in a work item, which must not
			 * wait here for a loader that waits for this very agent */
			tkfs_keys_wipe(sbi);
			schedule_work(&sbi->wipe_work);
		}
	}
	mutex_unlock(&tkfs_mounts_lock);
	tkfs_decisions_changed();	/* a reload: no cached decision survives it */
	put_header(m, TAKAKRYPT_OP_CONFIG_UPDATE | TAKAKRYPT_MSG_RESPONSE,
		   get_unaligned_le32(req + 12), 8, 0);
	put_unaligned_le32(count, m + 32);
	put_unaligned_le32(0, m + 36);
	err = send_msg(0, m, sizeof(m), info);
out:
	kfree(enabled_ids);
	return err;
}

static int tkfs_nl_register(struct sk_buff *skb, struct genl_info *info)
{
	spin_lock(&nl_lock);
	agent_portid = info->snd_portid;
	WRITE_ONCE(agent_tgid, task_tgid_nr(current));
	agent_disconnected = false;
	health_missed = 0;
	agent_epoch++;
	spin_unlock(&nl_lock);
	tkfs_decisions_changed();
	tkfs_agent_back();
	health_arm(false);
	pr_info(TKFS_NAME ": agent registered (netlink port %u)\n", info->snd_portid);
	return 0;
}

static int tkfs_nl_msg(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr *a = info->attrs[TAKAKRYPT_ATTR_MSG];
	struct tkfs_pending *p;
	u32 len, op, seq;
	u8 *m;
	int err;

	if (!a)
		return -EINVAL;
	m = nla_data(a);
	len = nla_len(a);
	err = check_header(m, len);
	if (err)
		goto wipe;
	op = get_unaligned_le32(m + 8);
	seq = get_unaligned_le32(m + 12);
	if (op & TAKAKRYPT_MSG_RESPONSE) {
		err = -ESRCH;
		spin_lock(&nl_lock);
		if (info->snd_portid == agent_portid) {
			err = -ENOENT;
			list_for_each_entry(p, &pending, list) {
				if (p->seq != seq || completion_done(&p->done))
					continue;
				err = -EINVAL;
				if ((p->op | TAKAKRYPT_MSG_RESPONSE) != op)
					break;
				p->resp = kmemdup(m, len, GFP_ATOMIC);
				p->resp_len = len;
				p->err = p->resp ? 0 : -ENOMEM;
				complete(&p->done);
				err = 0;
				break;
			}
		}
		spin_unlock(&nl_lock);
		goto wipe;
	}
	switch (op) {
	case TAKAKRYPT_OP_HEALTH_CHECK:
		err = len == TAKAKRYPT_HEADER_SIZE ? serve_health(info, m) : -EINVAL;
		break;
	case TAKAKRYPT_OP_STATUS_REQUEST:
		err = len == TAKAKRYPT_HEADER_SIZE ? serve_status(info, m) : -EINVAL;
		break;
	case TAKAKRYPT_OP_CONFIG_UPDATE:
		err = serve_config(info, m, len);
		break;
	default:
		err = reply_error(info, m, TAKAKRYPT_ERROR_INVALID,
				  "operation not served by takakryptfs");
	}
wipe:
	/* a KEY_REQUEST answer carries key bytes: leave none in the socket buffer */
	memzero_explicit(m, len);
	return err;
}

static const struct genl_small_ops tkfs_nl_ops[] = {
	{
		.cmd = TAKAKRYPT_CMD_MSG,
		.flags = GENL_ADMIN_PERM,
		.doit = tkfs_nl_msg,
	},
	{
		.cmd = TAKAKRYPT_CMD_REGISTER,
		.flags = GENL_ADMIN_PERM,
		.doit = tkfs_nl_register,
	},
};

static struct genl_family tkfs_family = {
	.name = TAKAKRYPT_GENL_NAME,
	.version = TAKAKRYPT_GENL_VERSION,
	.maxattr = TAKAKRYPT_ATTR_MAX,
	.policy = tkfs_nl_policy,
	.module = THIS_MODULE,
	.small_ops = tkfs_nl_ops,
	.n_small_ops = ARRAY_SIZE(tkfs_nl_ops),
	.netnsok = false,
};

/* the agent's socket closed: forget its port, fail what waits for it */
static int tkfs_nl_notify(struct notifier_block *nb, unsigned long state, void *data)
{
	struct netlink_notify *n = data;
	bool gone = false;

	if (state != NETLINK_URELEASE || n->protocol != NETLINK_GENERIC ||
	    !net_eq(n->net, &init_net))
		return NOTIFY_DONE;
	spin_lock(&nl_lock);
	if (agent_portid && n->portid == agent_portid) {
		agent_portid = 0;
		WRITE_ONCE(agent_tgid, 0);
		agent_disconnected = false;
		health_missed = 0;
		gone = true;
	}
	spin_unlock(&nl_lock);
	if (gone) {
		cancel_delayed_work(&health_work);
		/* cached decisions run out at their TTL; new ones are denied (no agent) */
		pr_info(TKFS_NAME ": agent left (netlink port %u)\n", n->portid);
		tkfs_agent_gone();
		fail_pending(-ENOTCONN);
	}
	return NOTIFY_DONE;
}

static struct notifier_block tkfs_nl_notifier = {
	.notifier_call = tkfs_nl_notify,
};

int tkfs_nl_init(void)
{
	int err;

	load_time = ktime_get_boottime_ns();
	err = genl_register_family(&tkfs_family);
	if (err)
		return err;
	err = netlink_register_notifier(&tkfs_nl_notifier);
	if (err)
		genl_unregister_family(&tkfs_family);
	return err;
}

void tkfs_nl_exit(void)
{
	netlink_unregister_notifier(&tkfs_nl_notifier);
	spin_lock(&nl_lock);
	agent_portid = 0;
	spin_unlock(&nl_lock);
	fail_pending(-ENOTCONN);
	cancel_delayed_work_sync(&health_work);
	genl_unregister_family(&tkfs_family);
	fail_pending(-ENOTCONN);
	kfree(last_cfg);
	last_cfg = NULL;
}
