"""A real PyKMIP server for the KMIP backend's tests (tests/test_keys_kmip.py).

:class:`Pki` makes a test CA and its certificates (ECDSA P-256, files 0600): the
server's (SAN 127.0.0.1 and localhost), clients' (extended key usage clientAuth, which
PyKMIP requires), expired ones, and with a second ``Pki`` certificates of another CA.

:class:`KmipServer` runs ``python -m kmip.services.server.server`` (the ``pykmip-server``
entry point) as a child process in its own session, on 127.0.0.1 and a free port, with
its configuration, log and sqlite database in one directory; :meth:`~KmipServer.start`
returns once the server completes a mutual-TLS handshake, :meth:`~KmipServer.kill`
SIGKILLs the server's process group (it has a policy monitor and a
``multiprocessing`` manager as children) and :meth:`~KmipServer.restart` brings it back
on the same port and database.

The ``kmip_server`` fixture is module-scoped (one start, about 0.4 s, per test
module).  PyKMIP keeps each object visible to its owner only (the client certificate's
common name, under the default operation policy), so a certificate from
:meth:`KmipServer.new_identity` is an empty store; :meth:`KmipServer.destroy_all`
removes its objects again (PyKMIP's Locate reads every object of the database, so a
small database keeps the tests fast).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

START_TIMEOUT = 30.0


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Identity:
    """A client credential: certificate and key files, and the CA that signed it."""

    name: str
    cert_file: str
    key_file: str


class Pki:
    """A certificate authority in ``directory`` (``ca.pem``; keys stay in memory)."""

    def __init__(self, directory: Path, name: str = "takakrypt test CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._ski = ski
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = str(self.dir / "ca.pem")
        _write_private(Path(self.ca_file), cert.public_bytes(serialization.Encoding.PEM))
        self._serial = itertools.count(1)

    def issue(self, cn: str, *, server: bool = False, expired: bool = False,
              prefix: str | None = None,
              names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Identity:
        """A certificate for ``cn`` (a client's unless ``server``; a server's names
        ``names`` in its subject alternative names), valid for a day, or expired an
        hour ago; files ``PREFIX.pem`` and ``PREFIX.key`` (mode 0600)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        if expired:
            not_before, not_after = now - dt.timedelta(days=2), now - dt.timedelta(hours=1)
        else:
            not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=1)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                self._ski), critical=False)
        )
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                                critical=False)
        cert = b.sign(self._key, hashes.SHA256())
        stem = prefix or f"{cn}-{next(self._serial)}"
        cert_file, key_file = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return Identity(cn, str(cert_file), str(key_file))


class KmipServer:
    """One PyKMIP server process; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.dir / "pki")
        self.ca_file = self.pki.ca_file
        self.server_identity = self.pki.issue("localhost", server=True, prefix="server")
        self.identity = self.pki.issue("takakrypt-test", prefix="client")
        self._ids = itertools.count(1)
        self.port = free_port()
        self.database = self.dir / "pykmip.sqlite"
        self.log = self.dir / "server.log"
        self.config = self.dir / "server.conf"
        (self.dir / "policies").mkdir(exist_ok=True)
        self.config.write_text(
            "[server]\n"
            f"hostname={self.host}\n"
            f"port={self.port}\n"
            f"certificate_path={self.server_identity.cert_file}\n"
            f"key_path={self.server_identity.key_file}\n"
            f"ca_path={self.ca_file}\n"
            "auth_suite=TLS1.2\n"
            f"policy_path={self.dir / 'policies'}\n"
            "enable_tls_client_auth=True\n"
            "logging_level=INFO\n"
            f"database_path={self.database}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ process

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        assert self.proc is None, "already running"
        out = open(self.dir / "server.out", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmip.services.server.server",
             "-f", str(self.config), "-l", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
            start_new_session=True)
        out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"the PyKMIP server exited with {code} while starting:\n"
                                   + self.output())
            with contextlib.suppress(OSError):
                self._handshake()
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the PyKMIP server did not accept TLS in "
                                   f"{START_TIMEOUT:.0f} s:\n" + self.output())
            time.sleep(0.05)

    def _handshake(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca_file)
        ctx.load_cert_chain(self.identity.cert_file, self.identity.key_file)
        with socket.create_connection((self.host, self.port), timeout=2) as raw, \
                ctx.wrap_socket(raw, server_hostname=self.host) as tls:
            tls.do_handshake()

    def kill(self) -> None:
        """SIGKILL the server and its children (its process group); the database stays."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def output(self) -> str:
        parts = []
        for f in (self.dir / "server.out", self.log):
            with contextlib.suppress(OSError):
                parts.append(f.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def new_identity(self, *, expired: bool = False) -> Identity:
        """A client certificate of a new owner: an empty store on this server."""
        return self.pki.issue(f"client-{next(self._ids)}", expired=expired)

    def backend_args(self, identity: Identity | None = None, **kw: Any) -> dict[str, Any]:
        ident = identity or self.identity
        args: dict[str, Any] = dict(host=self.host, port=self.port, ca_file=self.ca_file,
                                    cert_file=ident.cert_file, key_file=ident.key_file)
        args.update(kw)
        return args

    def backend(self, identity: Identity | None = None, **kw: Any):  # type: ignore[no-untyped-def]
        from takakrypt.keys.kmip import KmipBackend

        return KmipBackend(**self.backend_args(identity, **kw))

    @contextlib.contextmanager
    def raw_client(self, identity: Identity | None = None) -> Iterator[Any]:
        """PyKMIP's own client (``kmip.pie.client.ProxyKmipClient``), to look at what
        the backend stored independently of it."""
        from kmip.pie.client import ProxyKmipClient

        ident = identity or self.identity
        # an empty configuration file: no ~/.pykmip/pykmip.conf or /etc/pykmip defaults
        conf = self.dir / "client.conf"
        if not conf.exists():
            conf.write_text("")
        client = ProxyKmipClient(hostname=self.host, port=self.port, cert=ident.cert_file,
                                 key=ident.key_file, ca=self.ca_file,
                                 ssl_version="PROTOCOL_TLSv1_2", config_file=str(conf))
        with warnings.catch_warnings():  # PyKMIP 0.10 uses ssl.wrap_socket and TLSv1_2
            warnings.simplefilter("ignore", DeprecationWarning)
            client.open()
        try:
            yield client
        finally:
            client.close()

    def destroy_all(self, identity: Identity | None = None) -> int:
        """Revoke and destroy every object ``identity`` owns; the number destroyed."""
        from kmip.core import enums

        n = 0
        with self.raw_client(identity) as c:
            for uid in c.locate():
                state = c.get_attributes(uid, ["State"])[1][0].attribute_value.value
                if state == enums.State.ACTIVE:
                    c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
                c.destroy(uid)
                n += 1
        return n


@pytest.fixture(scope="module")
def kmip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    pytest.importorskip("kmip", reason="PyKMIP is not installed (pip install -e '.[test]')")
    server = KmipServer(tmp_path_factory.mktemp("kmip"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
