"""Run and sweep directories: finding them, resolving RUN, and what a run has done from its files."""

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from launcher.jobs.errors import JobsError
from launcher.metrics import FINAL_EVAL_FILE, read_metrics

RECENT_S = 300  # a local run seen from another host counts as running if its files changed this recently
TAIL_BYTES = 1 << 20  # how much of each rank log is scanned for the last attempt's outcome
FAILED_LINE = re.compile(r"rank \d+ failed")  # launcher.task logs it with the traceback
STOPPED_LINE = "stop signal received"  # the trainer saved a checkpoint and exited to be resumed
ATTEMPT_LINE = re.compile(r"steps: \d+ per epoch, (\d+) in total")  # every (re)start logs it
REQUEUE_LINE = re.compile(r"requeued job \S+ \(restart (\d+)|SLURM_RESTART_COUNT\W+(\d+)")


# ------------------------------------------------------------------ run directories
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_text(path: Path, tail: Optional[int] = None) -> str:
    try:
        with open(path, "rb") as f:
            if tail is not None and f.seek(0, os.SEEK_END) > tail:
                f.seek(-tail, os.SEEK_END)
            else:
                f.seek(0)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


SWEEP_FILES = ("multirun.yaml", "search.json")  # a grid (Hydra's) or a search (launcher.sweep)


def is_sweep(path: Path) -> bool:
    return any((path / name).is_file() for name in SWEEP_FILES)


def is_run(path: Path) -> bool:
    return (path / "submission.json").is_file()


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
        if "submission.json" in filenames or any(name in filenames for name in SWEEP_FILES):
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
        not_run = " is a directory without submission.json, multirun.yaml or search.json, and" if path.is_dir() else ""
        raise JobsError(f"RUN {spec!r}{not_run} matches no run under {root} ({len(entries)} there; see `sft-jobs list`)")
    shown = "\n  ".join(sorted(matches)[:20]) + ("\n  ..." if len(matches) > 20 else "")
    raise JobsError(f"RUN {spec!r} is ambiguous: it matches {len(matches)} runs under {root}:\n  {shown}\nuse a longer prefix")


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ what a run has done
def last_checkpoint(run_dir: Path) -> Optional[int]:
    """Step of the newest checkpoint with its COMPLETE marker (unmarked ones are interrupted saves)."""
    steps = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        if (path / "COMPLETE").is_file() and path.name[5:].isdigit():
            steps.append(read_json(path / "COMPLETE").get("step", int(path.name[5:])))
    return max(steps, default=None)


def total_steps(run_dir: Path) -> Optional[int]:
    """plan.json's total, else the trainer's count once it has tokenised the data."""
    total = read_json(run_dir / "plan.json").get("total_steps")
    if total:
        return total
    found = ATTEMPT_LINE.findall(read_text(run_dir / "logs" / "rank-0.log"))
    return int(found[-1]) if found else None


@dataclass
class Progress:
    step: Optional[int]
    total: Optional[int]
    loss: Optional[float]
    checkpoint: Optional[int]
    last_row: Optional[dict] = None  # the last train row: its health keys say how the ranks fared

    @classmethod
    def of(cls, run_dir: Path) -> "Progress":
        train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
        last = train[-1] if train else {}
        return cls(last.get("step"), total_steps(run_dir), last.get("loss"), last_checkpoint(run_dir), last or None)

    def health(self) -> Optional[str]:
        """Stragglers, memory and data wait at the last logged step, in words."""
        row = self.last_row or {}
        if row.get("step_time_max_s") is None:
            return None
        lo, hi = row["step_time_min_s"], row["step_time_max_s"]
        return (f"step {row['step']}: step time {lo:.3g}-{hi:.3g} s over ranks (slowest: rank {row['slowest_rank']}, "
                f"+{(hi / lo - 1) * 100 if lo else 0:.0f}%), peak memory max {row['peak_mem_gib_max']:.3g} GiB, "
                f"data wait max {row['data_wait_s_max']:.3g} s")

    @property
    def finished(self) -> bool:
        return bool(self.total and self.step is not None and self.step >= self.total)


def log_outcome(run_dir: Path) -> Optional[str]:
    """FAILED or STOPPED when a rank log's last attempt ended that way; None when none did (yet)."""
    outcomes = []
    for log in (run_dir / "logs").glob("rank-*.log"):
        outcome = None
        for line in read_text(log, tail=TAIL_BYTES).splitlines():
            if FAILED_LINE.search(line):
                outcome = "FAILED"
            elif STOPPED_LINE in line:
                outcome = "STOPPED"
            elif ATTEMPT_LINE.search(line):
                outcome = None
        outcomes.append(outcome)
    return next((o for o in ("FAILED", "STOPPED") if o in outcomes), None)


def log_requeues(run_dir: Path) -> Optional[int]:
    """Requeues the job logged (the Slurm backend logs each one); None when nothing says."""
    found = [int(a or b) for a, b in REQUEUE_LINE.findall(read_text(run_dir / "logs" / "rank-0.log"))]
    return max(found) if found else None


def rank_pids(run_dir: Path) -> List[int]:
    """This machine's rank processes of the run (`python -m launcher.task RUN_DIR`)."""
    target, pids = run_dir.resolve(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launcher.task" in args[:-1] and Path(os.fsdecode(args[args.index(b"launcher.task") + 1])).resolve() == target:
            pids.append(int(proc.name))
    return pids


def last_write(run_dir: Path) -> float:
    paths = [run_dir / "metrics.jsonl", *(run_dir / "logs").glob("rank-*.log")]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def state_from_files(run_dir: Path, progress: Progress) -> Tuple[str, str]:
    """(state, what said so) from the run's files alone."""
    if (run_dir / "export").is_dir():
        return "COMPLETED", "export/"
    recorded = read_json(run_dir / "cancelled.json").get("state")
    if recorded:
        return recorded, "cancelled.json"
    outcome = log_outcome(run_dir)
    if outcome:
        return outcome, "logs"
    # Every step trained is not enough: a run killed in its final eval or export has trained them all.
    if progress.finished and (run_dir / FINAL_EVAL_FILE).is_file() and not export_asked(run_dir):
        return "COMPLETED", FINAL_EVAL_FILE
    return "UNKNOWN", "files"


def export_asked(run_dir: Path) -> bool:
    """checkpoint.export of the run's config (true unless it says false)."""
    import yaml

    try:
        cfg = yaml.safe_load(read_text(run_dir / "config.yaml")) or {}
    except yaml.YAMLError:
        return True
    return (cfg.get("checkpoint") or {}).get("export", True) is not False


def local_state(run_dir: Path, progress: Progress) -> Tuple[str, str]:
    same_host = read_json(run_dir / "submission.json").get("host") in (None, socket.gethostname())
    if same_host and rank_pids(run_dir):
        return "RUNNING", "processes"
    state, source = state_from_files(run_dir, progress)
    if state != "UNKNOWN":
        return state, source
    if not same_host and time.time() - last_write(run_dir) < RECENT_S:
        return "RUNNING", "recent writes"
    return "STOPPED", "no process"
