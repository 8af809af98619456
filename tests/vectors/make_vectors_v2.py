#!/usr/bin/env python3
"""Independent generator of TAKA v2 known-answer vectors (per-block key versions).

Written only against pyca/cryptography and the byte tables in docs/file-format.md
("Version 2"); it imports nothing from takakrypt, so a bug shared by the format code and
its tests cannot hide (it shares only the input generator and the output writer of
make_vectors.py, the v1 generator, which is written the same way).  Output:
taka_v2.json (committed).
Re-run: python tests/vectors/make_vectors_v2.py
"""

import hashlib
import hmac
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

sys.path.insert(0, str(Path(__file__).parent))
from make_vectors import det, write_vectors  # noqa: E402  (the v1 generator: no takakrypt)


def file_keys(data_key: bytes, file_id: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt=file_id, info=b"takakrypt/v2 file keys").derive(data_key)
    return okm[:32], okm[32:]


def seal(enc_key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM; the tag truncated to its first 96 bits (NIST SP 800-38D, 5.2.1.2)."""
    e = Cipher(algorithms.AES(enc_key), modes.GCM(nonce)).encryptor()
    e.authenticate_additional_data(aad)
    ct = e.update(plain) + e.finalize()
    return ct, e.tag[:12]


def taka_v2_file(keys, key_id, write_version, oldest, encryptions, file_id, block_size,
                 plaintext, block_versions, nonces):
    """keys: {version: data key}; block_versions[i]: the version of block i, or None
    for a hole (an all-zero stored block)."""
    kid = key_id.encode()
    static = (b"TAKA" + bytes([2, 1]) + struct.pack("<H", 0) + struct.pack("<I", block_size)
              + struct.pack("<I", write_version) + file_id + bytes([len(kid)])
              + kid.ljust(63, b"\0"))
    assert len(static) == 96
    aad_prefix = static[:12] + bytes(4) + static[16:]
    body = static + struct.pack("<QII", len(plaintext), encryptions, oldest)
    _enc, mac_key = file_keys(keys[write_version], file_id)
    header = body + hmac.new(mac_key, body, hashlib.sha256).digest()[:16]
    blocks = []
    for i in range(0, len(plaintext), block_size):
        idx = i // block_size
        piece = plaintext[i:i + block_size]
        v = block_versions[idx]
        if v is None:
            assert piece == bytes(len(piece))
            blocks.append(bytes(12 + len(piece) + 16))
            continue
        enc_key, _mac = file_keys(keys[v], file_id)
        nonce = nonces[idx * 12:(idx + 1) * 12]
        aad = aad_prefix + struct.pack("<QI", idx, v)
        ct, tag = seal(enc_key, nonce, piece, aad)
        blocks.append(nonce + ct + tag + struct.pack("<I", v))
    return header + b"".join(blocks)


CASES = [
    # name, size, block size, key id, write version, oldest, encryptions, block versions
    ("v2-empty", 0, 4096, "k", 1, 1, 65536, []),
    ("v2-one-byte", 1, 4096, "pgdata", 1, 1, 65536, [1]),
    ("v2-one-version", 3 * 4096 + 17, 4096, "db_master", 2, 2, 4, [2, 2, 2, 2]),
    ("v2-mixed", 4 * 4096 + 100, 4096, "db_master", 3, 1, 65536, [1, 3, 2, 3, 1]),
    ("v2-mixed-hole", 3 * 4096, 4096, "share.key-1", 5, 4, 7, [5, None, 4]),
    ("v2-last-block-new", 2 * 4096 + 1, 4096, "pgdata", 2, 1, 65536, [1, 1, 2]),
    ("v2-small-blocks", 5000, 512, "k512", 9, 8, 1 << 20,
     [8, 9, 8, 9, 8, 9, 8, 9, 8, 9]),
    ("v2-big-version", 5000, 4096, "x" * 63, 4294967295, 4294967294, 0xFFFFFFFF,
     [4294967294, 4294967295]),
]


def main() -> None:
    vectors = []
    for name, size, bs, key_id, wv, oldest, encryptions, bvers in CASES:
        plaintext = bytearray(det(f"{name}/plaintext", size))
        for i, v in enumerate(bvers):
            if v is None:  # a hole reads as zeros
                end = min(size, (i + 1) * bs)
                plaintext[i * bs:end] = bytes(end - i * bs)
        plaintext = bytes(plaintext)
        versions = sorted({wv, *(v for v in bvers if v is not None)})
        keys = {v: det(f"{name}/key/{v}", 32) for v in versions}
        file_id = det(f"{name}/file-id", 16)
        nonces = det(f"{name}/nonces", 12 * max(1, len(bvers)))
        blob = taka_v2_file(keys, key_id, wv, oldest, encryptions, file_id, bs, plaintext,
                            bvers, nonces)
        vectors.append({
            "name": name, "keys": {str(v): k.hex() for v, k in keys.items()},
            "key_id": key_id, "key_version": wv, "oldest_version": oldest,
            "encryptions": encryptions, "file_id": file_id.hex(), "block_size": bs,
            "block_versions": bvers, "plaintext": plaintext.hex(), "nonces": nonces.hex(),
            "file_keys": {str(v): file_keys(k, file_id)[0].hex() for v, k in keys.items()},
            "file": blob.hex(), "file_sha256": hashlib.sha256(blob).hexdigest(),
        })
    write_vectors("taka_v2.json", "make_vectors_v2.py", vectors)


if __name__ == "__main__":
    main()
