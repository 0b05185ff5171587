"""Offline bundled defaults: resolve `bundled://` URIs to tiny models and their task data, built on first use.

URIs:
  bundled://tiny-llama               -> model dir (config, safetensors, tokenizer, generation_config)
  bundled://tiny-moe                 -> the same for a tiny Qwen3-MoE (8 experts, 2 per token)
  bundled://tiny-tasks/train.jsonl   -> file path
  bundled://tiny-tasks/eval.jsonl    -> file path
Anything else is returned unchanged. Artifacts live under $SFT_CACHE_DIR (default
~/.cache/sft-launcher) in folders named by VERSION and a digest of this package's source and of
the libraries that shape the artifacts (see launcher.caches): changed code builds new folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from launcher.atomic import build_once
from launcher.caches import cache_root, code_digest

# Bump when the artifacts' bytes change; tests/unit/test_cache_versions.py fails until you do.
VERSION = 2
PREFIX = "bundled://"
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")  # they shape the model dir's bytes
_CODE = code_digest(str(Path(__file__).parent), LIBRARIES)
_TASKS_CODE = code_digest(str(Path(__file__).parent))  # the tasks are plain Python
TASKS_DIR = f"tiny-tasks-v{VERSION}-{_TASKS_CODE}"
MODEL_DIR = f"tiny-llama-v{VERSION}-{_CODE}"
MOE_DIR = f"tiny-moe-v{VERSION}-{_CODE}"
_FILES = {"tiny-tasks/train.jsonl": "train.jsonl", "tiny-tasks/eval.jsonl": "eval.jsonl"}

__all__ = ["PREFIX", "VERSION", "is_bundled", "resolve"]


def is_bundled(s: object) -> bool:
    return isinstance(s, str) and s.startswith(PREFIX)


def resolve(uri: str) -> str:
    """Return the local path for a bundled:// URI (building it if needed); other strings unchanged."""
    if not is_bundled(uri):
        return uri
    name = uri[len(PREFIX):].rstrip("/")
    if name == "tiny-llama":
        return str(_ensure(MODEL_DIR, _build_model))
    if name == "tiny-moe":
        return str(_ensure(MOE_DIR, lambda out: _build_model(out, "moe")))
    if name in _FILES:
        return str(_ensure(TASKS_DIR, _build_tasks) / _FILES[name])
    raise ValueError(f"unknown bundled URI {uri!r}; known: {PREFIX}tiny-llama, {PREFIX}tiny-moe, "
                     + ", ".join(PREFIX + k for k in _FILES))


def _ensure(name: str, build: Callable[[Path], None]) -> Path:
    final = cache_root() / name
    build_once(final, build)
    return final


def _build_tasks(out: Path) -> None:
    from launcher.bundled.tasks import write_dataset

    write_dataset(out)


def _build_model(out: Path, kind: str = "llama") -> None:
    # Lazy imports: resolving data paths must not pay for torch/transformers.
    from launcher.bundled.model import save_model_dir
    from launcher.bundled.tokenizer import build_tokenizer, training_texts

    # Train the tokenizer on the cached train split so model and data always agree.
    train = _ensure(TASKS_DIR, _build_tasks) / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    save_model_dir(out, build_tokenizer(training_texts(rows)), kind=kind)
