"""One exception base for the whole package, each class with an exit code.

User errors (bad passphrase, tampered file, unknown key) are reported by the CLI as a
single line on stderr and the process exits with ``exit_code``; no traceback.  The
table of exit codes is documented in docs/operations.md and ``takakrypt --help``.

Messages never contain key material: only key names, versions and file positions.
"""

from __future__ import annotations


class Error(Exception):
    """Base of every error Takakrypt raises on purpose."""

    exit_code = 1
    #: Short machine-readable kind, used in ``--json`` error output.
    kind = "error"


class UsageError(Error):
    """Wrong command-line usage or arguments."""

    exit_code = 2
    kind = "usage"


class ConfigError(Error):
    """A configuration file failed validation (message names the field path)."""

    exit_code = 3
    kind = "config"


class FormatError(Error):
    """A TAKA file header or layout is malformed (not a tag failure)."""

    exit_code = 4
    kind = "format"


class IntegrityError(Error):
    """Authentication failed: a block's tag or the header tag does not verify."""

    exit_code = 5
    kind = "integrity"

    def __init__(self, message: str, block: int | None = None) -> None:
        super().__init__(message)
        #: index of the first block that failed, or None for the header
        self.block = block


class BlockVersionMismatch(IntegrityError):
    """A TAKA v2 block is sealed under another key version than the cipher that read it.

    Readers of v2 files catch it and go on with that version's cipher; anything else
    sees an IntegrityError (fail closed)."""

    def __init__(self, message: str, block: int, version: int) -> None:
        super().__init__(message, block=block)
        #: the key version stored in the block
        self.version = version


class KeyUsageExhausted(Error):
    """A file's key reached its limit of block encryptions (the random-nonce bound):
    copy the file (a new file id, a new file key) to write it again."""

    exit_code = 15
    kind = "key-usage-exhausted"


class KeyError_(Error):
    """Base for key management errors (named with a trailing underscore so the
    builtin ``KeyError`` is not shadowed)."""

    exit_code = 6
    kind = "key"


class KeyNotFound(KeyError_):
    """The named key, or the requested version of it, does not exist."""

    kind = "key-not-found"


class KeyRetired(KeyNotFound):
    """The key version was retired: its material is destroyed for good."""

    kind = "key-retired"


class KeyExists(KeyError_):
    """A key with this name already exists."""

    kind = "key-exists"


class KeystoreLocked(KeyError_):
    """The keystore could not be unlocked: wrong passphrase or master key."""

    exit_code = 7
    kind = "keystore-locked"


class KeystoreCorrupt(KeyError_):
    """The keystore file is unreadable or fails its integrity check."""

    exit_code = 8
    kind = "keystore-corrupt"


class BackendUnavailable(KeyError_):
    """The key backend cannot be reached (network, server down)."""

    exit_code = 9
    kind = "backend-unavailable"


class NativeError(Error):
    """The native extension failed in a way that is not an integrity failure."""

    exit_code = 10
    kind = "native"


class ProtocolError(Error):
    """A TAKA protocol message is malformed, unknown or does not match its request."""

    exit_code = 11
    kind = "protocol"


class AgentUnavailable(Error):
    """takakryptd is not running or does not answer on its control socket."""

    exit_code = 12
    kind = "agent-unavailable"


class AgentError(Error):
    """takakryptd reported an error for a control command."""

    exit_code = 13
    kind = "agent"


class XformError(Error):
    """`takakrypt xform` could not convert some files (the summary lists them)."""

    exit_code = 14
    kind = "xform"

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class BenchError(Error):
    """`takakrypt bench` could not run (no FUSE, not root, a mount or a workload
    failed)."""

    exit_code = 16
    kind = "bench"


class RekeyError(Error):
    """A live rekey ended with files it could not rekey, or stopped (failed, paused)
    before the end while ``--wait`` waited for it."""

    exit_code = 17
    kind = "rekey"


class KeyInUse(KeyError_):
    """``keys retire``: files still use the version (or it is the current one)."""

    exit_code = 18
    kind = "key-in-use"


def error_from_kind(kind: str, message: str) -> Error:
    """Rebuild the error a remote side (takakryptd) reported, so the CLI exits with the
    same code as if the work had been done locally."""
    for cls in _all_subclasses(Error):
        if cls.kind == kind and cls.__init__ is Error.__init__:
            return cls(message)
    if kind == IntegrityError.kind:
        return IntegrityError(message)
    err = AgentError(message)
    return err


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


#: exit code table, for --help and docs (kept next to the classes so they cannot drift)
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error",
    UsageError.exit_code: "usage error",
    ConfigError.exit_code: "configuration invalid",
    FormatError.exit_code: "file is not a valid TAKA file",
    IntegrityError.exit_code: "authentication failed (tampered or corrupt data)",
    KeyError_.exit_code: "key not found / key error",
    KeystoreLocked.exit_code: "keystore locked: wrong passphrase or master key",
    KeystoreCorrupt.exit_code: "keystore corrupt",
    BackendUnavailable.exit_code: "key backend unavailable",
    NativeError.exit_code: "native crypto failure",
    ProtocolError.exit_code: "malformed protocol message",
    AgentUnavailable.exit_code: "takakryptd not running / not answering",
    AgentError.exit_code: "takakryptd reported an error",
    XformError.exit_code: "xform: some files could not be converted",
    KeyUsageExhausted.exit_code: "file key used up: copy the file to re-key it",
    BenchError.exit_code: "bench: a guard point or a workload failed",
    RekeyError.exit_code: "rekey: files could not be rekeyed, or the run stopped",
    KeyInUse.exit_code: "keys retire: files still use that key version",
    130: "interrupted (SIGINT)",
}
