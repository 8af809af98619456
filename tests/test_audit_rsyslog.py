"""Round trip through a real rsyslogd: UDP, TCP, TLS and mutual TLS, JSON and CEF bodies.

The test runs its own rsyslogd (``-n -f CONF -i PIDFILE``, own work directory, loopback
ports only, never the system instance) with a CA and server/client certificates made
here with openssl.  rsyslog writes, per message, the raw message as it received it
*and* the fields its own RFC 5424 parser extracted; both must give back the values we
sent, tricky characters included.  ``make test`` installs rsyslog and rsyslog-gnutls
(Makefile DEB_PKGS).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from takakrypt.audit import SyslogSink, access_event, build_logger, from_json
from takakrypt.audit.formats import SD_ID

from test_audit import parse_cef, parse_rfc5424

WAIT = 30.0  # liveness bound for polling; never used to assert speed

RSYSLOGD = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
GTLS = any(Path(d, "lmnsd_gtls.so").exists()
           for d in ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                     "/usr/lib/rsyslog", "/usr/lib64/rsyslog"))
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(
    not (RSYSLOGD and GTLS and OPENSSL),
    reason="needs rsyslogd, rsyslog-gnutls and openssl (make test installs them)",
)

TRICKY = [
    'pipe|equals=back\\slash"quote]bracket',
    "new\nline and\r\ncrlf",
    "  leading and trailing spaces  ",
    "unicode é € 💥 \t tab",
    "cef-like CEF:0|x|y and sd-like [a@1 b=\"c\"]",
]


def run(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def make_pki(d: Path) -> dict[str, str]:
    """A test CA, a server cert for localhost/127.0.0.1 and a client cert."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run(OPENSSL, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Takakrypt Test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "srv": "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        "cli": "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:takakrypt-agent\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            + ext)
        run(OPENSSL, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=d)
        run(OPENSSL, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d)
    return {k: str(d / f"{k}.{ext}") for k, ext in
            [("ca", "pem"), ("srv", "pem"), ("cli", "pem")]} | {
        "srv_key": str(d / "srv.key"), "cli_key": str(d / "cli.key")}


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# one JSON object per message: what rsyslog received (raw) and what it parsed
_FIELDS = [("input", "inputname"), ("raw", "rawmsg"), ("pri", "pri"),
           ("hostname", "hostname"), ("app", "app-name"), ("procid", "procid"),
           ("msgid", "msgid"), ("sd", "structured-data"), ("msg", "msg")]
_TEMPLATE = "template(name=\"tk\" type=\"list\") {\n  constant(value=\"{\")\n" + "\n".join(
    f'  constant(value="{"," if i else ""}\\"{out}\\":\\"") '
    f'property(name="{prop}" format="json") constant(value="\\"")'
    for i, (out, prop) in enumerate(_FIELDS)) + '\n  constant(value="}\\n")\n}\n'


