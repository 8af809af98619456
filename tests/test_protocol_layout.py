"""The C uapi header and the Python protocol module describe the same bytes.

A small C program (compiled here with gcc) includes kernel/include/uapi/takakrypt.h and
prints sizeof/offsetof of every struct and field and every constant; we compare with
the Python layouts.  It also builds a POLICY_CHECK request in C for Python to decode,
and parses Python-encoded messages so C and Python read the same fields.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from takakrypt import protocol as P
from takakrypt.protocol.messages import Len

ROOT = Path(__file__).resolve().parents[1]
UAPI = ROOT / "kernel" / "include" / "uapi"
HEADER = UAPI / "takakrypt.h"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{UAPI}"]

_C_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include "takakrypt.h"

static void layout(void)
{
%(layout)s
}

static unsigned char buf[TAKAKRYPT_MAX_MSG_SIZE];

/* POLICY_CHECK request v2 with fixed test values */
static void build(void)
{
	static const char path[] = "/data/pg/base/16384/2619";
	static const char proc[] = "/usr/lib/postgresql/15/bin/postgres";
	static const char cwd[] = "/var/lib/postgresql";
	static const char target[] = "/data/pg/base/16384/2619.new";
	struct takakrypt_policy_request *r = (struct takakrypt_policy_request *)buf;
	size_t off = sizeof(*r), i;

	memset(buf, 0, sizeof(buf));
	r->pid = 4242;
	r->uid = 26;
	r->gid = 27;
	r->action = TAKAKRYPT_ACTION_RENAME;
	r->path_len = sizeof(path) - 1;
	r->process_len = sizeof(proc) - 1;
	r->cwd_len = sizeof(cwd) - 1;
	r->tid = 4243;
	r->start_time = 123456789ull;
	r->exe_dev = 0x10302ull;
	r->exe_ino = 0x1122334455667788ull;
	r->guard_point_id = 3;
	r->target_len = sizeof(target) - 1;
	memcpy(buf + off, path, r->path_len); off += r->path_len;
	memcpy(buf + off, proc, r->process_len); off += r->process_len;
	memcpy(buf + off, cwd, r->cwd_len); off += r->cwd_len;
	memcpy(buf + off, target, r->target_len); off += r->target_len;
	r->header.magic = TAKAKRYPT_MSG_MAGIC;
	r->header.version = TAKAKRYPT_PROTOCOL_VERSION;
	r->header.operation = TAKAKRYPT_OP_POLICY_CHECK;
	r->header.sequence = 0xfffffffeu;
	r->header.payload_size = (__u32)(off - sizeof(r->header));
	r->header.status = TAKAKRYPT_SUCCESS;
	r->header.timestamp = 1700000000123456789ull;
	for (i = 0; i < off; i++)
		printf("%%02x", buf[i]);
	printf("\n");
}

static void str(const char *name, const unsigned char *p, __u32 n)
{
	printf("%%s=%%.*s\n", name, (int)n, (const char *)p);
}

/* parse a POLICY_CHECK request or response (version 2) given as hex */
static int parse(const char *hex)
{
	size_t n = strlen(hex) / 2, i, off;
	struct takakrypt_msg_header *h = (struct takakrypt_msg_header *)buf;

	if (n > sizeof(buf) || n < sizeof(*h))
		return 2;
	for (i = 0; i < n; i++) {
		unsigned int b;
		if (sscanf(hex + 2 * i, "%%2x", &b) != 1)
			return 2;
		buf[i] = (unsigned char)b;
	}
	if (h->magic != TAKAKRYPT_MSG_MAGIC || h->version != TAKAKRYPT_PROTOCOL_VERSION ||
	    h->payload_size != n - sizeof(*h))
		return 3;
	printf("operation=%%u\nresponse=%%u\nsequence=%%u\nstatus=%%u\ntimestamp=%%llu\n",
	       h->operation & ~TAKAKRYPT_MSG_RESPONSE, !!(h->operation & TAKAKRYPT_MSG_RESPONSE),
	       h->sequence, h->status, (unsigned long long)h->timestamp);
	if (h->operation == TAKAKRYPT_OP_POLICY_CHECK) {
		struct takakrypt_policy_request *r = (void *)buf;
		off = sizeof(*r);
		if (n < off || n != off + r->path_len + r->process_len + r->cwd_len + r->target_len)
			return 4;
		printf("pid=%%u\nuid=%%u\ngid=%%u\naction=%%u\ntid=%%u\nstart_time=%%llu\n"
		       "exe_dev=%%llu\nexe_ino=%%llu\nguard_point_id=%%u\n", r->pid, r->uid,
		       r->gid, r->action, r->tid, (unsigned long long)r->start_time,
		       (unsigned long long)r->exe_dev, (unsigned long long)r->exe_ino,
		       r->guard_point_id);
		str("path", buf + off, r->path_len); off += r->path_len;
		str("process", buf + off, r->process_len); off += r->process_len;
		str("cwd", buf + off, r->cwd_len); off += r->cwd_len;
		str("target", buf + off, r->target_len);
	} else if (h->operation == (TAKAKRYPT_OP_POLICY_CHECK | TAKAKRYPT_MSG_RESPONSE)) {
		struct takakrypt_policy_response *r = (void *)buf;
		off = sizeof(*r);
		if (n < off || n != off + r->key_id_len + r->policy_len + r->reason_len)
			return 4;
		printf("allow_access=%%u\nencrypt_file=%%u\naudit_action=%%u\neffects=%%u\n"
		       "rule_index=%%d\nkey_version=%%u\ncache_ttl_ms=%%u\n", r->allow_access,
		       r->encrypt_file, r->audit_action, r->effects, r->rule_index,
		       r->key_version, r->cache_ttl_ms);
		str("key_id", buf + off, r->key_id_len); off += r->key_id_len;
		str("policy", buf + off, r->policy_len); off += r->policy_len;
		str("reason", buf + off, r->reason_len);
	} else {
		return 5;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "layout"))
		layout();
	else if (argc >= 2 && !strcmp(argv[1], "build"))
		build();
	else if (argc >= 3 && !strcmp(argv[1], "parse"))
		return parse(argv[2]);
	else
		return 1;
	return 0;
}
"""


