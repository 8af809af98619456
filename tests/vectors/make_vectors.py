#!/usr/bin/env python3
"""Independent generator of TAKA v1 known-answer vectors.

Written only against pyca/cryptography and the byte tables in docs/file-format.md; it
imports nothing from takakrypt, so a bug shared by the format code and its tests cannot
hide.  Output: taka_v1.json (committed).  Re-run: python tests/vectors/make_vectors.py
"""

import hashlib
import hmac
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def det(label: str, n: int) -> bytes:
    """Deterministic bytes for inputs (SHA-256 in counter mode over a label)."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


def taka_file(data_key, key_id, key_version, file_id, block_size, plaintext, nonces):
    okm = HKDF(hashes.SHA256(), 64, salt=file_id, info=b"takakrypt/v1 file keys").derive(data_key)
    enc_key, mac_key = okm[:32], okm[32:]
    kid = key_id.encode()
    static = (b"TAKA" + bytes([1, 1]) + struct.pack("<H", 0) + struct.pack("<I", block_size)
              + struct.pack("<I", key_version) + file_id + bytes([len(kid)])
              + kid.ljust(63, b"\0"))
    assert len(static) == 96
    body = static + struct.pack("<Q", len(plaintext)) + bytes(8)
    header = body + hmac.new(mac_key, body, hashlib.sha256).digest()[:16]
    aead = AESGCM(enc_key)
    blocks = []
    for i in range(0, len(plaintext), block_size):
        idx = i // block_size
        nonce = nonces[idx * 12:(idx + 1) * 12]
        aad = static + struct.pack("<Q", idx)
        blocks.append(nonce + aead.encrypt(nonce, plaintext[i:i + block_size], aad))
    return header + b"".join(blocks), enc_key, mac_key


CASES = [
    # name, plaintext size, block size, key id, key version
    ("empty", 0, 4096, "k", 1),
    ("one-byte", 1, 4096, "pgdata", 1),
    ("partial-block", 1000, 4096, "pgdata", 3),
    ("one-block", 4096, 4096, "share.key-1", 1),
    ("block-plus-one", 4097, 4096, "share.key-1", 2),
    ("three-blocks-partial", 3 * 4096 + 17, 4096, "db_master", 7),
    ("small-blocks", 5000, 512, "k512", 1),
    ("big-block", 70000, 65536, "k64k", 4294967295),
    ("long-key-id", 100, 4096, "x" * 63, 1),
]


def main() -> None:
    vectors = []
    for name, size, bs, key_id, kver in CASES:
        data_key = det(f"{name}/key", 32)
        file_id = det(f"{name}/file-id", 16)
        plaintext = det(f"{name}/plaintext", size)
        nonces = det(f"{name}/nonces", 12 * max(1, -(-size // bs)))
        blob, enc_key, mac_key = taka_file(data_key, key_id, kver, file_id, bs, plaintext, nonces)
        vectors.append({
            "name": name, "data_key": data_key.hex(), "key_id": key_id, "key_version": kver,
            "file_id": file_id.hex(), "block_size": bs, "plaintext": plaintext.hex(),
            "nonces": nonces.hex(), "file_key": enc_key.hex(), "mac_key": mac_key.hex(),
            "file": blob.hex(), "file_sha256": hashlib.sha256(blob).hexdigest(),
        })
    write_vectors("taka_v1.json", "make_vectors.py", vectors)


def write_vectors(filename: str, generator: str, vectors: list[dict]) -> None:
    out = Path(__file__).with_name(filename)
    out.write_text(json.dumps({"generator": f"{generator} (pyca/cryptography only)",
                               "vectors": vectors}, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main()
