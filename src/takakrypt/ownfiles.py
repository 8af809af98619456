"""The files Takakrypt itself needs, which `takakrypt xform` must never convert.

Encrypting the keystore under a key stored only in itself (``xform ~`` with the default
keystore in ``~/.local/share``) makes every file unreadable for good; encrypting a
master-key or passphrase file, the agent's configuration, its run/state directories or
its audit trail breaks the agent.  :func:`collect` lists them; :func:`refuse_inside`
raises a UsageError naming each one that lies at or below a directory (or the directory
itself being inside one of them).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import Error, UsageError

CONFIG_GLOB = "/etc/takakrypt/*.yaml"
STATE_DIRS = ("/var/lib/takakrypt", "/run/takakrypt", "/etc/takakrypt")


@dataclass(frozen=True)
class Own:
    path: str          #: absolute, symlinks resolved
    what: str          #: e.g. "the keystore (TAKAKRYPT_KEYSTORE)"
    prefix: bool = False  #: also every sibling whose name starts with the basename


def _own(path: str | None, what: str, prefix: bool = False) -> list[Own]:
    if not path:
        return []
    return [Own(os.path.realpath(os.path.expanduser(path)), what, prefix)]


def keystore_files(path: str, source: str) -> list[Own]:
    """The keystore, its lock and its writers' temporaries."""
    real = os.path.realpath(path)
    d, base = os.path.split(real)
    return [Own(real, f"the keystore ({source})"),
            Own(real + ".lock", "the keystore's lock file"),
            Own(os.path.join(d, f".{base}.tmp-"), "the keystore's temporary files", True)]


def default_keystores() -> list[str]:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return ["/var/lib/takakrypt/keystore.json", os.path.join(base, "takakrypt", "keystore.json")]


def config_files(path: str) -> list[Own]:
    """A configuration file and what it names: keystore and its unlock files, KMIP
    credentials, the agent's socket/pid directories, audit files (and their rotations).
    A configuration that does not load still protects itself."""
    from . import config

    out = _own(path, f"the agent configuration {path}")
    try:
        cfg = config.load(path)
    except (Error, OSError):
        return out
    where = f"named in {path}"
    local = cfg.keys.local
    out += keystore_files(local.path, where)
    out += _own(local.passphrase_file, f"the keystore passphrase file ({where})")
    out += _own(local.master_key_file, f"the keystore master key file ({where})")
    if cfg.keys.kmip is not None:
        for f in (cfg.keys.kmip.ca_file, cfg.keys.kmip.cert_file, cfg.keys.kmip.key_file):
            out += _own(f, f"a KMIP credential ({where})")
    a = cfg.agent
    for p in (a.control_socket, a.protocol_socket, a.pid_file):
        out += _own(os.path.dirname(p), f"the agent's run directory ({where})")
    for sink in getattr(cfg.audit, "sinks", None) or ():
        out += _own(getattr(sink, "path", None), f"an audit file ({where})", prefix=True)
        for f in ("ca_file", "cert_file", "key_file"):
            out += _own(getattr(sink, f, None), f"an audit TLS credential ({where})")
    return out


def collect(*, keystore: tuple[str, str] | None, passphrase_file: str | None,
            master_key_file: str | None, configs: Iterable[str] = ()) -> list[Own]:
    """Everything to protect: the keystore in use (path, where it was named), the default
    keystores, the unlock files given, the standard state directories, the configurations
    given plus /etc/takakrypt/*.yaml and what they name."""
    out: list[Own] = []
    if keystore is not None:
        out += keystore_files(*keystore)
    for ks in default_keystores():
        out += keystore_files(ks, "a default keystore location")
    out += _own(passphrase_file, "the keystore passphrase file")
    out += _own(master_key_file, "the keystore master key file")
    for d in STATE_DIRS:
        out += _own(d, "a Takakrypt state directory")
    for c in dict.fromkeys([*configs, *sorted(glob.glob(CONFIG_GLOB))]):
        out += config_files(c)
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def found_inside(root: str, own: Iterable[Own]) -> list[tuple[str, str]]:
    """(path, what) of each protected file or directory at or below ``root`` that exists,
    and of the protected directory ``root`` lies in."""
    root = os.path.realpath(root)
    hits: dict[str, str] = {}
    for o in own:
        if o.prefix:
            d, base = os.path.split(o.path)
            if not _inside(d, root) or not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                if name.startswith(base):
                    hits.setdefault(os.path.join(d, name), o.what)
        elif os.path.lexists(o.path) and (_inside(o.path, root)
                                          or (os.path.isdir(o.path) and _inside(root, o.path))):
            hits.setdefault(o.path, o.what)
    return sorted(hits.items())


def identities(own: Iterable[Own]) -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) of each existing protected regular file: a hard link to one of
    them under another name is protected too."""
    out: dict[tuple[int, int], str] = {}
    for o in own:
        try:
            st = os.stat(o.path)
        except OSError:
            continue
        if not o.prefix and not os.path.isdir(o.path):
            out.setdefault((st.st_dev, st.st_ino), f"{o.what}, {o.path}")
    return out


def listing(pairs: list[tuple[str, str]], most: int = 5) -> str:
    """``path (what); ...`` for the first ``most`` pairs, then how many more."""
    more = f" and {len(pairs) - most} more" if len(pairs) > most else ""
    return "; ".join(f"{p} ({what})" for p, what in pairs[:most]) + more


def refusal(root: str, hits: list[tuple[str, str]]) -> UsageError:
    return UsageError(
        f"{root}: refusing to transform: it holds files Takakrypt itself needs, which "
        f"would become unreadable: {listing(hits)}. Nothing was converted. Move them out of "
        f"{root} (or transform its other subdirectories one by one)")
