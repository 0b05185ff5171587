"""The preprocessing cache: content keys, and waiting for local rank 0's build without collectives.

A prepared cache is a directory named by its key, built once by launcher.atomic.build_once. Other
local ranks poll for its marker (a torch collective would time out after 30 minutes while rank 0
tokenises a large data set).
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from launcher import caches
from launcher.atomic import FAILED, is_complete, write_text_atomic
from launcher.data.errors import DataError
from launcher.data.files import HUB

FRESH_S = 60  # a failure marker older than this (before we started waiting) is from an earlier run


def cache_root(cache_dir: Optional[str] = None) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    return caches.cache_root() / "data"


def cache_key(parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def file_digest(path: str, root: Path) -> str:
    """Hash of a file's bytes, remembered per (size, mtime, inode) so later runs skip re-reading it."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = root / "digests" / (hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["digest"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        import xxhash

        h = xxhash.xxh3_128()
    except ImportError:
        h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    write_text_atomic(memo, json.dumps({"path": path, "stamp": stamp, "digest": digest}))
    return digest


def source_key(src, root: Path) -> list:
    """A files-spec entry by content: each file's digest (hub datasets by name) and its mixing."""
    files = [[f, f if f.startswith(HUB) else file_digest(f, root)] for f in src.files]
    return [files, src.weight, src.samples]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the serialised Rust tokenizer and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def wait_for(final: Path, timeout_min: float, log: Callable[[str], Any] = print, poll_s: float = 1.0) -> None:
    """Block until `final` is complete; raise if its builder failed or timeout_min passes."""
    start = time.time()
    failed = final.with_name(final.name + FAILED)
    last_note = start
    while not is_complete(final):
        try:
            if failed.stat().st_mtime >= start - FRESH_S:
                why = failed.read_text()
                error = DataError if why.startswith(("DataError:", "ConfigError:")) else RuntimeError
                raise error(f"local rank 0 failed to prepare the data ({final}): {why}")
        except FileNotFoundError:
            pass
        now = time.time()
        if now - start > timeout_min * 60:
            raise DataError(f"waited {timeout_min:g} min for local rank 0 to prepare the data in {final}; "
                            "raise data.prepare_timeout_min for big data sets")
        if now - last_note > 60:
            log(f"data: waiting for local rank 0 to prepare {final} ({(now - start) / 60:.0f} min so far)")
            last_note = now
        time.sleep(poll_s)
