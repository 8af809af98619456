/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * takakrypt_ioctl.h - ioctls of takakryptfs files (docs/kernel.md, "Live rekey").
 *
 * For takakryptd only (the agent registered over generic netlink; anyone else gets
 * EPERM), on a regular file it opened through the mount.  TAKA v2 files only (EOPNOTSUPP
 * for v1): a v2 block carries its key version, so blocks are sealed again in place, one
 * at a time, through the page cache, while applications keep the file open and in use.
 *
 * REKEY_RANGE moves the header's write version up to `version` if it is older, seals
 * again every stored block of [start, start + count) whose version is older than
 * `version` (holes stay holes; blocks already at `version` or newer are left alone) and
 * stores them before it returns.  REKEY_FINISH stores what is dirty, checks that every
 * stored block is at `version` or newer (EAGAIN with `stale` set if not: a raw write
 * came in between), makes the blocks durable, then raises the header's oldest version
 * to `version` and makes that durable.
 *
 * The Python twin is src/takakrypt/agent/krekey.py (tests/test_krekey.py compares).
 */
#ifndef _UAPI_LINUX_TAKAKRYPT_IOCTL_H
#define _UAPI_LINUX_TAKAKRYPT_IOCTL_H

#include <linux/types.h>
#include <linux/ioctl.h>

struct takakrypt_rekey_range {
	__u64 start;		/* in: first block to look at */
	__u32 count;		/* in: blocks to look at, 1 ... TAKAKRYPT_REKEY_MAX_BLOCKS */
	__u32 version;		/* in: the target key version, >= 1 */
	__u64 next;		/* out: the first block not looked at (>= blocks: the end) */
	__u64 blocks;		/* out: blocks of the file (its plaintext size in blocks) */
	__u64 rewritten;	/* out: blocks sealed again by this call */
	__u32 write_version;	/* out: the header's write version now */
	__u32 reserved;		/* in: 0 */
};

struct takakrypt_rekey_finish {
	__u32 version;		/* in: the target key version, >= 1 */
	__u32 oldest;		/* out: the header's oldest version now */
	__u64 stale;		/* out: stored blocks still under an older version */
};

#define TAKAKRYPT_REKEY_MAX_BLOCKS	4096u
#define TAKAKRYPT_IOC_REKEY_RANGE	_IOWR('T', 0x70, struct takakrypt_rekey_range)
#define TAKAKRYPT_IOC_REKEY_FINISH	_IOWR('T', 0x71, struct takakrypt_rekey_finish)

#endif /* _UAPI_LINUX_TAKAKRYPT_IOCTL_H */
