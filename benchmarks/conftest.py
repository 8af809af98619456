"""Benchmark support: throughput bookkeeping and the ratio report printed at the end.

Benchmarks are not tests: nothing here asserts a speed.  Every target is printed as a
ratio against a reference measured in the same run (the machine is shared and noisy).
"""

import json
import os

import pytest

from takakrypt.bench.machine import cpu_model

#: benchmark name -> bytes processed per round
BYTES: dict[str, int] = {}
#: extra measurements that are not pytest-benchmark rounds: name -> GB/s
EXTRA: dict[str, float] = {}
#: summary lines other benchmark modules add (printed at the end of the run)
REPORT: list[str] = []


def gbps(bench_name: str, stats) -> float:
    return BYTES[bench_name] / stats["median"] / 1e9


@pytest.fixture
def throughput(request):
    def set_bytes(n: int) -> None:
        BYTES[request.node.name] = n
    return set_bytes


@pytest.fixture
def extra():
    return EXTRA


def _ratios(benchmarks: list[dict]) -> list[str]:
    by = {b["name"]: b for b in benchmarks}
    rate = {n: BYTES[n] / b["stats"]["median"] / 1e9 for n, b in by.items() if n in BYTES}
    rate.update(EXTRA)
    lines = ["", "throughput (median, GB/s = 1e9 bytes/s):"]
    lines += [f"  {n:<48} {r:7.2f}" for n, r in sorted(rate.items())]
    checks = [
        ("(a) native batch 4K / (b) pyca loop per 4K block", "test_a_native_batch_64k[ipsecmb]",
         "test_b_pyca_loop_4k", 3.0),
        ("(a) native batch 4K / (c) pyca one 64K buffer", "test_a_native_batch_64k[ipsecmb]",
         "test_c_pyca_single_64k", 0.9),
        ("(a) 1 MiB batches / (b) pyca loop", "test_a_native_batch_1m[ipsecmb]",
         "test_b_pyca_loop_4k", 3.0),
        ("(a) 1 MiB batches / (c) pyca 64K", "test_a_native_batch_1m[ipsecmb]",
         "test_c_pyca_single_64k", 0.9),
        ("(a) native batch 4K / (b0) bare pyca loop", "test_a_native_batch_64k[ipsecmb]",
         "test_b0_pyca_bare_loop_4k", None),
        ("openssl engine batch / (b) pyca loop", "test_a_native_batch_64k[openssl]",
         "test_b_pyca_loop_4k", None),
        ("decrypt batch / encrypt batch", "test_a_native_decrypt_64k[ipsecmb]",
         "test_a_native_batch_64k[ipsecmb]", None),
        ("8 threads / 1 thread (native batch)", "test_a_native_threads8_64k",
         "test_a_native_batch_64k[ipsecmb]", None),
        ("CLI encrypt 1 GiB tmpfs / (a) 1 MiB batches", "cli_encrypt_1g",
         "test_a_native_batch_1m[ipsecmb]", None),
        ("CLI decrypt 1 GiB tmpfs / (a) 1 MiB batches", "cli_decrypt_1g",
         "test_a_native_batch_1m[ipsecmb]", None),
        ("CLI encrypt 1 GiB tmpfs / cp of the file", "cli_encrypt_1g", "cp_1g_tmpfs", None),
        ("CLI decrypt 1 GiB tmpfs / cp of the file", "cli_decrypt_1g", "cp_1g_tmpfs", None),
    ]
    lines.append("")
    lines.append("ratios (same run):")
    for label, num, den, target in checks:
        if num in rate and den in rate:
            r = rate[num] / rate[den]
            verdict = "" if target is None else (f"  target >= {target}: "
                                                  + ("MET" if r >= target else "NOT MET"))
            lines.append(f"  {label:<52} {r:6.2f}x{verdict}")
    return lines


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["takakrypt"] = {"bytes_per_round": BYTES, "extra_gbps": EXTRA,
                                "cpu": cpu_model()}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    data = [{"name": b.name, "stats": b.stats.as_dict()} for b in bs.benchmarks if b.stats]
    if any(n in BYTES for n in (d["name"] for d in data)):
        for line in _ratios(data):
            terminalreporter.write_line(line)
    for line in REPORT:
        terminalreporter.write_line(line)
    path = os.environ.get("TAKAKRYPT_RATIOS_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"lines": _ratios(data)}, f, indent=1)
