// SPDX-License-Identifier: GPL-2.0
/*
 * audit.c - AUDIT_EVENTs to takakryptd (docs/protocol.md): what the module decided on its
 * own (a cached decision with the audit, would-deny or deny effect; a denial because no
 * decision could be had; an integrity failure).  The I/O path never waits: tkfs_audit()
 * copies the event into a bounded queue (TKFS_AUDIT_QUEUE events, allocation without
 * sleeping) and a worker sends them one by one, each acknowledged by the agent.  An
 * event equal to the newest queued one (kind, caller, action, effects, path, process,
 * detail) only raises that one's count: a loop of denied opens is one event with a
 * count.  A full queue, a failed allocation or no agent drop the event, counted
 * (STATUS_REQUEST audit_drops).
 */
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <linux/string.h>
#include <asm/unaligned.h>

#include "tkfs.h"

#define TKFS_AUDIT_QUEUE	256
#define TKFS_AUDIT_STR_MAX	1024	/* path and process cut to this (the tail is kept) */

struct tkfs_aq {
	struct list_head list;
	struct tkfs_audit_ev ev;	/* strings point into data */
	u32 count;
	char data[];
};

static DEFINE_SPINLOCK(aq_lock);
static LIST_HEAD(aq);
static unsigned int aq_len;
atomic64_t tkfs_st_audit_sent, tkfs_st_audit_drops;

static void aq_work(struct work_struct *w);
static DECLARE_WORK(aq_worker, aq_work);

void tkfs_audit_dropped(void)
{
	atomic64_inc(&tkfs_st_audit_drops);
}

static bool same_str(const char *a, u32 al, const char *b, u32 bl)
{
	return al == bl && (!al || !memcmp(a, b, al));
}

static bool same_event(const struct tkfs_audit_ev *a, const struct tkfs_audit_ev *b)
{
	return a->kind == b->kind && a->pid == b->pid && a->tid == b->tid &&
	       a->uid == b->uid && a->gid == b->gid && a->action == b->action &&
	       a->effects == b->effects && a->rule == b->rule && a->gp_id == b->gp_id &&
	       a->error == b->error &&
	       same_str(a->path, a->path_len, b->path, b->path_len) &&
	       same_str(a->process, a->process_len, b->process, b->process_len) &&
	       same_str(a->detail, a->detail ? strlen(a->detail) : 0,
			b->detail, b->detail ? strlen(b->detail) : 0);
}

void tkfs_audit(const struct tkfs_audit_ev *ev)
{
	u32 pl = min_t(u32, ev->path_len, TKFS_AUDIT_STR_MAX);
	u32 xl = min_t(u32, ev->process_len, TKFS_AUDIT_STR_MAX);
	u32 dl = ev->detail ? min_t(u32, strlen(ev->detail), 200) : 0;
	struct tkfs_aq *q, *last;

	if (!tkfs_agent_present()) {
		tkfs_audit_dropped();
		return;
	}
	q = kmalloc(sizeof(*q) + pl + xl + dl + 1, GFP_NOWAIT | __GFP_NOWARN);
	if (!q) {
		tkfs_audit_dropped();
		return;
	}
	q->ev = *ev;
	q->count = 1;
	if (pl)
		memcpy(q->data, ev->path + (ev->path_len - pl), pl);
	if (xl)
		memcpy(q->data + pl, ev->process + (ev->process_len - xl), xl);
	if (dl)
		memcpy(q->data + pl + xl, ev->detail, dl);
	q->data[pl + xl + dl] = 0;
	q->ev.path = q->data;
	q->ev.path_len = pl;
	q->ev.process = q->data + pl;
	q->ev.process_len = xl;
	q->ev.detail = dl ? q->data + pl + xl : NULL;

	spin_lock(&aq_lock);
	last = list_empty(&aq) ? NULL : list_last_entry(&aq, struct tkfs_aq, list);
	if (last && same_event(&last->ev, &q->ev) && last->count < U32_MAX) {
		last->count++;
		spin_unlock(&aq_lock);
		kfree(q);
		return;
	}
	if (aq_len >= TKFS_AUDIT_QUEUE) {
		spin_unlock(&aq_lock);
		kfree(q);
		tkfs_audit_dropped();
		return;
	}
	list_add_tail(&q->list, &aq);
	aq_len++;
	spin_unlock(&aq_lock);
	queue_work(system_unbound_wq, &aq_worker);
}

static int send_event(const struct tkfs_aq *q)
{
	const u32 fixed = TAKAKRYPT_HEADER_SIZE + 56;
	u32 dl = q->ev.detail ? strlen(q->ev.detail) : 0;
	u32 len = fixed + q->ev.path_len + q->ev.process_len + dl;
	u8 *m = kmalloc(len, GFP_KERNEL), *r = NULL, *p;
	u32 rlen;
	int err;

	if (!m)
		return -ENOMEM;
	put_unaligned_le32(TAKAKRYPT_OP_AUDIT_EVENT, m + 8);
	put_unaligned_le32(q->ev.kind, m + 32);
	put_unaligned_le32(q->count, m + 36);
	put_unaligned_le32(q->ev.pid, m + 40);
	put_unaligned_le32(q->ev.tid, m + 44);
	put_unaligned_le32(q->ev.uid, m + 48);
	put_unaligned_le32(q->ev.gid, m + 52);
	put_unaligned_le32(q->ev.action, m + 56);
	put_unaligned_le32(q->ev.effects, m + 60);
	put_unaligned_le32((u32)q->ev.rule, m + 64);
	put_unaligned_le32(q->ev.gp_id, m + 68);
	put_unaligned_le32(q->ev.error, m + 72);
	put_unaligned_le32(q->ev.path_len, m + 76);
	put_unaligned_le32(q->ev.process_len, m + 80);
	put_unaligned_le32(dl, m + 84);
	p = m + fixed;
	memcpy(p, q->ev.path, q->ev.path_len);
	p += q->ev.path_len;
	memcpy(p, q->ev.process, q->ev.process_len);
	p += q->ev.process_len;
	if (dl)
		memcpy(p, q->ev.detail, dl);
	err = tkfs_nl_call(m, len, &r, &rlen);
	if (!err)
		err = tkfs_nl_status(r);
	kfree(r);
	kfree(m);
	return err;
}

static void aq_work(struct work_struct *w)
{
	struct tkfs_aq *q;

	for (;;) {
		spin_lock(&aq_lock);
		q = list_first_entry_or_null(&aq, struct tkfs_aq, list);
		if (q) {
			list_del(&q->list);
			aq_len--;
		}
		spin_unlock(&aq_lock);
		if (!q)
			return;
		if (send_event(q))
			atomic64_add(q->count, &tkfs_st_audit_drops);
		else
			atomic64_inc(&tkfs_st_audit_sent);
		kfree(q);
	}
}

void tkfs_audit_exit(void)
{
	struct tkfs_aq *q, *n;

	cancel_work_sync(&aq_worker);
	spin_lock(&aq_lock);
	list_for_each_entry_safe(q, n, &aq, list) {
		list_del(&q->list);
		kfree(q);
	}
	aq_len = 0;
	spin_unlock(&aq_lock);
}
