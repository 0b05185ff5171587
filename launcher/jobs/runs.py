"""Finding runs and sweeps under the runs root, and resolving the RUN argument of `sft-jobs`."""

import os
import re
import time
from pathlib import Path
from typing import List

from launcher.jobs.errors import JobsError
from launcher.rundir import SUBMISSION, is_run
from launcher.trial.study import SPEC_FILE

SWEEP_FILES = ("multirun.yaml", SPEC_FILE)  # a grid (Hydra's) or a search (launcher.sweep)


def is_sweep(path: Path) -> bool:
    return any((path / name).is_file() for name in SWEEP_FILES)


def sweep_points(sweep: Path) -> List[Path]:
    points = [p for p in sweep.iterdir() if p.is_dir() and is_run(p)]
    return sorted(points, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def run_dirs(target: Path) -> List[Path]:
    """The run directories of a target: its points for a sweep, itself for a run."""
    return sweep_points(target) if is_sweep(target) else [target]


def discover(root: Path, max_depth: int = 6) -> List[Path]:
    """Runs and sweeps under root; never descends into one (checkpoints can hold many files)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if SUBMISSION in filenames or any(name in filenames for name in SWEEP_FILES):
            found.append(Path(dirpath))
            dirnames[:] = []
        elif len(Path(dirpath).relative_to(root).parts) >= max_depth:
            dirnames[:] = []
    return found


def started_key(path: Path) -> str:
    """Sorts runs by start: the <timestamp> directory name, else the directory's mtime."""
    if re.match(r"\d{8}-\d{6}", path.name):
        return path.name
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))


def resolve_run(spec: str, root: Path) -> Path:
    """RUN as a run or sweep directory, or a unique prefix of one's path under the runs root."""
    path = Path(spec).expanduser()
    if path.is_dir() and (is_run(path) or is_sweep(path)):
        return path.resolve()
    entries = {str(e.relative_to(root)): e for e in discover(root)} if root.is_dir() else {}
    for sweep in [e for e in entries.values() if is_sweep(e)]:
        entries.update({str(p.relative_to(root)): p for p in sweep_points(sweep)})
    prefix, absolute = spec, path.resolve()
    if absolute != root and absolute.is_relative_to(root):  # e.g. runs/tiny_sft/2026: match past the root
        prefix = str(absolute.relative_to(root)) + ("/" if spec.endswith("/") else "")
    if prefix in entries:
        return entries[prefix]
    matches = {r: e for r, e in entries.items() if r.startswith(prefix)}
    # A sweep and its points all match the sweep's prefix: the sweep is meant.
    matches = {r: e for r, e in matches.items() if e.parent not in matches.values()}
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        not_run = f" is a directory without {SUBMISSION}, {', '.join(SWEEP_FILES)}, and" if path.is_dir() else ""
        raise JobsError(f"RUN {spec!r}{not_run} matches no run under {root} ({len(entries)} there; see `sft-jobs list`)")
    shown = "\n  ".join(sorted(matches)[:20]) + ("\n  ..." if len(matches) > 20 else "")
    raise JobsError(f"RUN {spec!r} is ambiguous: it matches {len(matches)} runs under {root}:\n  {shown}\nuse a longer prefix")


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
