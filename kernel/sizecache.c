// SPDX-License-Identifier: GPL-2.0
/*
 * sizecache.c - plaintext sizes of files whose inodes were evicted, so that a stat after
 * the inode cache was dropped (a cold `ls -lR`) needs no lower open, no header read and
 * no key derivation.  The FUSE engine keeps the same cache (src/_native/fuse_ops.c).
 *
 * An entry is made when an inode whose header was verified (or written) through this
 * mount is evicted with every block and the size stored.  It is keyed by the lower
 * inode (number, generation) and only matches while the lower file keeps the stored
 * size and ctime it had then, and while the key epoch is unchanged: any write to the
 * lower file, by this mount or anyone else, changes its ctime (and a size change its
 * stored size), and a key wipe bumps the epoch, so a stale entry never matches.  Opening
 * a file always reads and verifies its header; the cache only ever answers stat.
 *
 * Set-associative, least recently used out, per mount: TKFS_SZC_SETS x TKFS_SZC_WAYS
 * entries of 48 bytes (384 KiB), under a spinlock (a stat holds it for one set scan).
 */
#include <linux/slab.h>
#include <linux/hash.h>
#include <linux/spinlock.h>

#include "tkfs.h"

#define TKFS_SZC_SETS	2048
#define TKFS_SZC_WAYS	4

struct tkfs_szent {
	unsigned long ino;		/* 0: free */
	u32 gen;
	int epoch;
	loff_t stored;
	struct timespec64 ctime;
	u64 plain;
};

int tkfs_szc_init(struct tkfs_sb *sbi)
{
	spin_lock_init(&sbi->szc_lock);
	sbi->szc = kvcalloc(TKFS_SZC_SETS * TKFS_SZC_WAYS, sizeof(struct tkfs_szent),
			    GFP_KERNEL);
	return sbi->szc ? 0 : -ENOMEM;
}

void tkfs_szc_exit(struct tkfs_sb *sbi)
{
	kvfree(sbi->szc);
	sbi->szc = NULL;
}

static struct tkfs_szent *szc_set(struct tkfs_sb *sbi, unsigned long ino)
{
	return sbi->szc + hash_long(ino, ilog2(TKFS_SZC_SETS)) * TKFS_SZC_WAYS;
}

/* move way w of a set to the front (most recently used) */
static void szc_front(struct tkfs_szent *set, int w)
{
	struct tkfs_szent e = set[w];

	for (; w > 0; w--)
		set[w] = set[w - 1];
	set[0] = e;
}

/* the plaintext size of lower if an entry still matches it */
bool tkfs_szc_get(struct tkfs_sb *sbi, struct inode *lower, u64 *plain)
{
	int epoch = atomic_read(&sbi->key_epoch), w;
	loff_t stored = i_size_read(lower);
	struct timespec64 ct = lower->i_ctime;
	struct tkfs_szent *set;
	bool hit = false;

	if (!sbi->szc || !lower->i_ino)
		return false;
	spin_lock(&sbi->szc_lock);
	set = szc_set(sbi, lower->i_ino);
	for (w = 0; w < TKFS_SZC_WAYS; w++) {
		struct tkfs_szent *e = &set[w];

		if (e->ino != lower->i_ino)
			continue;
		hit = e->gen == lower->i_generation && e->stored == stored &&
		      timespec64_equal(&e->ctime, &ct) && e->epoch == epoch;
		if (hit) {
			*plain = e->plain;
			szc_front(set, w);
		}
		break;		/* one entry per file */
	}
	spin_unlock(&sbi->szc_lock);
	return hit;
}

/* remember lower's plaintext size (verified under key epoch `epoch`) */
void tkfs_szc_put(struct tkfs_sb *sbi, struct inode *lower, u64 plain, int epoch)
{
	struct tkfs_szent *set, *e;
	int w = 0;

	if (!sbi->szc || !lower->i_ino)
		return;
	spin_lock(&sbi->szc_lock);
	set = szc_set(sbi, lower->i_ino);
	while (w < TKFS_SZC_WAYS - 1 && set[w].ino != lower->i_ino)
		w++;		/* this file's entry, else the least recently used */
	szc_front(set, w);
	e = &set[0];
	e->ino = lower->i_ino;
	e->gen = lower->i_generation;
	e->epoch = epoch;
	e->stored = i_size_read(lower);
	e->ctime = lower->i_ctime;
	e->plain = plain;
	spin_unlock(&sbi->szc_lock);
}
