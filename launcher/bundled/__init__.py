"""Offline bundled defaults: resolve `bundled://` URIs to a tiny Llama and its task data, built on first use.

URIs:
  bundled://tiny-llama               -> model dir (config, safetensors, tokenizer, generation_config)
  bundled://tiny-tasks/train.jsonl   -> file path
  bundled://tiny-tasks/eval.jsonl    -> file path
Anything else is returned unchanged. Artifacts live under $SFT_CACHE_DIR (default
~/.cache/sft-launcher) in versioned folders; bump a version when its generator changes.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PREFIX = "bundled://"
TASKS_DIR = "tiny-tasks-v1"
MODEL_DIR = "tiny-llama-v1"
_FILES = {"tiny-tasks/train.jsonl": "train.jsonl", "tiny-tasks/eval.jsonl": "eval.jsonl"}

__all__ = ["PREFIX", "cache_root", "is_bundled", "resolve"]


def cache_root() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR") or Path.home() / ".cache" / "sft-launcher")


def is_bundled(s: object) -> bool:
    return isinstance(s, str) and s.startswith(PREFIX)


def resolve(uri: str) -> str:
    """Return the local path for a bundled:// URI (building it if needed); other strings unchanged."""
    if not is_bundled(uri):
        return uri
    name = uri[len(PREFIX):].rstrip("/")
    if name == "tiny-llama":
        return str(_ensure(MODEL_DIR, _build_model))
    if name in _FILES:
        return str(_ensure(TASKS_DIR, _build_tasks) / _FILES[name])
    raise ValueError(f"unknown bundled URI {uri!r}; known: {PREFIX}tiny-llama, "
                     + ", ".join(PREFIX + k for k in _FILES))


def _ensure(name: str, build: Callable[[Path], None]) -> Path:
    """Build cache_root()/name exactly once across processes; it only ever appears complete.

    The final dir comes into existence via one atomic rename of a fully built sibling temp dir,
    so "exists" means "complete" and the fast path needs no lock.
    """
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():  # another process built it while we waited
                return final
            # Leftovers of a builder that crashed; safe to drop since we hold the lock.
            for stale in glob.glob(str(root / f".{name}.tmp-*")):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
            try:
                os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
                build(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                os.rename(tmp, final)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.is_dir():  # else: lost a race where flock is not honoured (some NFS)
                    raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _build_tasks(out: Path) -> None:
    from launcher.bundled.tasks import write_dataset

    write_dataset(out)


def _build_model(out: Path) -> None:
    # Lazy imports: resolving data paths must not pay for torch/transformers.
    from launcher.bundled.model import save_model_dir
    from launcher.bundled.tokenizer import build_tokenizer, training_texts

    # Train the tokenizer on the cached train split so model and data always agree.
    train = _ensure(TASKS_DIR, _build_tasks) / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    save_model_dir(out, build_tokenizer(training_texts(rows)))