class Rsyslog:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.pki = make_pki(d)
        self.ports = {"udp": free_port(socket.SOCK_DGRAM)} | {
            k: free_port(socket.SOCK_STREAM) for k in ("tcp", "tls", "mtls")}
        self.out = d / "out.jsonl"
        (d / "work").mkdir()
        conf = f"""
global(workDirectory="{d}/work" maxMessageSize="64k"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriverCAFile="{self.pki['ca']}"
       defaultNetstreamDriverCertFile="{self.pki['srv']}"
       defaultNetstreamDriverKeyFile="{self.pki['srv_key']}")
module(load="imudp")
module(load="imtcp" maxSessions="100")
{_TEMPLATE}
ruleset(name="tk") {{
  action(type="omfile" file="{self.out}" template="tk" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imudp" address="127.0.0.1" port="{self.ports['udp']}" name="udp" ruleset="tk")
input(type="imtcp" address="127.0.0.1" port="{self.ports['tcp']}" name="tcp" ruleset="tk")
input(type="imtcp" address="127.0.0.1" port="{self.ports['tls']}" name="tls" ruleset="tk"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{self.ports['mtls']}" name="mtls" ruleset="tk"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
"""
        self.conf = d / "rsyslog.conf"
        self.conf.write_text(conf)
        self.pidfile = d / "rsyslogd.pid"
        self.log = open(d / "rsyslogd.stderr", "wb")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def stderr(self) -> str:
        return (self.dir / "rsyslogd.stderr").read_text(errors="replace")

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + WAIT
        todo = {"tcp", "tls", "mtls"}
        while todo:
            assert self.proc.poll() is None, f"rsyslogd exited:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"rsyslogd not listening:\n{self.stderr()}"
            for k in list(todo):
                try:
                    socket.create_connection(("127.0.0.1", self.ports[k]), timeout=1).close()
                    todo.discard(k)
                except OSError:
                    time.sleep(0.05)
        assert "error during parsing" not in self.stderr(), self.stderr()

    def records(self, run_id: str, want: int) -> list[dict]:
        """Poll the output until ``want`` records mentioning ``run_id`` are there."""
        deadline = time.monotonic() + WAIT
        while True:
            recs = []
            if self.out.exists():
                text = self.out.read_text()
                # rsyslog may be mid-write: a line counts once its newline is there
                for line in text[:text.rfind("\n") + 1].splitlines():
                    rec = json.loads(line)
                    if run_id in rec["raw"]:
                        recs.append(rec)
            if len(recs) >= want:
                return recs
            assert self.proc.poll() is None, f"rsyslogd exited:\n{self.stderr()}"
            assert time.monotonic() < deadline, (
                f"only {len(recs)}/{want} messages reached rsyslog:\n{self.stderr()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    rs = Rsyslog(tmp_path_factory.mktemp("rsyslog"))
    try:
        yield rs
    finally:
        rs.stop()


def sink_config(rs: Rsyslog, transport: str, fmt: str) -> dict:
    proto = "udp" if transport == "udp" else "tcp" if transport == "tcp" else "tls"
    cfg = {"type": "syslog", "transport": proto, "host": "127.0.0.1",
           "port": rs.ports[transport], "format": fmt, "facility": "local3",
           "app_name": "takakrypt-test", "reconnect_min": 0.05}
    if proto == "tls":
        cfg |= {"ca_file": rs.pki["ca"], "server_name": "localhost"}
    if transport == "mtls":
        cfg |= {"cert_file": rs.pki["cli"], "key_file": rs.pki["cli_key"]}
    return cfg


@pytest.mark.parametrize("fmt", ["json", "cef"])
@pytest.mark.parametrize("transport", ["udp", "tcp", "tls", "mtls"])
def test_rsyslog_round_trip(rsyslog, transport, fmt):
    run_id = uuid.uuid4().hex
    events = [
        access_event(uid=1000 + i, user=f"user {t}", groups=["staff", t], pid=4000 + i,
                     exe=f"/opt/{run_id}/bin/{t}", path=f"/data/{run_id}/{t}",
                     operation="read", decision=["permit", "deny", "would-deny"][i % 3],
                     effects=["permit", "audit"], policy=f"pol {t}", rule=i,
                     key=None if i % 2 else f"key-{i}", key_version=None if i % 2 else i,
                     learn_mode=i % 3 == 2, latency_us=12.25 * i, reason=t, host="agent-1")
        for i, t in enumerate(TRICKY)
    ]
    logger = build_logger({"queue_size": 64, "sinks": [sink_config(rsyslog, transport, fmt)]},
                          host="agent-1")
    (sink,) = logger.sinks
    assert isinstance(sink, SyslogSink) and sink.wait_connected(WAIT), sink.stats()
    for e in events:
        assert logger.log(e)
    assert logger.close(WAIT)
    st = sink.stats()
    assert (st["written"], st["dropped"], st["errors"]) == (len(events), 0, 0), st

    recs = rsyslog.records(run_id, len(events))
    assert len(recs) == len(events)  # exactly once
    by_path = {}
    for rec in recs:
        assert rec["input"] == transport
        p = parse_rfc5424(rec["raw"])
        by_path[p["sd"][SD_ID]["path"]] = (rec, p)
    assert set(by_path) == {e.path for e in events}
    for e in events:
        rec, p = by_path[e.path]
        sev = {"permit": 6, "would-deny": 5, "deny": 4}[e.decision]
        # our view of what arrived
        assert (p["facility"], p["severity"]) == (19, sev)
        assert (p["timestamp"], p["hostname"], p["app_name"], p["msgid"]) == (
            e.time, "agent-1", "takakrypt-test", "access")
        sd = p["sd"][SD_ID]
        assert (sd["exe"], sd["user"], sd["policy"], sd.get("key")) == (
            e.exe, e.user, e.policy, e.key)
        assert (sd["uid"], sd["pid"], sd["rule"], sd["decision"]) == (
            str(e.uid), str(e.pid), str(e.rule), e.decision)
        # rsyslog's own RFC 5424 parser agrees
        assert rec["pri"] == str(19 * 8 + sev)
        assert (rec["hostname"], rec["app"], rec["procid"], rec["msgid"]) == (
            "agent-1", "takakrypt-test", str(os.getpid()), "access")
        assert rec["sd"].startswith(f"[{SD_ID} ") and rec["sd"].endswith("]")
        assert rec["msg"] == p["msg"]
        if fmt == "json":
            assert from_json(rec["msg"]) == e
        else:
            header, ext = parse_cef(rec["msg"])
            assert header[4] == {"permit": "1000", "deny": "1001", "would-deny": "1002"}[
                e.decision]
            assert (ext["fname"], ext["sproc"], ext["suser"], ext["msg"]) == (
                e.path, e.exe, e.user, e.reason)
            assert (ext["cs1"], ext.get("cs2"), ext["cs3"], ext["act"]) == (
                e.policy, e.key, ",".join(e.groups), e.decision)
            assert (int(ext["suid"]), int(ext["spid"]), int(ext["cn1"])) == (
                e.uid, e.pid, e.rule)
            assert float(ext["cfp1"]) == e.latency_us


def test_tls_rejects_wrong_server_name(rsyslog):
    sink = SyslogSink("127.0.0.1", rsyslog.ports["tls"], transport="tls",
                      ca_file=rsyslog.pki["ca"], server_name="not-the-server.example",
                      reconnect_min=5)
    try:
        assert sink.wait_down(WAIT)
        sink.write(access_event(uid=0, pid=1, exe="/x", path="/never", operation="read",
                                decision="deny"))
        st = sink.stats()
        assert st["written"] == 0 and st["dropped"] == 1 and st["errors"] >= 1
        assert not st["connected"]
    finally:
        sink.close(WAIT)


def test_tls_rejects_untrusted_server(rsyslog, tmp_path):
    # a CA that did not sign rsyslog's certificate
    other = tmp_path / "other"
    other.mkdir()
    pki = make_pki(other)
    sink = SyslogSink("localhost", rsyslog.ports["tls"], transport="tls", ca_file=pki["ca"],
                      reconnect_min=5)
    try:
        assert sink.wait_down(WAIT)
        assert sink.stats()["written"] == 0 and sink.stats()["errors"] >= 1
    finally:
        sink.close(WAIT)
