"""Expanding `data.train_files`/`data.eval_files` (a path, a glob, a list, bundled://) to files."""

import glob
import os
from pathlib import Path
from typing import Any, List

from launcher import bundled


def file_specs(spec: Any) -> List[str]:
    """The config value as a list of strings: a single path or glob, or a list of them."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return [str(s) for s in spec]


def expand_files(spec: Any) -> List[str]:
    """Absolute paths of every file the spec names, in a stable order; missing ones raise."""
    files: List[str] = []
    for item in file_specs(spec):
        item = bundled.resolve(os.path.expanduser(item))
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(item)
        files.extend(str(Path(m).resolve()) for m in matches)
    return files


def count_rows(path: str) -> int | None:
    """Rows in a JSONL file (one per non-empty line); None for formats we cannot count cheaply."""
    if not path.endswith((".jsonl", ".jsonl.gz")) or path.endswith(".gz"):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
