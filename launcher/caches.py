"""Where the launcher keeps what it builds, and the code fingerprint that every cache key carries.

A cached artifact is only as good as the code that built it: a generator edited (committed or
not) or a library upgraded must never be served the bytes of the old one. So every cache name
includes a digest of the source files that produce it and of the versions of the libraries they
call, next to a hand-bumped VERSION that tests/unit/test_cache_versions.py guards.
"""

import functools
import hashlib
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable


def cache_root() -> Path:
    """$SFT_CACHE_DIR, else ~/.cache/sft-launcher."""
    return Path(os.environ.get("SFT_CACHE_DIR") or Path.home() / ".cache" / "sft-launcher")


@functools.lru_cache(maxsize=None)
def code_digest(package_dir: str, libraries: Iterable[str] = (), recursive: bool = False) -> str:
    """12 hex digits over every .py file of package_dir (names and bytes) and the libraries' versions."""
    h = hashlib.sha256(f"python {sys.version_info.major}.{sys.version_info.minor}\0".encode())  # random, unicodedata
    root = Path(package_dir)
    for path in sorted(root.rglob("*.py") if recursive else root.glob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in libraries:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{name}=={version}\0".encode())
    return h.hexdigest()[:12]
