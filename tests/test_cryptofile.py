"""Random-access reads and writes on TAKA files, checked against a bytearray model."""

import os

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from takakrypt import format as fmt
from takakrypt.cryptofile import TakaFile
from takakrypt.stream import decrypt_file

KEY = bytearray(os.urandom(32))


def lookup(name, version):
    return bytearray(KEY)


class TakaModel(RuleBasedStateMachine):
    """Random write/truncate/read/reopen sequences; the file must always equal the model."""

    BS = 512  # small blocks: many boundaries per example

    @initialize()
    def setup(self):
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "f.taka")
        self.f = TakaFile.create(self.path, "model", 1, KEY, block_size=self.BS)
        self.model = bytearray()

    offsets = st.one_of(st.integers(0, 6 * 512), st.sampled_from([0, 511, 512, 513, 1023, 1024]))

    @rule(offset=offsets, data=st.binary(min_size=1, max_size=1700))
    def write(self, offset, data):
        assert self.f.write(offset, data) == len(data)
        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset:offset + len(data)] = data

    @rule(size=offsets)
    def truncate(self, size):
        self.f.truncate(size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    @rule(offset=offsets, length=st.integers(0, 2000))
    def read(self, offset, length):
        assert self.f.read(offset, length) == bytes(self.model[offset:offset + length])

    @rule()
    def reopen(self):
        self.f.close()
        self.f = TakaFile.open(self.path, lookup, writable=True)

    @invariant()
    def sizes_agree(self):
        if hasattr(self, "f"):
            assert self.f.size == len(self.model)
            assert os.path.getsize(self.path) == fmt.stored_size(len(self.model), self.BS)

    def teardown(self):
        if hasattr(self, "f"):
            self.f.close()
            out = os.path.join(self.dir, "out")
            decrypt_file(self.path, out, lookup)
            with open(out, "rb") as fh:
                assert fh.read() == bytes(self.model)
            import shutil
            shutil.rmtree(self.dir)


TestTakaModel = TakaModel.TestCase


def test_empty_file(tmp_path):
    p = tmp_path / "e"
    with TakaFile.create(p, "k", 1, KEY) as f:
        assert f.size == 0
        assert f.read(0, 100) == b""
    assert p.stat().st_size == fmt.HEADER_SIZE
    with TakaFile.open(p, lookup) as f:
        assert f.read(0, 10) == b""


def test_sparse_write_far_past_end_stays_sparse(tmp_path):
    p = tmp_path / "s"
    with TakaFile.create(p, "k", 1, KEY) as f:
        f.write(0, b"head")
        f.write(100 * 4096 + 7, b"tail")
        assert f.read(0, 4) == b"head"
        assert f.read(50 * 4096, 4096) == bytes(4096)
        assert f.read(100 * 4096 + 7, 10) == b"tail"
    # blocks 1..99 were never written: the backing file has holes
    assert os.stat(p).st_blocks * 512 < 20 * 4096


def test_read_only_refuses_writes(tmp_path):
    p = tmp_path / "r"
    TakaFile.create(p, "k", 1, KEY).close()
    with TakaFile.open(p, lookup) as f, pytest.raises(PermissionError):
        f.write(0, b"x")


def test_crash_leftover_after_interrupted_shrink_never_reappears(tmp_path):
    """Shrink writes the header first; if the process dies before the ftruncate, the
    stale blocks stay on disk.  Growing again must give zeros, never the old bytes."""
    p = tmp_path / "c"
    with TakaFile.create(p, "k", 1, KEY) as f:
        f.write(0, b"A" * 3 * 4096)
        blob = p.read_bytes()
        f.truncate(100)  # complete shrink
    # simulate the crash: new header (size 100) but old blocks 0..2 still on disk
    hdr = p.read_bytes()[:fmt.HEADER_SIZE]
    p.write_bytes(hdr + blob[fmt.HEADER_SIZE:])
    with TakaFile.open(p, lookup, writable=True) as f:
        assert f.size == 100
        assert f.read(0, 200) == b"A" * 100
        f.truncate(3 * 4096)
        assert f.read(0, 3 * 4096) == b"A" * 100 + bytes(3 * 4096 - 100)
    with TakaFile.open(p, lookup, writable=True) as f:
        f.truncate(100)
    p.write_bytes(p.read_bytes()[:fmt.HEADER_SIZE] + blob[fmt.HEADER_SIZE:])
    with TakaFile.open(p, lookup, writable=True) as f:
        f.write(2 * 4096, b"Z")
        assert f.read(0, 2 * 4096 + 1) == b"A" * 100 + bytes(2 * 4096 - 100) + b"Z"


def test_crash_leftover_after_interrupted_extend_is_ignored(tmp_path):
    """Growing writes blocks first, header last: a crash in between leaves the old
    size in the header, and the file reads as before the write."""
    p = tmp_path / "g"
    with TakaFile.create(p, "k", 1, KEY) as f:
        f.write(0, b"B" * 1000)
        old_header = p.read_bytes()[:fmt.HEADER_SIZE]
        f.write(1000, b"C" * 9000)
    data = p.read_bytes()
    p.write_bytes(old_header + data[fmt.HEADER_SIZE:])
    with TakaFile.open(p, lookup, writable=True) as f:
        assert f.size == 1000
        assert f.read(0, 5000) == b"B" * 1000
        f.write(1500, b"D")
        assert f.read(0, 2000) == b"B" * 1000 + bytes(500) + b"D"


def test_large_write_spanning_many_blocks(tmp_path):
    p = tmp_path / "l"
    data = os.urandom(3 * 1024 * 1024 + 123)
    with TakaFile.create(p, "k", 1, KEY) as f:
        f.write(5, data)
        assert f.read(5, len(data)) == data
        assert f.read(0, 5) == bytes(5)
