"""benchmarks/kernel_guest.py's pure part on the host, with canned samples: the statistics,
the ratios to native (median and per round), the issue's targets, the cipher's share, the
table and the result schema.  The VM run itself (benchmarks/kernel_vm.py, `make
bench-kernel`) is too slow for the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import kernel_guest as kg  # noqa: E402


def canned() -> dict:
    return {
        "schema": kg.SCHEMA, "rounds": 3, "complete": True, "warmup_rounds": 1,
        "machine": {"kernel": "6.1.0-57-amd64", "cpu_flags": ["fpu", "aes"], "aes_ni": True,
                    "qemu": "QEMU emulator version 7.2.x", "accelerator": "TCG",
                    "lower": "ext4 on a brd RAM disk"},
        "settings": {"seq_mib": 64, "files": 3000},
        "targets": {n: {"label": v[0], "engine": v[1], "policy": v[2]}
                    for n, v in kg.TARGETS.items()},
        "samples": {
            "seq-write": {"native": [100.0, 80.0, 120.0], "kernel": [40.0, 40.0, 60.0],
                          "fuse": [20.0, 10.0, 30.0]},
            "seq-read": {"native": [200.0, 200.0, 200.0], "kernel": [150.0, 100.0, 120.0]},
            "untar": {"native": [2.0, 4.0, 3.0], "kernel": [3.0, 4.0, 6.0],
                      "fuse": [10.0, 12.0, 9.0]},
        },
        "failures": {"fuse-allow-all": {"seq": "dd exited with 1: boom",
                                        "seq-write": "dd exited with 1: boom"}},
        "cipher": {"driver": "generic-gcm-aesni", "bulk_block": 1 << 20,
                   "bulk_mibps": {"encrypt": 100.0, "decrypt": 200.0},
                   "block_mibps": {"encrypt": 50.0, "decrypt": 60.0}},
    }


def test_summarize_keeps_samples_in_round_order():
    s = kg.summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {"values": [3.0, 1.0, 2.0, 10.0], "median": 2.5, "min": 1.0, "max": 10.0}
    with pytest.raises(ValueError):
        kg.summarize([])


def test_ratios_median_against_median_and_per_round_spread():
    r = kg.ratios(canned()["samples"])
    # throughput: target/native; median 40 vs native median 100
    assert r["seq-write"]["kernel"]["median"] == pytest.approx(0.4)
    # per round: 40/100, 40/80, 60/120
    assert r["seq-write"]["kernel"]["per_round"] == pytest.approx([0.4, 0.5, 0.5])
    assert (r["seq-write"]["kernel"]["min"], r["seq-write"]["kernel"]["max"]) == \
        pytest.approx((0.4, 0.5))
    # time: target/native too (how many natives): 4 vs 3
    assert r["untar"]["kernel"]["median"] == pytest.approx(4 / 3)
    assert r["untar"]["fuse"]["per_round"] == pytest.approx([5.0, 3.0, 3.0])
    assert "native" not in r["untar"]
    # no native figure: no ratio
    assert "x" not in kg.ratios({"x": {"kernel": [1.0]}})


def test_ratio_refuses_zero():
    assert kg.ratio(0.0, 1.0, True) is None
    assert kg.ratio(1.0, 0.0, False) is None


@pytest.mark.parametrize("workload,r,ok", [
    ("untar", 1.5, True), ("untar", 1.51, False), ("rm-rf", 0.9, True),
    ("seq-read", 0.5, True), ("seq-write", 0.49, False), ("fio-randread", 0.1, None),
    ("ls-lR", None, None)])
def test_meets_issue_targets(workload, r, ok):
    assert kg.meets(workload, r) is ok


def test_cipher_share_and_bound():
    # 50 MiB/s through a layer whose cipher runs at 200 MiB/s: a quarter of the time
    assert kg.cipher_share(50.0, 200.0) == pytest.approx(0.25)
    # native 100 MiB/s, cipher 100 MiB/s added serially: at best half of native
    assert kg.cipher_bound(100.0, 100.0) == pytest.approx(0.5)
    assert kg.cipher_bound(100.0, 300.0) == pytest.approx(0.75)
    assert kg.cipher_share(0.0, 1.0) is None and kg.cipher_bound(1.0, 0.0) is None


def test_table_rows_ratios_targets_and_cipher():
    text = kg.table(canned())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["workload", "target", "median", "min-max"]
    row = next(ln for ln in lines if ln.startswith("seq-write") and " kernel " in ln)
    assert row.split() == ["seq-write", "kernel", "40.00", "40.00-60.00", "MiB/s", "0.40",
                           "0.40-0.50", ">=", "0.5x", "NO"]
    row = next(ln for ln in lines if ln.startswith("untar") and " kernel " in ln)
    assert row.split()[5:] == ["1.33", "1.00-2.00", "<=", "1.5x", "yes"]
    row = next(ln for ln in lines if ln.startswith("seq-read") and " native " in ln)
    assert row.split()[2:6] == ["200", "200-200", "MiB/s", "1.00"]
    assert any("failed" in ln and "fuse-allow-all" in ln and "boom" in ln for ln in lines)
    assert "driver generic-gcm-aesni" in text and "AES-NI: yes" in text
    # seq-write: native 100 MiB/s against encrypt 100 MiB/s: at most 0.50x; the kernel's
    # 40 MiB/s is 40 % cipher
    assert "reaches at most 0.50x native" in text
    assert "kernel: the cipher alone is 40 % of its time" in text
    assert "kernel: the cipher alone is 60 % of its time" in text   # 120 / 200 (decrypt)


def test_validate_accepts_canned_and_json_round_trip():
    doc = json.loads(json.dumps(canned()))
    assert kg.validate(doc) == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(schema="other/1"), "schema"),
    (lambda d: d.pop("cipher"), "cipher missing"),
    (lambda d: d["samples"].update(dd={"native": [1.0]}), "unknown workload"),
    (lambda d: d["samples"]["untar"].update(ceph=[1.0]), "unknown target"),
    (lambda d: d["samples"]["untar"].update(kernel=[1.0, -2.0]), "positive numbers"),
    (lambda d: d["samples"]["untar"].update(kernel=[1.0] * 4), "4 samples for 3 rounds"),
    (lambda d: d["machine"].pop("aes_ni"), "machine.aes_ni"),
    (lambda d: d.pop("complete"), "complete missing"),
])
def test_validate_names_what_is_wrong(mutate, needle):
    doc = canned()
    mutate(doc)
    errs = kg.validate(doc)
    assert errs and any(needle in e for e in errs), errs


def test_gcm_drivers_parses_proc_crypto(tmp_path, monkeypatch):
    text = ("name         : gcm(aes)\ndriver       : gcm_base(ctr(aes-generic),ghash-generic)\n"
            "module       : gcm\npriority     : 100\nselftest     : passed\n\n"
            "name         : sha256\ndriver       : sha256-generic\npriority     : 100\n\n"
            "name         : gcm(aes)\ndriver       : generic-gcm-aesni\nmodule       : "
            "aesni_intel\npriority     : 400\nselftest     : passed\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(
        tmp_path / "crypto", *a, **k) if p == "/proc/crypto" else real_open(p, *a, **k))
    (tmp_path / "crypto").write_text(text)
    d = kg.gcm_drivers()
    assert [x["driver"] for x in d] == ["generic-gcm-aesni",
                                        "gcm_base(ctr(aes-generic),ghash-generic)"]
    assert d[0]["priority"] == 400 and d[0]["module"] == "aesni_intel"


def test_host_script_help_and_round_floor():
    script = BENCH / "kernel_vm.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "1.5x" in r.stdout
    r = subprocess.run([sys.executable, str(script), "--rounds", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "at least 3" in r.stderr
