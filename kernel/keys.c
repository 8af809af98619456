// SPDX-License-Identifier: GPL-2.0
/*
 * keys.c - the data keys of a mount, by (name, version), fetched from the agent with
 * KEY_REQUEST over generic netlink.  They live only here, in kernel memory tied to the
 * mount; nothing reads them back out; they are wiped (kfree_sensitive) on unmount and
 * when the agent's CONFIG_UPDATE no longer enables the mount's guard point.
 */
#include <linux/slab.h>
#include <linux/string.h>

#include "tkfs.h"

static struct tkfs_key *find_key(struct tkfs_sb *sbi, const char *name, u32 version)
{
	struct tkfs_key *k;

	list_for_each_entry(k, &sbi->keys, list)
		if (k->version == version && !strcmp(k->name, name))
			return k;
	return NULL;
}

/*
 * The data key (name, version) into out (32 bytes; the caller wipes it).  version 0 asks
 * for the current version of the mount's key; got_version says which one it is.  Without
 * an agent registered, a key not held already fails at once (-ENOKEY) rather than
 * waiting for the 5 s timeout.
 */
int tkfs_key_get(struct tkfs_sb *sbi, const char *name, u32 version, u8 *out, u32 *got_version)
{
	struct tkfs_key *k, *nk;
	u8 key[TAKA_KEY_LEN];
	u32 v = 0;
	int err;

	mutex_lock(&sbi->keys_lock);
	if (sbi->keys_revoked) {
		mutex_unlock(&sbi->keys_lock);
		return -ENOKEY;
	}
	if (!version && !strcmp(name, sbi->key_name))
		version = sbi->current_version;
	k = version ? find_key(sbi, name, version) : NULL;
	if (k) {
		memcpy(out, k->key, TAKA_KEY_LEN);
		if (got_version)
			*got_version = k->version;
		mutex_unlock(&sbi->keys_lock);
		return 0;
	}
	mutex_unlock(&sbi->keys_lock);

	err = tkfs_nl_key_request(sbi->gp_id, name, version, key, &v);
	if (err)
		return err;
	nk = kzalloc(sizeof(*nk), GFP_KERNEL);
	if (!nk) {
		memzero_explicit(key, sizeof(key));
		return -ENOMEM;
	}
	mutex_lock(&sbi->keys_lock);
	if (sbi->keys_revoked) {	/* wiped while we asked: do not keep what came back */
		mutex_unlock(&sbi->keys_lock);
		kfree_sensitive(nk);
		memzero_explicit(key, sizeof(key));
		return -ENOKEY;
	}
	k = find_key(sbi, name, v);
	if (!k) {
		strscpy(nk->name, name, sizeof(nk->name));
		nk->version = v;
		memcpy(nk->key, key, TAKA_KEY_LEN);
		list_add(&nk->list, &sbi->keys);
		k = nk;
		nk = NULL;
	}
	if (!version && !strcmp(name, sbi->key_name))
		sbi->current_version = v;
	memcpy(out, k->key, TAKA_KEY_LEN);
	mutex_unlock(&sbi->keys_lock);
	kfree_sensitive(nk);
	memzero_explicit(key, sizeof(key));
	if (got_version)
		*got_version = v;
	return 0;
}

/* drop every data key of the mount; file keys go with tkfs_wipe_sb_keys (super.c) */
void tkfs_keys_wipe(struct tkfs_sb *sbi)
{
	struct tkfs_key *k, *tmp;

	mutex_lock(&sbi->keys_lock);
	list_for_each_entry_safe(k, tmp, &sbi->keys, list) {
		list_del(&k->list);
		kfree_sensitive(k);
	}
	sbi->current_version = 0;
	atomic_inc(&sbi->key_epoch);
	mutex_unlock(&sbi->keys_lock);
}
