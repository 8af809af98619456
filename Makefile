# Takakrypt: `make demo` (the main job) and `make test` (the test suite).
# Both work as root on a fresh Debian 12 machine: they install missing Debian packages,
# create .venv, build the native code and install the package first.

PYTHON   ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.takakrypt-installed
DEB_PKGS := gcc make pkg-config python3-dev python3-venv libssl-dev libipsec-mb-dev \
            libfuse3-dev fuse3 liburing-dev openssl rsyslog rsyslog-gnutls postgresql-15 postgresql-client-15 tar \
            valgrind strace fio chromium
# tests/test_systemd_unit.py boots the Debian kernel under QEMU (TCG) with systemd as
# PID 1 through virtme-ng: about 200 MB of packages and 30 s more on a fresh machine.
# tests/test_kernel_vm.py builds kernel/takakryptfs.ko against the headers of that same
# kernel (ci/deps.sh installs/upgrades image and headers together) and checks it with sparse
VM_PKGS  := linux-image-amd64 linux-headers-amd64 sparse qemu-system-x86 busybox-static
SOURCES  := $(shell find src -name '*.py' -o -name '*.pyx' -o -name '*.c' -o -name '*.h' -o -name '*.pyi') \
            kernel/include/uapi/takakrypt.h setup.py pyproject.toml

.PHONY: all deps vm-tools venv install demo test test-fast asan bench bench-kernel perf perf-baseline clean
all: install

deps:
	@bash ci/deps.sh $(DEB_PKGS)

$(STAMP): $(SOURCES)
	@$(MAKE) --no-print-directory deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel Cython==3.3.1
	$(VPY) -m pip install -q --no-build-isolation -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

vm-tools: install
	@bash ci/deps.sh $(VM_PKGS)
	@test -x $(VENV)/bin/vng || $(VPY) -m pip install -q virtme-ng==1.42

demo: install
	bash ci/demo.sh

test: install vm-tools
	bash ci/test.sh

test-fast: install
	$(VPY) -m pytest -q tests

asan: install
	PY=$(VPY) bash ci/asan.sh

bench: install
	bash ci/bench.sh

# takakryptfs against native ext4 and the FUSE guard point in one TCG VM (ratios only;
# benchmarks/kernel_vm.py --help).  BENCH_ARGS: e.g. --quick, --json OUT
bench-kernel: install vm-tools
	$(VPY) benchmarks/kernel_vm.py $(BENCH_ARGS)

# deterministic performance signals (instructions, requests, system calls) against the
# committed benchmarks/baseline.json; fails on a regression (docs/performance.md,
# "Performance gate").  perf-baseline rewrites the baseline: the diff is the review.
perf: install
	$(VPY) benchmarks/perf/gate.py

perf-baseline: install
	$(VPY) benchmarks/perf/gate.py --write-baseline

clean:
	rm -rf build $(VENV) src/*.egg-info src/takakrypt/*.so src/_native/*.c.tmp .pytest_cache .benchmarks
