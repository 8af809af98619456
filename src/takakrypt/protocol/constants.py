"""Numbers of the TAKA wire protocol: sizes, operations, statuses, actions, effects.

Every name here has a twin in ``kernel/include/uapi/takakrypt.h``;
:func:`c_constants` gives the C spelling and tests/test_protocol_layout.py proves that
both sides agree.
"""

from __future__ import annotations

import enum

MAGIC = 0x54414B41            # b"AKAT" on the wire (little-endian "TAKA" as a u32)
VERSION = 2                   # what we send: seed layouts + appended extension fields
MIN_VERSION = 1               # seed layouts only; still decoded and encoded
HEADER_SIZE = 32
MAX_MSG_SIZE = 8192           # header included
MAX_PAYLOAD_SIZE = MAX_MSG_SIZE - HEADER_SIZE
RESPONSE_FLAG = 0x80000000    # bit 31 of ``operation``: this message answers a request
DEFAULT_TIMEOUT = 5.0         # seconds; on expiry the enforcement point denies

# generic netlink transport (kernel module <-> agent)
GENL_NAME = "takakrypt"
GENL_VERSION = 1
CMD_UNSPEC = 0
CMD_MSG = 1                   # one TAKA message in ATTR_MSG, either direction
CMD_REGISTER = 2              # agent -> kernel: "send requests to my port id"
ATTR_UNSPEC = 0
ATTR_MSG = 1                  # NLA_BINARY, 32..MAX_MSG_SIZE bytes


class Operation(enum.IntEnum):
    HEALTH_CHECK = 0
    POLICY_CHECK = 1
    ENCRYPT = 2
    DECRYPT = 3
    KEY_REQUEST = 4
    CONFIG_UPDATE = 5
    AUDIT_EVENT = 6
    STATUS_REQUEST = 7


class Status(enum.IntEnum):
    SUCCESS = 0
    INVALID = 1
    DENIED = 2
    NOT_FOUND = 3
    CRYPTO = 4
    MEMORY = 5
    TIMEOUT = 6
    NETWORK = 7
    INTERNAL = 8


class Action(enum.IntEnum):
    """Fine-grained action codes of the policy language (``config.ACTIONS``)."""

    NONE = 0          # audit events that are not about an access; invalid in POLICY_CHECK
    READ = 1
    WRITE = 2
    APPEND = 3
    TRUNCATE = 4
    CREATE = 5
    DELETE = 6
    RENAME = 7
    LINK = 8
    GETATTR = 9
    SETATTR = 10
    LIST = 11
    MKDIR = 12
    RMDIR = 13
    GETXATTR = 14
    SETXATTR = 15

    @property
    def policy_name(self) -> str:
        """The action's name in policy files, e.g. ``"read"``."""
        return self.name.lower()

    @classmethod
    def from_policy_name(cls, name: str) -> Action:
        return cls[name.upper()]


class Effect(enum.IntFlag):
    """What the enforcement point does with an access (POLICY_CHECK response, audit)."""

    PERMIT = 1 << 0
    DENY = 1 << 1
    APPLY_KEY = 1 << 2      # plaintext view; PERMIT without it = raw ciphertext
    AUDIT = 1 << 3
    WOULD_DENY = 1 << 4     # learn mode: a deny that was let through
    ANY_PATH = 1 << 5       # caching hint: the decision holds for every path (same caller, action)
    ANY_PROCESS = 1 << 6    # caching hint: ... for every process of the same uid and gid


EFFECT_MASK = 0x7F


class Algorithm(enum.IntEnum):
    AES_256_GCM = 1         # = format.ALG_AES256GCM_HKDF


class AuditKind(enum.IntEnum):
    ACCESS = 1              # a decision applied at the enforcement point (e.g. cache hit)
    INTEGRITY = 2           # tag mismatch on a block or header
    FORMAT = 3              # invalid TAKA header in the backing store
    KEY_UNAVAILABLE = 4     # key could not be obtained; access failed closed
    AGENT_UNAVAILABLE = 5   # no answer within the timeout; access failed closed


class Enforcer(enum.IntEnum):
    KERNEL = 1
    FUSE = 2


def c_constants() -> dict[str, int]:
    """Every constant of the protocol under its name in the uapi header."""
    out: dict[str, int] = {
        "TAKAKRYPT_MSG_MAGIC": MAGIC,
        "TAKAKRYPT_PROTOCOL_VERSION": VERSION,
        "TAKAKRYPT_PROTOCOL_MIN_VERSION": MIN_VERSION,
        "TAKAKRYPT_HEADER_SIZE": HEADER_SIZE,
        "TAKAKRYPT_MAX_MSG_SIZE": MAX_MSG_SIZE,
        "TAKAKRYPT_MAX_PAYLOAD_SIZE": MAX_PAYLOAD_SIZE,
        "TAKAKRYPT_MSG_RESPONSE": RESPONSE_FLAG,
        "TAKAKRYPT_TIMEOUT_MS": int(DEFAULT_TIMEOUT * 1000),
        "TAKAKRYPT_GENL_VERSION": GENL_VERSION,
        "TAKAKRYPT_CMD_UNSPEC": CMD_UNSPEC,
        "TAKAKRYPT_CMD_MSG": CMD_MSG,
        "TAKAKRYPT_CMD_REGISTER": CMD_REGISTER,
        "TAKAKRYPT_ATTR_UNSPEC": ATTR_UNSPEC,
        "TAKAKRYPT_ATTR_MSG": ATTR_MSG,
        "TAKAKRYPT_EFFECT_MASK": EFFECT_MASK,
    }
    out.update({f"TAKAKRYPT_OP_{m.name}": m.value for m in Operation})
    out.update({("TAKAKRYPT_SUCCESS" if m is Status.SUCCESS else f"TAKAKRYPT_ERROR_{m.name}"):
                m.value for m in Status})
    out.update({f"TAKAKRYPT_ACTION_{m.name}": m.value for m in Action})
    out.update({f"TAKAKRYPT_EFFECT_{m.name}": int(m.value) for m in Effect})
    out.update({f"TAKAKRYPT_ALG_{m.name}": m.value for m in Algorithm})
    out.update({f"TAKAKRYPT_AUDIT_{m.name}": m.value for m in AuditKind})
    out.update({f"TAKAKRYPT_ENFORCER_{m.name}": m.value for m in Enforcer})
    out.update({"TAKAKRYPT_GP_DISABLED": 0, "TAKAKRYPT_GP_ENABLED": 1, "TAKAKRYPT_GP_CLOSED": 2})
    return out
