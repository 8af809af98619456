/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * takakrypt.h - the TAKA wire protocol between enforcement points and the agent.
 *
 * Shared by the kernel module (generic netlink), the FUSE data path (SOCK_SEQPACKET,
 * in-process ring) and, as documentation, the Python agent
 * (src/takakrypt/protocol/); tests/test_protocol_layout.py proves that the Python
 * module and this header agree byte for byte.  The byte tables are in
 * docs/protocol.md.
 *
 * A message is one struct takakrypt_msg_header followed by header.payload_size
 * bytes; header + payload <= TAKAKRYPT_MAX_MSG_SIZE.  Every struct below that starts
 * with a header describes a whole message's fixed part; its variable fields follow
 * it back to back in the order given in the comment, each sized by its *_len field.
 * Strings carry no NUL and no terminator.  All integers are little-endian.
 *
 * Version 1 is the seed layout; version 2 appends the fields marked "v2" to the
 * fixed part (and variable fields marked "v2" after the seed's).  The size of a
 * version 1 fixed part is TAKAKRYPT_<STRUCT>_V1_SIZE.
 */
#ifndef _UAPI_LINUX_TAKAKRYPT_H
#define _UAPI_LINUX_TAKAKRYPT_H

#if defined(__KERNEL__)
#include <linux/types.h>
#else
#include <stdint.h>
#if defined(__linux__)
#include <linux/types.h>		/* __u32 etc. from the uapi headers */
#else
/* userspace off Linux (tools, tests on other hosts): the same widths from stdint */
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef int32_t __s32;
typedef uint64_t __u64;
#endif
#endif

#define TAKAKRYPT_PACKED __attribute__((packed))

/* ---- protocol constants ------------------------------------------------------- */

#define TAKAKRYPT_MSG_MAGIC		0x54414B41u	/* "TAKA" */
#define TAKAKRYPT_PROTOCOL_VERSION	2u		/* what we send */
#define TAKAKRYPT_PROTOCOL_MIN_VERSION	1u		/* oldest we accept */
#define TAKAKRYPT_HEADER_SIZE		32u
#define TAKAKRYPT_MAX_MSG_SIZE		8192u		/* header included */
#define TAKAKRYPT_MAX_PAYLOAD_SIZE	(TAKAKRYPT_MAX_MSG_SIZE - TAKAKRYPT_HEADER_SIZE)
#define TAKAKRYPT_MSG_RESPONSE		0x80000000u	/* bit 31 of header.operation */
#define TAKAKRYPT_TIMEOUT_MS		5000u		/* then fail closed: deny */

/* ---- generic netlink transport --------------------------------------------------
 * Family "takakrypt", version TAKAKRYPT_GENL_VERSION.  TAKAKRYPT_CMD_MSG carries one
 * whole TAKA message in TAKAKRYPT_ATTR_MSG (NLA_BINARY, 32..TAKAKRYPT_MAX_MSG_SIZE
 * bytes) in either direction.  TAKAKRYPT_CMD_REGISTER (no attributes) tells the
 * kernel which port id the agent listens on.  Both need CAP_NET_ADMIN
 * (GENL_ADMIN_PERM).
 */
#define TAKAKRYPT_GENL_NAME		"takakrypt"
#define TAKAKRYPT_GENL_VERSION		1u

enum takakrypt_genl_cmd {
	TAKAKRYPT_CMD_UNSPEC = 0,
	TAKAKRYPT_CMD_MSG = 1,
	TAKAKRYPT_CMD_REGISTER = 2,
	__TAKAKRYPT_CMD_MAX,
};
#define TAKAKRYPT_CMD_MAX (__TAKAKRYPT_CMD_MAX - 1)

enum takakrypt_genl_attr {
	TAKAKRYPT_ATTR_UNSPEC = 0,
	TAKAKRYPT_ATTR_MSG = 1,
	__TAKAKRYPT_ATTR_MAX,
};
#define TAKAKRYPT_ATTR_MAX (__TAKAKRYPT_ATTR_MAX - 1)

/* ---- enumerations --------------------------------------------------------------- */

enum takakrypt_operation {
	TAKAKRYPT_OP_HEALTH_CHECK = 0,
	TAKAKRYPT_OP_POLICY_CHECK = 1,
	TAKAKRYPT_OP_ENCRYPT = 2,
	TAKAKRYPT_OP_DECRYPT = 3,
	TAKAKRYPT_OP_KEY_REQUEST = 4,
	TAKAKRYPT_OP_CONFIG_UPDATE = 5,
	TAKAKRYPT_OP_AUDIT_EVENT = 6,
	TAKAKRYPT_OP_STATUS_REQUEST = 7,
};

enum takakrypt_status {
	TAKAKRYPT_SUCCESS = 0,
	TAKAKRYPT_ERROR_INVALID = 1,
	TAKAKRYPT_ERROR_DENIED = 2,
	TAKAKRYPT_ERROR_NOT_FOUND = 3,
	TAKAKRYPT_ERROR_CRYPTO = 4,
	TAKAKRYPT_ERROR_MEMORY = 5,
	TAKAKRYPT_ERROR_TIMEOUT = 6,
	TAKAKRYPT_ERROR_NETWORK = 7,
	TAKAKRYPT_ERROR_INTERNAL = 8,
};

/* actions of the policy language; NONE only in audit events that are not accesses */
enum takakrypt_action {
	TAKAKRYPT_ACTION_NONE = 0,
	TAKAKRYPT_ACTION_READ = 1,
	TAKAKRYPT_ACTION_WRITE = 2,
	TAKAKRYPT_ACTION_APPEND = 3,
	TAKAKRYPT_ACTION_TRUNCATE = 4,
	TAKAKRYPT_ACTION_CREATE = 5,
	TAKAKRYPT_ACTION_DELETE = 6,
	TAKAKRYPT_ACTION_RENAME = 7,
	TAKAKRYPT_ACTION_LINK = 8,
	TAKAKRYPT_ACTION_GETATTR = 9,
	TAKAKRYPT_ACTION_SETATTR = 10,
	TAKAKRYPT_ACTION_LIST = 11,
	TAKAKRYPT_ACTION_MKDIR = 12,
	TAKAKRYPT_ACTION_RMDIR = 13,
	TAKAKRYPT_ACTION_GETXATTR = 14,
	TAKAKRYPT_ACTION_SETXATTR = 15,
};

/* effects bitmask: exactly one of PERMIT/DENY; APPLY_KEY and WOULD_DENY need PERMIT */
enum takakrypt_effect {
	TAKAKRYPT_EFFECT_PERMIT = 1u << 0,
	TAKAKRYPT_EFFECT_DENY = 1u << 1,
	TAKAKRYPT_EFFECT_APPLY_KEY = 1u << 2,	/* plaintext view; else raw ciphertext */
	TAKAKRYPT_EFFECT_AUDIT = 1u << 3,
	TAKAKRYPT_EFFECT_WOULD_DENY = 1u << 4,	/* learn mode let a deny through */
	/* not an effect: a caching hint.  The decision holds for every path of the guard
	 * point for this caller and action (no resource set took part in it), so the
	 * enforcement point may cache it once for all paths (same TTL). */
	TAKAKRYPT_EFFECT_ANY_PATH = 1u << 5,
	/* not an effect: a caching hint.  The decision holds for every process of this uid
	 * and gid (the policy names no process set and no group list: it is process-free),
	 * so the enforcement point may cache it once for all of them (same TTL). */
	TAKAKRYPT_EFFECT_ANY_PROCESS = 1u << 6,
};
#define TAKAKRYPT_EFFECT_MASK 0x7Fu

enum takakrypt_algorithm {
	TAKAKRYPT_ALG_AES_256_GCM = 1,
};

enum takakrypt_audit_kind {
	TAKAKRYPT_AUDIT_ACCESS = 1,
	TAKAKRYPT_AUDIT_INTEGRITY = 2,
	TAKAKRYPT_AUDIT_FORMAT = 3,
	TAKAKRYPT_AUDIT_KEY_UNAVAILABLE = 4,
	TAKAKRYPT_AUDIT_AGENT_UNAVAILABLE = 5,
};

/* takakrypt_guard_point_entry.enabled (CONFIG_UPDATE) */
enum takakrypt_gp_state {
	TAKAKRYPT_GP_DISABLED = 0,	/* configured, not enforced */
	TAKAKRYPT_GP_ENABLED = 1,	/* enforced */
	TAKAKRYPT_GP_CLOSED = 2,	/* enforced, its keys withdrawn: wipe them, ask for none */
};

enum takakrypt_enforcer {
	TAKAKRYPT_ENFORCER_KERNEL = 1,
	TAKAKRYPT_ENFORCER_FUSE = 2,
};

/* ---- header ------------------------------------------------------------------------ */

struct takakrypt_msg_header {
	__u32 magic;		/* TAKAKRYPT_MSG_MAGIC */
	__u32 version;		/* 1 or 2 */
	__u32 operation;	/* enum takakrypt_operation | TAKAKRYPT_MSG_RESPONSE */
	__u32 sequence;		/* chosen by the requester, echoed in the response */
	__u32 payload_size;	/* bytes after the header */
	__u32 status;		/* enum takakrypt_status; 0 in requests */
	__u64 timestamp;	/* CLOCK_REALTIME of the sender, ns since the epoch */
} TAKAKRYPT_PACKED;

/* ---- HEALTH_CHECK -------------------------------------------------------------------- */

struct takakrypt_health_request {
	struct takakrypt_msg_header header;
} TAKAKRYPT_PACKED;

struct takakrypt_health_response {
	struct takakrypt_msg_header header;
	__u32 agent_version;		/* major << 16 | minor << 8 | patch */
	__u32 uptime_seconds;
	__u32 active_workers;
	__u32 processed_requests;
} TAKAKRYPT_PACKED;

/* ---- POLICY_CHECK -------------------------------------------------------------------- */

/* variable: path, process (executable path), cwd, v2: target */
struct takakrypt_policy_request {
	struct takakrypt_msg_header header;
	__u32 pid;			/* thread group id */
	__u32 uid;			/* fsuid */
	__u32 gid;			/* fsgid */
	__u32 action;			/* enum takakrypt_action, not NONE */
	__u32 path_len;
	__u32 process_len;
	__u32 cwd_len;
	/* v2 */
	__u32 tid;			/* thread id (task pid) */
	__u64 start_time;		/* clock ticks after boot, as /proc/PID/stat field 22 */
	__u64 exe_dev;			/* st_dev of the executable (huge_encode_dev) */
	__u64 exe_ino;
	__u32 guard_point_id;		/* from CONFIG_UPDATE, 0 = unknown */
	__u32 target_len;		/* rename/link destination, else 0 */
} TAKAKRYPT_PACKED;

/* variable: key_id, policy, reason */
struct takakrypt_policy_response {
	struct takakrypt_msg_header header;
	__u32 allow_access;		/* = effects & PERMIT */
	__u32 encrypt_file;		/* = effects & APPLY_KEY */
	__u32 audit_action;		/* = effects & AUDIT */
	__u32 key_id_len;
	__u32 policy_len;
	__u32 reason_len;
	/* v2 */
	__u32 effects;			/* enum takakrypt_effect bits */
	__s32 rule_index;		/* -1: no rule matched */
	__u32 key_version;
	__u32 cache_ttl_ms;		/* 0: do not cache */
} TAKAKRYPT_PACKED;

/* ---- ENCRYPT / DECRYPT (fallback data path) ------------------------------------------ */

/* variable: key_id, metadata (associated data), data (plaintext) */
struct takakrypt_encrypt_request {
	struct takakrypt_msg_header header;
	__u32 algorithm;		/* enum takakrypt_algorithm */
	__u32 data_len;
	__u32 key_id_len;
	__u32 metadata_len;
	/* v2 */
	__u32 key_version;		/* 0: current */
} TAKAKRYPT_PACKED;

/* variable: encrypted = nonce (iv_len) | ciphertext | tag (tag_len) */
struct takakrypt_encrypt_response {
	struct takakrypt_msg_header header;
	__u32 encrypted_len;
	__u32 iv_len;
	__u32 tag_len;
	/* v2 */
	__u32 key_version;		/* the version used */
} TAKAKRYPT_PACKED;

/* variable: key_id, iv, tag, encrypted (ciphertext only), v2: metadata */
struct takakrypt_decrypt_request {
	struct takakrypt_msg_header header;
	__u32 algorithm;
	__u32 encrypted_len;
	__u32 key_id_len;
	__u32 iv_len;
	__u32 tag_len;
	/* v2 */
	__u32 key_version;		/* 0: current */
	__u32 metadata_len;
} TAKAKRYPT_PACKED;

/* variable: plaintext */
struct takakrypt_decrypt_response {
	struct takakrypt_msg_header header;
	__u32 plaintext_len;
	__u32 checksum;			/* CRC-32 (IEEE, as zlib) of the plaintext */
} TAKAKRYPT_PACKED;

/* ---- KEY_REQUEST --------------------------------------------------------------------- */

/* variable: key_id */
struct takakrypt_key_request {
	struct takakrypt_msg_header header;
	__u32 guard_point_id;
	__u32 key_version;		/* 0: current */
	__u32 key_id_len;
} TAKAKRYPT_PACKED;

/* variable: key_id, key (secret: zero after use) */
struct takakrypt_key_response {
	struct takakrypt_msg_header header;
	__u32 algorithm;
	__u32 key_version;
	__u32 key_id_len;
	__u32 key_len;
} TAKAKRYPT_PACKED;

/* ---- CONFIG_UPDATE ------------------------------------------------------------------- */

/* variable: name, path, policy */
struct takakrypt_guard_point_entry {
	__u32 enabled;			/* 0 or 1 */
	__u32 name_len;
	__u32 path_len;
	__u32 policy_len;
	/* v2 */
	__u32 id;			/* non-zero, unique in the message */
} TAKAKRYPT_PACKED;

/* variable: guard_point_count entries (total_data_len bytes) */
struct takakrypt_config_request {
	struct takakrypt_msg_header header;
	__u32 guard_point_count;
	__u32 total_data_len;
	/* v2 */
	__u32 generation;		/* policy generation; a new one flushes caches */
} TAKAKRYPT_PACKED;

struct takakrypt_config_response {
	struct takakrypt_msg_header header;
	__u32 configured_count;
	__u32 error_count;
} TAKAKRYPT_PACKED;

/* ---- AUDIT_EVENT --------------------------------------------------------------------- */

/* variable: path, process, detail */
struct takakrypt_audit_event {
	struct takakrypt_msg_header header;
	__u32 kind;			/* enum takakrypt_audit_kind */
	__u32 count;			/* >= 1: identical events coalesced */
	__u32 pid;
	__u32 tid;
	__u32 uid;			/* (__u32)-1: unknown */
	__u32 gid;
	__u32 action;			/* enum takakrypt_action */
	__u32 effects;
	__s32 rule_index;
	__u32 guard_point_id;
	__u32 error;			/* positive errno given to the application, 0 = none */
	__u32 path_len;
	__u32 process_len;
	__u32 detail_len;
} TAKAKRYPT_PACKED;

struct takakrypt_audit_response {
	struct takakrypt_msg_header header;
} TAKAKRYPT_PACKED;

/* ---- STATUS_REQUEST ------------------------------------------------------------------ */

struct takakrypt_status_request {
	struct takakrypt_msg_header header;
} TAKAKRYPT_PACKED;

struct takakrypt_status_response {
	struct takakrypt_msg_header header;
	__u32 enforcer;			/* enum takakrypt_enforcer */
	__u32 impl_version;
	__u32 agent_connected;		/* 0 or 1 */
	__u32 guard_point_count;
	__u32 config_generation;
	__u32 cache_entries;
	__u32 cache_capacity;
	__u32 pending_requests;
	__u64 cache_hits;
	__u64 cache_misses;
	__u64 requests_sent;
	__u64 requests_timed_out;
	__u64 fail_closed_denials;
	/* v2 */
	__u64 policy_denials;		/* accesses the agent's decisions (cached or not) denied */
	__u64 integrity_errors;		/* EIO for a bad header, tag or length */
	__u64 audit_events;		/* AUDIT_EVENTs sent (each may stand for count events) */
	__u64 audit_drops;		/* audit events dropped (queue full, no agent) */
} TAKAKRYPT_PACKED;

/* ---- any response with status != SUCCESS --------------------------------------------- */

/* variable (v2): reason; version 1 error responses have no payload */
struct takakrypt_error_response {
	struct takakrypt_msg_header header;
	/* v2 */
	__u32 reason_len;
} TAKAKRYPT_PACKED;

/* ---- version 1 (seed) fixed sizes ---------------------------------------------------- */

#define TAKAKRYPT_POLICY_REQUEST_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 28u)
#define TAKAKRYPT_POLICY_RESPONSE_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 24u)
#define TAKAKRYPT_ENCRYPT_REQUEST_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 16u)
#define TAKAKRYPT_ENCRYPT_RESPONSE_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 12u)
#define TAKAKRYPT_DECRYPT_REQUEST_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 20u)
#define TAKAKRYPT_CONFIG_REQUEST_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 8u)
#define TAKAKRYPT_GUARD_POINT_ENTRY_V1_SIZE	16u
#define TAKAKRYPT_ERROR_RESPONSE_V1_SIZE	TAKAKRYPT_HEADER_SIZE
#define TAKAKRYPT_STATUS_RESPONSE_V1_SIZE	(TAKAKRYPT_HEADER_SIZE + 72u)

#if !defined(__KERNEL__) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct takakrypt_msg_header) == TAKAKRYPT_HEADER_SIZE,
	       "TAKA header must be 32 bytes");
_Static_assert(sizeof(struct takakrypt_policy_request) == TAKAKRYPT_HEADER_SIZE + 64,
	       "policy request layout");
#endif

#endif /* _UAPI_LINUX_TAKAKRYPT_H */
