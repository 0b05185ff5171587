"""Expanding `data.train_files`/`data.eval_files` (a path, a glob, a list, bundled://, hub://) to sources.

A list item may be a mapping `{path: ..., weight: 2.0}` or `{path: ..., samples: 5000}` to mix
datasets; `hub://org/name[:split]` names a Hugging Face hub dataset (needs the machine online).
"""

import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional

from launcher import bundled

HUB = "hub://"
SOURCE_KEYS = ("path", "weight", "samples")


@dataclass
class Source:
    """One entry of a files spec: its files, and how many of its examples a run sees."""

    spec: str
    files: List[str]
    weight: Optional[float] = None  # examples x weight (2.0 repeats it twice, 0.5 halves it)
    samples: Optional[int] = None  # exactly this many examples (repeating or subsampling)


def _item_path(item: Any) -> str:
    return str(item.get("path")) if isinstance(item, Mapping) else str(item)


def file_specs(spec: Any) -> List[str]:
    """The config value as a list of strings: a single path or glob, or a list of them."""
    if spec is None:
        return []
    if isinstance(spec, (str, Mapping)):
        spec = [spec]
    return [_item_path(s) for s in spec]


def expand_files(spec: Any) -> List[str]:
    """Absolute paths of every file the spec names, in a stable order; missing ones raise."""
    files: List[str] = []
    for item in file_specs(spec):
        files.extend(_expand_one(item))
    return files


def _expand_one(item: str) -> List[str]:
    if item.startswith(HUB):
        return [item]  # resolved by datasets.load_dataset at tokenisation time
    item = bundled.resolve(os.path.expanduser(item))
    matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
    matches = [m for m in matches if Path(m).is_file()]
    if not matches:
        raise FileNotFoundError(item)
    return [str(Path(m).resolve()) for m in matches]


def sources(spec: Any, key: str = "data.train_files") -> List[Source]:
    """Each entry of the spec with its files and mixing weight; bad mixing entries raise ConfigError."""
    from launcher.errors import ConfigError, problem

    items = [] if spec is None else [spec] if isinstance(spec, (str, Mapping)) else list(spec)
    out = []
    for item in items:
        weight = samples = None
        if isinstance(item, Mapping):
            extra = set(item) - set(SOURCE_KEYS)
            weight, samples = item.get("weight"), item.get("samples")
            if extra or "path" not in item or (weight is not None and samples is not None):
                raise ConfigError([problem(key, dict(item), "a mapping needs `path` and at most one of `weight`, `samples`")])
            if weight is not None and not float(weight) > 0:
                raise ConfigError([problem(key, dict(item), "weight must be > 0")])
            if samples is not None and not int(samples) >= 1:
                raise ConfigError([problem(key, dict(item), "samples must be >= 1")])
        path = _item_path(item)
        out.append(Source(path, _expand_one(path), None if weight is None else float(weight),
                          None if samples is None else int(samples)))
    return out


def count_rows(path: str) -> int | None:
    """Rows in a JSONL file (one per non-empty line); None for formats we cannot count cheaply."""
    if not path.endswith(".jsonl"):
        return None
    stat = os.stat(path)
    return _count_lines(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)  # keyed by mtime and size: a sweep counts each file once
def _count_lines(path: str, mtime_ns: int, size: int) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
