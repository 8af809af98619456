"""The TAKA wire protocol between enforcement points and the agent.

One protocol, several transports: generic netlink (family ``takakrypt``) for the kernel
module, a Unix ``SOCK_SEQPACKET`` socket and the in-process ring for the FUSE data path.
Each transport carries exactly one encoded message per datagram / attribute / record, so
code that serves a request only ever sees :class:`Message` objects::

    msg = decode(datagram)                       # ProtocolError if malformed
    if msg.is_response:
        pending.resolve(msg)
    else:
        out = await handler(msg)                 # transport-agnostic
        send(encode(out))

Layouts and the resolved ambiguities of the seed: docs/protocol.md.
"""

from .constants import (DEFAULT_TIMEOUT, GENL_NAME, GENL_VERSION, HEADER_SIZE, MAGIC,
                        MAX_MSG_SIZE, MAX_PAYLOAD_SIZE, MIN_VERSION, RESPONSE_FLAG, VERSION,
                        Action, Algorithm, AuditKind, Effect, Enforcer, Operation, Status,
                        c_constants)
from .messages import (GP_CLOSED, GP_DISABLED, GP_ENABLED, LAYOUTS, PAYLOADS,
                       AuditEventRequest, AuditEventResponse,
                       ConfigUpdateRequest, ConfigUpdateResponse, DecryptRequest,
                       DecryptResponse, EncryptRequest, EncryptResponse, ErrorReply,
                       GuardPointEntry, Header, HealthCheckRequest, HealthCheckResponse,
                       KeyRequest, KeyResponse, Layout, Message, Payload,
                       PolicyCheckRequest, PolicyCheckResponse, StatusRequest,
                       StatusResponse, decode, encode, encode_payload, error_reply,
                       payload_class, reply, request)
from .pending import PendingRequests, Sequencer

__all__ = [
    "DEFAULT_TIMEOUT", "GENL_NAME", "GENL_VERSION", "HEADER_SIZE", "MAGIC", "MAX_MSG_SIZE",
    "MAX_PAYLOAD_SIZE", "MIN_VERSION", "RESPONSE_FLAG", "VERSION", "Action", "Algorithm",
    "AuditKind", "Effect", "Enforcer", "Operation", "Status", "c_constants", "GP_CLOSED",
    "GP_DISABLED", "GP_ENABLED", "LAYOUTS",
    "PAYLOADS", "AuditEventRequest", "AuditEventResponse", "ConfigUpdateRequest",
    "ConfigUpdateResponse", "DecryptRequest", "DecryptResponse", "EncryptRequest",
    "EncryptResponse", "ErrorReply", "GuardPointEntry", "Header", "HealthCheckRequest",
    "HealthCheckResponse", "KeyRequest", "KeyResponse", "Layout", "Message", "Payload",
    "PolicyCheckRequest", "PolicyCheckResponse", "StatusRequest", "StatusResponse",
    "decode", "encode", "encode_payload", "error_reply", "payload_class", "reply",
    "request", "PendingRequests", "Sequencer",
]
