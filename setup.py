"""Build of the native extension(s) only; all project metadata lives in pyproject.toml.

Environment:
  TAKAKRYPT_SANITIZE=1  build with AddressSanitizer + UBSan (-O1 -g), see ci/asan.sh
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

_INCLUDE_CANDIDATES = ("/usr/include", "/usr/local/include", "/opt/homebrew/include")


def _pkg_config(*args: str) -> str | None:
    exe = shutil.which("pkg-config")
    if exe is None:
        return None
    try:
        return subprocess.run(
            [exe, *args], check=True, capture_output=True, text=True
        ).stdout.strip()
    except subprocess.CalledProcessError:
        return None


def find_crypto_libraries() -> dict[str, list[str]]:
    """Locate OpenSSL (libcrypto) and intel-ipsec-mb; exit with a clear message if absent."""
    include_dirs: list[str] = []
    library_dirs: list[str] = []
    libraries: list[str] = []
    missing: list[str] = []

    # OpenSSL: pkg-config libcrypto, else a plain header check + -lcrypto.
    cflags = _pkg_config("--cflags", "libcrypto")
    libs = _pkg_config("--libs", "libcrypto")
    if cflags is not None and libs is not None:
        for tok in cflags.split():
            if tok.startswith("-I"):
                include_dirs.append(tok[2:])
        for tok in libs.split():
            if tok.startswith("-L"):
                library_dirs.append(tok[2:])
            elif tok.startswith("-l"):
                libraries.append(tok[2:])
    elif any(os.path.exists(os.path.join(d, "openssl", "evp.h")) for d in _INCLUDE_CANDIDATES):
        libraries.append("crypto")
    else:
        missing.append(
            "OpenSSL >= 3.0 development files (libcrypto via pkg-config): "
            "on Debian/Ubuntu `apt-get install libssl-dev pkg-config`"
        )

    # intel-ipsec-mb: header present (no pkg-config file is shipped).
    extra = [p for p in os.environ.get("CPATH", "").split(":") if p]
    extra += [p for p in os.environ.get("C_INCLUDE_PATH", "").split(":") if p]
    if any(os.path.exists(os.path.join(d, "intel-ipsec-mb.h"))
           for d in (*include_dirs, *extra, *_INCLUDE_CANDIDATES)):
        libraries.insert(0, "IPSec_MB")
    else:
        missing.append(
            "intel-ipsec-mb >= 1.3 (header intel-ipsec-mb.h, library -lIPSec_MB): "
            "on Debian/Ubuntu `apt-get install libipsec-mb-dev`"
        )

    if missing:
        sys.exit("takakrypt: cannot build takakrypt._aesgcm, missing:\n  - "
                 + "\n  - ".join(missing))
    return {"include_dirs": include_dirs, "library_dirs": library_dirs, "libraries": libraries}


def _flags() -> tuple[list[str], list[str]]:
    if os.environ.get("TAKAKRYPT_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        return [*san, "-O1", "-g", "-Wall", "-Wextra"], san
    return ["-O2", "-Wall", "-Wextra"], []


compile_args, link_args = _flags()
libs = find_crypto_libraries()

extensions = [
    Extension(
        "takakrypt._aesgcm",
        sources=["src/_native/aesgcm.pyx", "src/_native/aesgcm_impl.c",
                 "src/_native/secmem.c"],
        depends=["src/_native/aesgcm_impl.h", "src/_native/secmem.h"],
        include_dirs=["src/_native", *libs["include_dirs"]],
        library_dirs=libs["library_dirs"],
        libraries=libs["libraries"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
    Extension(
        "takakrypt._cache",
        sources=["src/_native/cache.pyx", "src/_native/cache_impl.c"],
        depends=["src/_native/cache_impl.h"],
        include_dirs=["src/_native"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
    Extension(
        "takakrypt._ring",
        sources=["src/_native/ring.pyx", "src/_native/ring_impl.c"],
        depends=["src/_native/ring_impl.h"],
        include_dirs=["src/_native"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
]


def find_fuse3() -> dict[str, list[str]]:
    """libfuse3 via pkg-config; exit with a clear message if absent."""
    cflags = _pkg_config("--cflags", "fuse3")
    libs_ = _pkg_config("--libs", "fuse3")
    if cflags is None or libs_ is None:
        sys.exit("takakrypt: cannot build takakrypt._fuse, missing libfuse3 >= 3.12 "
                 "development files: on Debian/Ubuntu `apt-get install libfuse3-dev fuse3`")
    return {"include_dirs": [t[2:] for t in cflags.split() if t.startswith("-I")],
            "library_dirs": [t[2:] for t in libs_.split() if t.startswith("-L")],
            "libraries": [t[2:] for t in libs_.split() if t.startswith("-l")]}


# The guard point data path: its own copies of the AES-GCM and decision cache cores.
_fuse = find_fuse3()
extensions.append(
    Extension(
        "takakrypt._fuse",
        sources=["src/_native/fuse.pyx", "src/_native/fuse_impl.c",
                 "src/_native/fuse_inode.c", "src/_native/fuse_ops.c",
                 "src/_native/fuse_taka.c", "src/_native/fuse_uring.c",
                 "src/_native/fuse_handover.c", "src/_native/fuse_shadow.c",
                 "src/_native/fuse_split.c", "src/_native/fuse_rekey.c",
                 "src/_native/aesgcm_impl.c", "src/_native/secmem.c",
                 "src/_native/cache_impl.c", "src/_native/ring_impl.c"],
        depends=["src/_native/fuse_impl.h", "src/_native/fuse_int.h",
                 "src/_native/aesgcm_impl.h", "src/_native/secmem.h",
                 "src/_native/cache_impl.h",
                 "src/_native/ring_impl.h", "kernel/include/uapi/takakrypt.h"],
        include_dirs=["src/_native", *libs["include_dirs"], *_fuse["include_dirs"]],
        library_dirs=[*libs["library_dirs"], *_fuse["library_dirs"]],
        libraries=[*libs["libraries"], *_fuse["libraries"], "uring"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
)

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        build_dir="build/cython",
    )
)