def _c_layout_body() -> str:
    lines = ['\tprintf("sizeof takakrypt_msg_header %zu\\n", '
             'sizeof(struct takakrypt_msg_header));']
    for f in ("magic", "version", "operation", "sequence", "payload_size", "status",
              "timestamp"):
        lines.append(f'\tprintf("offsetof takakrypt_msg_header {f} %zu %zu\\n", '
                     f'offsetof(struct takakrypt_msg_header, {f}), '
                     f'sizeof(((struct takakrypt_msg_header *)0)->{f}));')
    for lay in P.LAYOUTS:
        s = lay.c_struct
        lines.append(f'\tprintf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for name, _, _ in lay.offsets():
            lines.append(f'\tprintf("offsetof {s} {name} %zu %zu\\n", '
                         f'offsetof(struct {s}, {name}), '
                         f'sizeof(((struct {s} *)0)->{name}));')
    for name in P.c_constants():
        lines.append(f'\tprintf("const {name} %llu\\n", (unsigned long long)({name}));')
    for lay in P.LAYOUTS:
        if lay.size(1) != lay.size(2):
            macro = _v1_macro(lay)
            # a missing macro is a failed comparison naming it, not a compile error
            lines += [f"#ifdef {macro}",
                      f'\tprintf("const {macro} %llu\\n", (unsigned long long)({macro}));',
                      "#else",
                      f'\tprintf("const {macro} missing from takakrypt.h\\n");',
                      "#endif"]
    lines.append('\tprintf("const TAKAKRYPT_GENL_NAME %s\\n", TAKAKRYPT_GENL_NAME);')
    return "\n".join(lines)


def _v1_macro(lay: P.Layout) -> str:
    return "TAKAKRYPT_" + lay.c_struct[len("takakrypt_"):].upper() + "_V1_SIZE"


def _expected() -> dict[str, object]:
    want: dict[str, object] = {"sizeof takakrypt_msg_header": "32"}
    for i, f in enumerate(("magic", "version", "operation", "sequence", "payload_size",
                           "status")):
        want[f"offsetof takakrypt_msg_header {f}"] = f"{4 * i} 4"
    want["offsetof takakrypt_msg_header timestamp"] = "24 8"
    for lay in P.LAYOUTS:
        base = P.HEADER_SIZE if lay.with_header else 0
        want[f"sizeof {lay.c_struct}"] = str(base + lay.size())
        for name, off, size in lay.offsets():
            want[f"offsetof {lay.c_struct} {name}"] = f"{base + off} {size}"
        if lay.size(1) != lay.size(2):
            want[f"const {_v1_macro(lay)}"] = str(base + lay.size(1))
    for name, value in P.c_constants().items():
        want[f"const {name}"] = str(value)
    want["const TAKAKRYPT_GENL_NAME"] = P.GENL_NAME
    return want


def _compile(tmp_path: Path, *extra: str) -> Path:
    src = tmp_path / "layout.c"
    src.write_text(_C_MAIN % {"layout": _c_layout_body()})
    exe = tmp_path / ("layout" + "".join(e.strip("-_=") for e in extra))
    subprocess.run(["gcc", *CFLAGS, *extra, "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def cprog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("uapi"))


def _run(exe: Path, *args: str) -> str:
    return subprocess.run([str(exe), *args], check=True, capture_output=True,
                          text=True).stdout


def _parse_layout(out: str) -> dict[str, str]:
    got = {}
    for line in out.splitlines():
        words = line.split(" ")
        k = 3 if words[0] == "offsetof" else 2
        got[" ".join(words[:k])] = " ".join(words[k:])
    return got


def test_layout_matches_python(cprog: Path) -> None:
    got = _parse_layout(_run(cprog, "layout"))
    want = _expected()
    assert got == want


def test_stdint_fallback_same_layout(tmp_path: Path) -> None:
    # userspace without <linux/types.h>: the header falls back to <stdint.h> types
    exe = _compile(tmp_path, "-U__linux__")
    assert _parse_layout(_run(exe, "layout")) == _expected()


def test_header_compiles_as_kernel_code(tmp_path: Path) -> None:
    src = tmp_path / "k.c"
    src.write_text('#include "takakrypt.h"\n'
                   "int takakrypt_probe(void);\n"
                   "int takakrypt_probe(void) { return (int)sizeof(struct "
                   "takakrypt_policy_request); }\n")
    subprocess.run(["gcc", *CFLAGS, "-D__KERNEL__", "-fsyntax-only", str(src)], check=True,
                   capture_output=True, text=True)


def test_every_header_constant_known_to_python() -> None:
    text = HEADER.read_text()
    names = set(re.findall(r"^\s*(TAKAKRYPT_[A-Z0-9_]+)\s*=", text, re.M))
    names |= set(re.findall(r"^#define\s+(TAKAKRYPT_[A-Z0-9_]+)\s", text, re.M))
    names -= {"TAKAKRYPT_PACKED", "TAKAKRYPT_CMD_MAX", "TAKAKRYPT_ATTR_MAX",
              "TAKAKRYPT_GENL_NAME"}
    names = {n for n in names if not n.endswith("_V1_SIZE")}
    assert names == set(P.c_constants())
    structs = set(re.findall(r"^struct (takakrypt_\w+) \{", text, re.M))
    assert structs == {lay.c_struct for lay in P.LAYOUTS} | {"takakrypt_msg_header"}


def test_c_built_message_decodes_in_python(cprog: Path) -> None:
    raw = bytes.fromhex(_run(cprog, "build").strip())
    msg = P.decode(raw)
    assert P.encode(msg) == raw
    h = msg.header
    assert (h.operation, h.sequence, h.status, h.timestamp, h.version, h.response) == (
        P.Operation.POLICY_CHECK, 0xFFFFFFFE, P.Status.SUCCESS, 1700000000123456789, 2,
        False)
    assert msg.payload == P.PolicyCheckRequest(
        pid=4242, uid=26, gid=27, action=P.Action.RENAME, path="/data/pg/base/16384/2619",
        process="/usr/lib/postgresql/15/bin/postgres", cwd="/var/lib/postgresql",
        tid=4243, start_time=123456789, exe_dev=0x10302, exe_ino=0x1122334455667788,
        guard_point_id=3, target="/data/pg/base/16384/2619.new")


def _fields(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines())


def test_python_request_parses_in_c(cprog: Path) -> None:
    p = P.PolicyCheckRequest(pid=1, uid=1000, gid=1000, action=P.Action.LINK,
                             path="/g/a é", process="/usr/bin/ln", cwd="/home/u",
                             tid=2, start_time=2**40 + 5, exe_dev=2049, exe_ino=2**63 + 1,
                             guard_point_id=0xFFFFFFFF, target="/g/b")
    msg = P.request(p, 0x12345678, timestamp=2**63)
    got = _fields(_run(cprog, "parse", P.encode(msg).hex()))
    assert got == {
        "operation": "1", "response": "0", "sequence": str(0x12345678), "status": "0",
        "timestamp": str(2**63), "pid": "1", "uid": "1000", "gid": "1000",
        "action": str(int(P.Action.LINK)), "tid": "2", "start_time": str(2**40 + 5),
        "exe_dev": "2049", "exe_ino": str(2**63 + 1), "guard_point_id": str(0xFFFFFFFF),
        "path": "/g/a é", "process": "/usr/bin/ln", "cwd": "/home/u", "target": "/g/b"}


def test_python_response_parses_in_c(cprog: Path) -> None:
    req = P.request(P.PolicyCheckRequest(1, 2, 3, P.Action.READ, "/p", "/x", "/"), 9)
    rsp = P.reply(req, P.PolicyCheckResponse.from_effects(
        P.Effect.PERMIT | P.Effect.APPLY_KEY | P.Effect.AUDIT, key_id="pg-key",
        key_version=4, policy="pg", reason="rule 2: postgres", rule_index=2,
        cache_ttl_ms=30000), timestamp=5)
    got = _fields(_run(cprog, "parse", P.encode(rsp).hex()))
    assert got == {
        "operation": "1", "response": "1", "sequence": "9", "status": "0", "timestamp": "5",
        "allow_access": "1", "encrypt_file": "1", "audit_action": "1", "effects": "13",
        "rule_index": "2", "key_version": "4", "cache_ttl_ms": "30000", "key_id": "pg-key",
        "policy": "pg", "reason": "rule 2: postgres"}


def test_length_fields_precede_their_data() -> None:
    # every variable field of every layout has exactly one *_len (or count) field
    for lay in P.LAYOUTS:
        lens = [f.source.attr for f in lay.fixed if isinstance(f.source, Len)]
        assert sorted(lens) == sorted(v.attr for v in lay.var), lay.c_struct
