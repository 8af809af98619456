"""Audit trail: event, formats (JSON, CEF, RFC 5424), file and syslog sinks, the logger,
the config.  The real rsyslog round trip is in test_audit_rsyslog.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import threading

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from takakrypt.audit import (
    AuditConfig,
    AuditLogger,
    Event,
    FileSink,
    Sink,
    SyslogSink,
    access_event,
    build_logger,
    dropped_event,
    from_json,
    load_audit_config,
    now_rfc3339,
    sanitize,
    system_event,
    to_cef,
    to_json,
    to_syslog,
)
from takakrypt.audit.formats import FACILITIES, SD_ID, syslog_severity
from takakrypt.errors import ConfigError

# liveness bound for waits on threads/servers; never used to assert speed
WAIT = 30.0

# ---------------------------------------------------------------- test parsers
# Written from the specs, independently of takakrypt.audit.formats.


def split_unescaped(s: str, sep: str, maxsplit: int) -> list[str]:
    """Split ``s`` on ``sep`` not preceded by an escaping backslash (raw parts)."""
    parts, cur, i = [], [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if c == sep and len(parts) < maxsplit:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def cef_unescape_header(v: str) -> str:
    return re.sub(r"\\([\\|])", r"\1", v)


def cef_unescape_ext(v: str) -> str:
    return re.sub(r"\\([\\=nr])", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), v)


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """(7 header fields, extension dict) of one CEF line."""
    assert line.startswith("CEF:")
    parts = split_unescaped(line, "|", 7)
    assert len(parts) == 8, parts
    header = [cef_unescape_header(p) for p in parts[:7]]
    ext = parts[7]
    # positions of unescaped '=': each one ends a key
    eqs, i = [], 0
    while i < len(ext):
        if ext[i] == "\\":
            i += 2
            continue
        if ext[i] == "=":
            eqs.append(i)
        i += 1
    out: dict[str, str] = {}
    keys = []
    for p in eqs:
        start = ext.rfind(" ", 0, p) + 1
        key = ext[start:p]
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), key
        keys.append((key, start, p))
    for n, (key, start, p) in enumerate(keys):
        end = keys[n + 1][1] - 1 if n + 1 < len(keys) else len(ext)
        if n + 1 < len(keys):
            assert ext[end] == " "
        out[key] = cef_unescape_ext(ext[p + 1 : end])
    return header, out


_HDR = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse_rfc5424(msg: str) -> dict:
    """Parse one RFC 5424 message: header fields, SD elements, MSG."""
    m = _HDR.match(msg)
    assert m, msg[:200]
    pri = int(m[1])
    out = {
        "facility": pri // 8, "severity": pri % 8, "timestamp": m[2], "hostname": m[3],
        "app_name": m[4], "procid": m[5], "msgid": m[6], "sd": {},
    }
    i = m.end()
    if msg[i] == "-":
        i += 1
    else:
        while i < len(msg) and msg[i] == "[":
            j = i + 1
            while msg[j] not in " ]":
                j += 1
            sd_id, params = msg[i + 1 : j], {}
            i = j
            while msg[i] == " ":
                k = msg.index("=", i)
                name = msg[i + 1 : k]
                assert msg[k + 1] == '"'
                i, val = k + 2, []
                while msg[i] != '"':
                    if msg[i] == "\\" and msg[i + 1] in '"\\]':
                        val.append(msg[i + 1])
                        i += 2
                    else:
                        assert msg[i] != "]", "unescaped ] in PARAM-VALUE"
                        val.append(msg[i])
                        i += 1
                params[name] = "".join(val)
                i += 1
            assert msg[i] == "]"
            out["sd"][sd_id] = params
            i += 1
    assert msg[i] == " "
    out["msg"] = msg[i + 1 :]
    return out


# ------------------------------------------------------------------ strategies

texts = st.text(max_size=40)
# commas separate list items in CEF cs3/cs4
items = st.lists(st.text(alphabet=st.characters(blacklist_characters=",",
                                                blacklist_categories=("Cs",)),
                         min_size=1, max_size=10), max_size=4)


@st.composite
def access_events(draw):
    return access_event(
        uid=draw(st.integers(0, 2**32 - 1)),
        user=draw(texts),
        groups=draw(items),
        pid=draw(st.integers(1, 2**22)),
        exe=draw(texts),
        path=draw(texts),
        operation=draw(st.sampled_from(["read", "write", "open", "rename", "unlink"])),
        decision=draw(st.sampled_from(["permit", "deny", "would-deny", "error"])),
        effects=draw(st.lists(st.sampled_from(["permit", "deny", "apply_key", "audit"]))),
        policy=draw(texts),
        rule=draw(st.integers(-1, 1000)),
        key=draw(st.none() | texts),
        key_version=draw(st.none() | st.integers(1, 10_000)),
        learn_mode=draw(st.booleans()),
        latency_us=draw(st.floats(0, 1e9, allow_nan=False)),
        reason=draw(texts),
        host=draw(st.text(min_size=1, max_size=20)),
        detail=draw(st.none() | st.dictionaries(st.text(max_size=5),
                                                st.integers() | st.text(max_size=5), max_size=3)),
    )


def ev(i: int = 0, decision: str = "permit", **kw) -> Event:
    kw.setdefault("path", f"/data/pg/file{i}")
    return access_event(uid=1000, user="alice", groups=["staff"], pid=i + 1,
                        exe="/usr/bin/postgres", operation="read", decision=decision,
                        effects=["permit", "apply_key", "audit"], policy="pg", rule=0,
                        key="pg-key", key_version=2, reason="rule 0", **kw)


# ------------------------------------------------------------------------ event


def test_event_helpers():
    e = access_event(uid=0, groups=[0], pid=1, exe="/bin/x", path="/p", operation="read",
                     decision="deny")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e.time)
    assert e.user == "root" and e.groups == ["root"]
    assert e.kind == "access" and e.rule == -1 and e.key is None and e.host
    assert now_rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    d = dropped_event(17)
    assert (d.kind, d.reason, d.detail) == ("dropped", "dropped 17 events", {"count": 17})
    with pytest.raises(ValueError):
        system_event("access", "x")
    # the record has no place for key material
    assert not {"material", "secret", "key_bytes"} & set(Event.__struct_fields__)


# ---------------------------------------------------------------------- formats


@given(access_events())
def test_json_round_trip(e):
    line = to_json(e)
    assert b"\n" not in line
    assert from_json(line) == e
    assert json.loads(line)["path"] == e.path


@given(access_events())
def test_cef_escaping_recovers_values(e):
    line = to_cef(e)
    assert "\n" not in line and "\r" not in line
    header, ext = parse_cef(line)
    assert header[:4] == ["CEF:0", "Takakrypt", "Takakrypt", header[3]]
    sev = {"permit": 3, "deny": 7, "would-deny": 5, "error": 7}[e.decision]
    assert header[6] == str(sev)
    assert ext["act"] == e.decision
    assert ext.get("suser", "") == e.user
    assert ext.get("sproc", "") == e.exe
    assert ext.get("fname", "") == e.path
    assert ext.get("msg", "") == e.reason
    assert ext.get("dvchost", "") == e.host
    assert ext.get("cs1", "") == e.policy
    assert ext.get("cs2") == (e.key or None)
    assert ext.get("cs3", "") == ",".join(e.groups)
    assert ext.get("cs4", "") == ",".join(e.effects)
    assert ext["cs5"] == e.operation
    assert int(ext["suid"]) == e.uid and int(ext["spid"]) == e.pid
    assert int(ext["cn1"]) == e.rule
    assert ext.get("cn2") == (None if e.key_version is None else str(e.key_version))
    assert ext["cn3"] == ("1" if e.learn_mode else "0")
    assert float(ext["cfp1"]) == e.latency_us
    assert (json.loads(ext["cs6"]) if "cs6" in ext else None) == e.detail
    assert ext["cs1Label" if "cs1" in ext else "cs5Label"] in ("policy", "operation")


@given(st.text(), st.text())
def test_cef_header_escaping(a, b):
    from takakrypt.audit.formats import cef_escape_header

    line = f"CEF:0|{cef_escape_header(a)}|{cef_escape_header(b)}|1|2|n|3|k=v"
    header, ext = parse_cef(line)
    assert header[1] == a.replace("\r", " ").replace("\n", " ")
    assert header[2] == b.replace("\r", " ").replace("\n", " ")
    assert ext == {"k": "v"}


@given(st.binary(max_size=30), st.text(alphabet=st.characters(min_codepoint=0xD800,
                                                              max_codepoint=0xDFFF), max_size=3))
def test_undecodable_names_cannot_break_formats(raw, lone):
    """A file name that is not UTF-8 (os.fsdecode gives lone surrogates) must still be
    audited, in every format, as the bytes written ``\\xNN``."""
    path = os.fsdecode(b"/data/" + raw)
    e = Event(time=now_rfc3339(), host="h", path=path, exe="/bin/" + lone,
              groups=[lone or "g"], user=lone, operation="read", decision="deny",
              detail={lone: lone} if lone else None)
    clean = sanitize(e)
    assert clean.path == "/data/" + raw.decode("utf-8", "backslashreplace")
    assert from_json(to_json(e)) == clean
    assert parse_cef(to_cef(e))[1]["fname"] == clean.path
    p = parse_rfc5424(to_syslog(e).decode("utf-8"))
    assert p["sd"][SD_ID]["path"] == clean.path and from_json(p["msg"]) == clean
    if not lone and raw.decode("utf-8", "replace") == raw.decode("utf-8", "ignore"):
        assert clean is e  # valid UTF-8: untouched
    built = access_event(uid=0, pid=1, exe="/x", path=path, operation="read", decision="deny")
    assert built.path == clean.path


def test_cef_system_event():
    header, ext = parse_cef(to_cef(dropped_event(5, host="h")))
    assert header[4:7] == ["2001", "audit events dropped", "6"]
    assert ext["cat"] == "dropped" and json.loads(ext["cs6"]) == {"count": 5}
    assert "suid" not in ext


@given(access_events(), st.sampled_from(["json", "cef"]), st.sampled_from(sorted(FACILITIES)))
def test_rfc5424_structure_and_sd_escaping(e, body, facility):
    raw = to_syslog(e, body=body, facility=FACILITIES[facility], app_name="takakrypt",
                    procid=4242)
    p = parse_rfc5424(raw.decode())
    assert p["facility"] == FACILITIES[facility]
    assert p["severity"] == {"permit": 6, "would-deny": 5, "deny": 4, "error": 3}[e.decision]
    assert p["timestamp"] == e.time and p["procid"] == "4242" and p["msgid"] == "access"
    assert p["app_name"] == "takakrypt"
    assert re.fullmatch(r"[\x21-\x7e]{1,255}", p["hostname"])
    sd = p["sd"][SD_ID]
    assert sd["path"] == e.path and sd["exe"] == e.exe and sd["user"] == e.user
    assert sd["policy"] == e.policy and sd["decision"] == e.decision
    assert sd.get("key") == e.key and int(sd["uid"]) == e.uid and int(sd["rule"]) == e.rule
    if body == "json":
        assert from_json(p["msg"]) == e
    else:
        assert parse_cef(p["msg"])[1].get("fname", "") == e.path


def test_rfc5424_severity_by_kind():
    assert syslog_severity(system_event("integrity", "tag mismatch", path="/d/x")) == 2
    p = parse_rfc5424(to_syslog(system_event("integrity", "tag ] mismatch", host="h")).decode())
    assert (p["msgid"], p["sd"][SD_ID]["reason"], p["procid"]) == ("integrity", "tag ] mismatch",
                                                                    "-")


# ------------------------------------------------------------------- file sink


def test_file_sink_rotation_keeps_n_backups(tmp_path):
    path = tmp_path / "audit.json"
    sink = FileSink(path, max_bytes=2000, backups=3)
    n = 200
    for i in range(n):
        sink.write(ev(i))
    sink.close()
    files = [path] + [tmp_path / f"audit.json.{i}" for i in (1, 2, 3)]
    assert all(f.exists() for f in files)
    assert not (tmp_path / "audit.json.4").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in files)
    pids = []
    for f in reversed(files):  # oldest first
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert 0 < f.stat().st_size <= 2000
        pids += [from_json(line).pid for line in f.read_bytes().splitlines()]
    # the newest events, in order, without gaps or duplicates
    assert pids == list(range(n - len(pids) + 1, n + 1))
    assert sink.stats()["written"] == n and sink.stats()["rotations"] > 3


def test_file_sink_backups_zero_and_existing_mode(tmp_path):
    path = tmp_path / "a.log"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    sink = FileSink(path, max_bytes=300, backups=0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for i in range(10):
        sink.write(ev(i))
    sink.close()
    assert os.listdir(tmp_path) == ["a.log"]
    assert from_json(path.read_bytes().splitlines()[-1]).pid == 10


def test_file_sink_fsync_after_deny(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    path = tmp_path / "audit.json"
    sink = FileSink(path, max_bytes=0)
    sink.write(ev(0, "permit"))
    sink.write(ev(1, "would-deny"))
    assert synced == []
    sink.write(ev(2, "deny"))
    assert synced == [path.stat().st_size]  # right after the deny line
    sink.write(ev(3, "permit"))
    sink.write(ev(4, "deny"))
    assert len(synced) == 2
    sink.write(system_event("integrity", "tag mismatch", path="/d/x"))
    assert len(synced) == 3
    monkeypatch.setattr(os, "fsync", real)
    sink.close()
    assert [from_json(line).decision for line in path.read_bytes().splitlines()] == [
        "permit", "would-deny", "deny", "permit", "deny", ""]


def test_file_sink_cef(tmp_path):
    path = tmp_path / "audit.cef"
    sink = FileSink(path, format="cef")
    sink.write(ev(0, "deny", path="/data/a|b=c\\d\ne"))
    sink.close()
    (line,) = path.read_text().splitlines()
    header, ext = parse_cef(line)
    assert header[5] == "access denied" and ext["fname"] == "/data/a|b=c\\d\ne"


# ---------------------------------------------------------------------- logger


class ListSink(Sink):
    def __init__(self, name="list"):
        super().__init__(name)
        self.events: list[Event] = []

    def write(self, event):
        self.events.append(event)
        self._count("written")


class BlockingSink(ListSink):
    """Blocks inside write() until released."""

    def __init__(self):
        super().__init__("blocking")
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, event):
        self.entered.set()
        assert self.release.wait(WAIT)
        super().write(event)


class FailingSink(Sink):
    def write(self, event):
        raise OSError("disk on fire")


def test_logger_many_threads_exactly_once(tmp_path):
    lst = ListSink()
    fsink = FileSink(tmp_path / "audit.json", max_bytes=0)
    logger = AuditLogger([lst, fsink], queue_size=100_000)
    n_threads, per = 8, 500
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for i in range(per):
            assert logger.log(ev(path=f"/t{t}/{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert logger.close(WAIT)
    want = {f"/t{t}/{i}" for t in range(n_threads) for i in range(per)}
    got = [e.path for e in lst.events]
    assert len(got) == len(want) and set(got) == want
    lines = (tmp_path / "audit.json").read_bytes().splitlines()
    assert sorted(from_json(x).path for x in lines) == sorted(want)
    s = logger.stats()
    assert s["enqueued"] == len(want) and s["dropped"] == 0 and s["queue_depth"] == 0
    assert s["sinks"]["list"]["written"] == len(want)
    assert s["sinks"][fsink.name]["written"] == len(want)
    # per-thread order is preserved
    for t in range(n_threads):
        mine = [p for p in got if p.startswith(f"/t{t}/")]
        assert mine == [f"/t{t}/{i}" for i in range(per)]


class SteppingSink(ListSink):
    """Lets the writer through one event per step()."""

    def __init__(self):
        super().__init__("stepping")
        self.cond = threading.Condition()
        self.permits = 0
        self.waiting = 0

    def write(self, event):
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.permits > 0, WAIT)
            self.permits -= 1
            self.waiting -= 1
        super().write(event)

    def step(self, n=1):
        with self.cond:
            self.permits += n
            self.cond.notify_all()

    def wait_blocked(self):
        with self.cond:
            assert self.cond.wait_for(lambda: self.waiting and not self.permits, WAIT)


def test_logger_drops_when_full_then_reports_once():
    sink = SteppingSink()
    logger = AuditLogger([sink], queue_size=10)
    try:
        assert logger.log(ev(path="/first"))
        sink.wait_blocked()  # the writer is stuck in the sink with "/first"
        accepted = [logger.log(ev(path=f"/q{i}")) for i in range(10)]
        rejected = [logger.log(ev(path=f"/x{i}")) for i in range(7)]
        assert accepted == [True] * 10 and rejected == [False] * 7
        s = logger.stats()
        assert (s["dropped"], s["queue_depth"], s["enqueued"]) == (7, 10, 11)
        assert s["dropped_unreported"] == 7
        # let exactly one event through: one slot frees, the queue never runs empty
        sink.step()
        sink.wait_blocked()
        assert logger.stats()["queue_depth"] == 9
        assert logger.log(ev(path="/after"))  # carries the "dropped 7" marker
        assert logger.log(ev(path="/full")) is False  # queue full again
        assert logger.stats()["dropped_unreported"] == 1
    finally:
        sink.step(1000)
        assert logger.close(WAIT)
    paths = [e.path if e.kind == "access" else e.reason for e in sink.events]
    assert paths == ["/first"] + [f"/q{i}" for i in range(10)] + [
        "dropped 7 events", "/after", "dropped 1 events"]
    d = [e for e in sink.events if e.kind == "dropped"]
    assert [e.detail for e in d] == [{"count": 7}, {"count": 1}]
    assert logger.stats()["dropped"] == 8 and logger.stats()["dropped_unreported"] == 0


def test_logger_reports_drops_once_idle():
    blk = BlockingSink()
    logger = AuditLogger([blk], queue_size=3)
    try:
        logger.log(ev(path="/a"))
        assert blk.entered.wait(WAIT)
        for i in range(6):
            logger.log(ev(path=f"/b{i}"))
        blk.release.set()
        # no further log() call: the writer reports the drops on its own once idle
        deadline = threading.Event()
        for _ in range(int(WAIT / 0.05)):
            if any(e.kind == "dropped" for e in blk.events):
                break
            deadline.wait(0.05)
        assert [e.reason for e in blk.events if e.kind == "dropped"] == ["dropped 3 events"]
        assert [e.path for e in blk.events][:4] == ["/a", "/b0", "/b1", "/b2"]
    finally:
        blk.release.set()
        assert logger.close(WAIT)
    assert len(blk.events) == 5


def test_logger_reports_drops_at_close():
    blk = BlockingSink()
    logger = AuditLogger([blk], queue_size=2)
    logger.log(ev(path="/a"))
    assert blk.entered.wait(WAIT)
    for i in range(5):
        logger.log(ev(path=f"/b{i}"))
    blk.release.set()
    assert logger.close(WAIT)
    assert [e.reason for e in blk.events if e.kind == "dropped"] == ["dropped 3 events"]
    assert logger.log(ev()) is False and logger.stats()["dropped"] == 4


def test_log_never_blocks_threads_and_asyncio():
    blk = BlockingSink()
    logger = AuditLogger([blk], queue_size=4)
    results = []

    async def from_loop():
        return [logger.log(ev(path=f"/loop{i}")) for i in range(20)]

    def producer():
        results.append([logger.log(ev(path=f"/thr{i}")) for i in range(20)])
        results.append(asyncio.run(from_loop()))

    try:
        logger.log(ev(path="/0"))
        assert blk.entered.wait(WAIT)
        t = threading.Thread(target=producer)
        t.start()
        t.join(WAIT)  # liveness bound only: with a blocking log() this would hang
        assert not t.is_alive(), "log() blocked while the sink was stuck"
        assert not blk.release.is_set()
        assert results[0][:4] == [True] * 4 and not any(results[0][4:]) and not any(results[1])
        assert logger.stats()["dropped"] == 36
    finally:
        blk.release.set()
        logger.close(WAIT)


def test_failing_sink_does_not_stop_others():
    good = ListSink("good")
    bad = FailingSink("bad")
    logger = AuditLogger([bad, good], queue_size=100)
    for i in range(20):
        logger.log(ev(i))
    assert logger.flush(WAIT)
    logger.log(ev(99))
    assert logger.close(WAIT)
    assert [e.pid for e in good.events] == [i + 1 for i in range(20)] + [100]
    s = logger.stats()
    assert s["sinks"]["bad"]["errors"] == 21 and s["sink_errors"] == 21
    assert s["sinks"]["good"]["written"] == 21


# ----------------------------------------------------- syslog sink (local servers)


def read_frames(conn: socket.socket, want: int) -> list[bytes]:
    """Read ``want`` RFC 6587 octet-counted frames."""
    buf, out = b"", []
    while len(out) < want:
        while b" " not in buf:
            chunk = conn.recv(65536)
            assert chunk, "connection closed early"
            buf += chunk
        n, rest = buf.split(b" ", 1)
        assert n.isdigit() and not n.startswith(b"0")
        while len(rest) < int(n):
            chunk = conn.recv(65536)
            assert chunk, "connection closed early"
            rest += chunk
        out.append(rest[: int(n)])
        buf = rest[int(n):]
    return out


def listen(port=0) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()
    srv.settimeout(WAIT)
    return srv


def test_syslog_tcp_octet_counting_and_reconnect():
    srv = listen()
    port = srv.getsockname()[1]
    sink = SyslogSink("127.0.0.1", port, transport="tcp", format="json",
                      facility=FACILITIES["authpriv"], reconnect_min=0.02, reconnect_max=0.1)
    try:
        conn, _ = srv.accept()
        conn.settimeout(WAIT)
        assert sink.wait_connected(WAIT)
        tricky = "/data/x y\n]\"\\z€"
        for i in range(3):
            sink.write(ev(i, "deny", path=tricky + str(i)))
        frames = read_frames(conn, 3)
        for i, f in enumerate(frames):
            p = parse_rfc5424(f.decode())
            assert p["facility"] == 10 and p["severity"] == 4
            assert p["sd"][SD_ID]["path"] == tricky + str(i)
            assert from_json(p["msg"]).path == tricky + str(i)
        # outage: the server goes away; the sink notices and drops instead of blocking
        srv.close()
        conn.close()
        assert sink.wait_down(WAIT)
        for i in range(5):
            sink.write(ev(100 + i))
        assert sink.stats()["dropped"] == 5
        # the server comes back on the same port: the sink reconnects by itself
        srv = listen(port)
        conn, _ = srv.accept()
        conn.settimeout(WAIT)
        assert sink.wait_connected(WAIT)
        sink.write(ev(7, path="/back"))
        (f,) = read_frames(conn, 1)
        assert from_json(parse_rfc5424(f.decode())["msg"]).path == "/back"
        assert sink.flush(WAIT)
        s = sink.stats()
        assert s["written"] == 4 and s["dropped"] == 5 and s["reconnects"] >= 1
        assert s["errors"] >= 1
    finally:
        sink.close(WAIT)
        srv.close()


def test_syslog_udp_one_datagram_per_message():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(WAIT)
    sink = SyslogSink("127.0.0.1", rx.getsockname()[1], transport="udp", format="cef")
    try:
        for i in range(3):
            sink.write(ev(i, path=f"/u|{i}="))
        assert sink.flush(WAIT)
        for i in range(3):
            p = parse_rfc5424(rx.recv(65536).decode())
            assert not p["msg"].startswith(tuple("0123456789"))  # no octet count
            assert parse_cef(p["msg"])[1]["fname"] == f"/u|{i}="
        assert sink.stats()["written"] == 3
    finally:
        sink.close(WAIT)
        rx.close()


def test_syslog_down_at_start_counts_drops():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here
    sink = SyslogSink("127.0.0.1", port, transport="tcp", reconnect_min=5, reconnect_max=5)
    try:
        assert sink.wait_down(WAIT)
        logger = AuditLogger([sink])
        for i in range(4):
            assert logger.log(ev(i))
        assert logger.close(WAIT)
        st_ = sink.stats()
        assert st_["dropped"] == 4 and st_["written"] == 0 and st_["errors"] >= 1
        assert not st_["connected"]
    finally:
        sink.close(WAIT)


# ---------------------------------------------------------------------- config


def test_config_builds_logger(tmp_path):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(WAIT)
    cfg = load_audit_config({
        "queue_size": 64,
        "sinks": [
            {"type": "file", "path": str(tmp_path / "a.cef"), "format": "cef",
             "max_bytes": 4096, "backups": 2},
            {"type": "syslog", "transport": "udp", "host": "127.0.0.1",
             "port": rx.getsockname()[1], "facility": 13, "app_name": "tk"},
        ],
    })
    assert isinstance(cfg, AuditConfig) and cfg.queue_size == 64
    logger = build_logger(cfg, host="agent1")
    assert logger.host == "agent1" and logger.queue_size == 64
    logger.log(ev(0, "deny"))
    assert logger.close(WAIT)
    assert parse_cef((tmp_path / "a.cef").read_text().strip())[1]["act"] == "deny"
    p = parse_rfc5424(rx.recv(65536).decode())
    assert (p["facility"], p["app_name"]) == (13, "tk")
    rx.close()


@pytest.mark.parametrize("section, where", [
    ({"queue_size": 0}, "$.audit.queue_size"),
    ({"sinks": [{"type": "nfs"}]}, "$.audit.sinks[0].type"),
    ({"sinks": [{"type": "file"}]}, "$.audit.sinks[0]"),
    ({"sinks": [{"type": "file", "path": "/x", "format": "xml"}]}, "$.audit.sinks[0].format"),
    ({"sinks": [{"type": "file", "path": "/x", "backups": -1}]}, "$.audit.sinks[0].backups"),
    ({"sinks": [{"type": "file", "path": "relative"}]}, "$.audit.sinks[0]"),
    ({"sinks": [{"type": "file", "path": "/x", "colour": 1}]}, "$.audit.sinks[0]"),
    ({"sinks": [{}, {"type": "syslog", "host": "h", "port": 70000}]}, "$.audit.sinks[0]"),
    ({"sinks": [{"type": "syslog", "host": "h", "port": 70000}]}, "$.audit.sinks[0].port"),
    ({"sinks": [{"type": "syslog", "host": "h", "transport": "sctp"}]},
     "$.audit.sinks[0].transport"),
    ({"sinks": [{"type": "syslog", "host": "h", "facility": "local9"}]}, "$.audit.sinks[0]"),
    ({"sinks": [{"type": "syslog", "host": "h", "facility": 24}]}, "$.audit.sinks[0].facility"),
    ({"sinks": [{"type": "syslog", "host": "h", "transport": "udp", "ca_file": "/c"}]},
     "$.audit.sinks[0]"),
    ({"sinks": [{"type": "syslog", "host": "h", "key_file": "/k"}]}, "$.audit.sinks[0]"),
    ({"sinks": [{"type": "syslog", "host": "h", "app_name": "a b"}]}, "$.audit.sinks[0]"),
])
def test_config_errors_name_the_field(section, where):
    with pytest.raises(ConfigError) as ei:
        load_audit_config(section)
    assert f"`{where}`" in str(ei.value)
    assert ei.value.exit_code == 3


def test_build_logger_bad_ca_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sinks\[1\]"):
        build_logger({"sinks": [
            {"type": "file", "path": str(tmp_path / "ok.json")},
            {"type": "syslog", "host": "localhost", "ca_file": str(tmp_path / "missing.pem")},
        ]})


def test_config_round_trip_yaml_like():
    cfg = load_audit_config({"sinks": [{"type": "syslog", "host": "siem", "format": "cef"}]})
    (s,) = cfg.sinks
    assert (s.transport, s.port, s.facility, s.app_name) == ("tls", None, "local0", "takakrypt")
    assert msgspec.convert(msgspec.to_builtins(cfg), AuditConfig) == cfg
