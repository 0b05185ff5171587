"""`sft-jobs`: list, inspect, follow, cancel and plot runs from their run directories (and Slurm).

How a run's state is read (the `from` column of `status` says which rule answered):
- Slurm runs: `sacct` (one call for all job ids; its latest record per job or array task wins, and
  the earlier records of a requeued job count its requeues). Ids sacct has no record of yet (just
  submitted, pending array tasks) are asked of `squeue`. When sacct is unavailable or silent, a
  `cancelled.json` written by `sft-jobs cancel` wins; with no Slurm answer at all the run's files
  decide as for a finished local run (export/ -> COMPLETED, an error in the logs -> FAILED ...).
- Local runs: a live `launcher.task RUN_DIR` process on this host -> RUNNING; export/ -> COMPLETED;
  cancelled.json -> CANCELLED; a rank log whose last attempt ends in "rank N failed" -> FAILED or in
  "stop signal received" -> STOPPED (resumable); every step trained -> COMPLETED; a run from another
  host whose files changed in the last 5 minutes -> RUNNING; otherwise STOPPED (ended without a
  trace, e.g. killed).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.metrics import read_metrics
from launcher.atomic import write_text_atomic

POLL_S = 3.0  # how often `logs -f` asks whether the job has ended
RECENT_S = 300  # a local run seen from another host counts as running if its files changed this recently
TAIL_BYTES = 1 << 20  # how much of each rank log is scanned for the last attempt's outcome
LOCAL = "local"  # the job id column of a local run
SLURM_TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT",
}
FAILED_LINE = re.compile(r"rank \d+ failed")  # launcher.task logs it with the traceback
STOPPED_LINE = "stop signal received"  # the trainer saved a checkpoint and exited to be resumed
ATTEMPT_LINE = re.compile(r"steps: \d+ per epoch, (\d+) in total")  # every (re)start logs it
REQUEUE_LINE = re.compile(r"requeued job \S+ \(restart (\d+)|SLURM_RESTART_COUNT\W+(\d+)")


class JobsError(Exception):
    """Ends the command with its message and exit code (2: bad RUN or usage, 1: a Slurm command failed)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class SlurmError(JobsError):
    def __init__(self, cmd: List[str], stderr: str, unavailable: bool = False):
        super().__init__(f"`{' '.join(cmd)}` failed: {stderr.strip()}", 1)
        self.unavailable = unavailable  # not installed here, or no accounting: not a failure of the cluster


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


def is_sweep(path: Path) -> bool:
    return (path / "multirun.yaml").is_file()


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
        if "submission.json" in filenames or "multirun.yaml" in filenames:
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
        not_run = " is a directory without submission.json or multirun.yaml, and" if path.is_dir() else ""
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

    @classmethod
    def of(cls, run_dir: Path) -> "Progress":
        train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
        last = train[-1] if train else {}
        return cls(last.get("step"), total_steps(run_dir), last.get("loss"), last_checkpoint(run_dir))

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
    if progress.finished:
        return "COMPLETED", "metrics"
    return "UNKNOWN", "files"


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


# ------------------------------------------------------------------ Slurm
@dataclass
class JobInfo:
    state: str
    restarts: Optional[int]  # None: Slurm did not say
    source: str


def slurm(cmd: List[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(cmd, f"{cmd[0]} is not on PATH", unavailable=True)
    except subprocess.TimeoutExpired:
        raise SlurmError(cmd, "no answer in 60 s")
    if proc.returncode != 0:
        raise SlurmError(cmd, proc.stderr or proc.stdout, unavailable="accounting storage is disabled" in proc.stderr)
    return proc.stdout


def expand_job_id(job: str) -> List[str]:
    """sacct's pending array record '123_[0-3,7%2]' -> 123_0 .. 123_3, 123_7; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job)
    if not m:
        return [job]
    tasks = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        tasks += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return tasks


def parse_sacct(text: str) -> Dict[str, JobInfo]:
    """`sacct -P --duplicates -o JobID,State` rows (oldest first) -> latest state and requeue count per id."""
    own: Dict[str, List[str]] = {}
    pending_arrays: Dict[str, List[str]] = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        state = (state.split() or ["UNKNOWN"])[0]
        tasks = expand_job_id(job.strip())
        for task in tasks:
            (own if tasks == [job.strip()] else pending_arrays).setdefault(task, []).append(state)
    history = {**pending_arrays, **own}  # a task's own records supersede its array's pending one
    return {job: JobInfo(states[-1], len(states) - 1, "sacct") for job, states in history.items()}


def parse_squeue(text: str) -> Dict[str, JobInfo]:
    rows = (line.split("|", 1) for line in text.splitlines() if "|" in line)
    return {job.strip(): JobInfo(state.strip(), None, "squeue") for job, state in rows}


def query_jobs(ids: List[str]) -> Tuple[Dict[str, JobInfo], List[SlurmError]]:
    """State per job id: sacct for all in one call (by array), squeue for those it has no record of yet."""
    infos: Dict[str, JobInfo] = {}
    errors: List[SlurmError] = []
    bases = sorted({i.split("_")[0] for i in ids})
    try:
        infos = parse_sacct(slurm(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State", "-j", ",".join(bases)]))
    except SlurmError as error:
        errors.append(error)
    missing = [i for i in ids if i not in infos]
    if missing:
        try:
            infos.update(parse_squeue(slurm(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(missing)])))
        except SlurmError as error:
            if "Invalid job id" not in str(error):  # squeue's answer for jobs no longer queued
                errors.append(error)
    return infos, errors


# ------------------------------------------------------------------ tasks: a job of a run, with its state
@dataclass
class Task:
    run_dir: Path
    backend: str
    job_id: str
    state: str
    source: str
    requeues: Optional[int]
    progress: Progress


def backend(run_dir: Path) -> str:
    return read_json(run_dir / "submission.json").get("backend", "?")


def job_ids(run_dir: Path) -> List[str]:
    jobs = read_json(run_dir / "submission.json").get("jobs") or []
    return [str(j["job_id"]) for j in jobs if isinstance(j, dict) and j.get("job_id")]


def slurm_task(run_dir: Path, job_id: str, info: Optional[JobInfo], progress: Progress) -> Task:
    requeues = info.restarts if info and info.restarts is not None else log_requeues(run_dir)
    if info and info.source == "sacct":
        return Task(run_dir, "slurm", job_id, info.state, "sacct", requeues, progress)
    recorded = read_json(run_dir / "cancelled.json").get("state")
    if recorded:
        return Task(run_dir, "slurm", job_id, recorded, "cancelled.json", requeues, progress)
    if info:
        return Task(run_dir, "slurm", job_id, info.state, info.source, requeues, progress)
    return Task(run_dir, "slurm", job_id, *state_from_files(run_dir, progress), requeues, progress)


def describe(dirs: List[Path]) -> Tuple[List[Task], List[SlurmError]]:
    """One task per job id of each run dir (one per local run); Slurm is asked once for all."""
    ids = [j for d in dirs if backend(d) == "slurm" for j in job_ids(d)]
    infos, errors = query_jobs(ids) if ids else ({}, [])
    tasks = []
    for d in dirs:
        progress = Progress.of(d)
        if backend(d) != "slurm":
            tasks.append(Task(d, backend(d), LOCAL, *local_state(d, progress), None, progress))
        elif not job_ids(d):
            tasks.append(Task(d, "slurm", "-", "NOT SUBMITTED", "submission.json", None, progress))
        else:
            tasks += [slurm_task(d, job, infos.get(job), progress) for job in job_ids(d)]
    return tasks, errors


def is_terminal(task: Task) -> bool:
    return task.state in SLURM_TERMINAL if task.job_id != LOCAL else task.state != "RUNNING"


def show_errors(errors: Iterable[SlurmError]) -> int:
    """Slurm failures go to stderr; exit 1 when one was a real failure (not a missing command)."""
    code = 0
    for error in errors:
        print(f"sft-jobs: {'note' if error.unavailable else 'error'}: {error}", file=sys.stderr)
        code = code or (0 if error.unavailable else 1)
    return code


# ------------------------------------------------------------------ output
def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def step_cell(p: Progress) -> str:
    return f"{fmt(p.step)} / {fmt(p.total) if p.total else '?'}"


def read_overrides(run_dir: Path) -> List[str]:
    try:
        data = yaml.safe_load((run_dir / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def point_labels(dirs: List[Path]) -> Dict[Path, str]:
    """Each sweep point's overrides that differ between points (the shared ones say nothing)."""
    overrides = {d: read_overrides(d) for d in dirs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(dirs) > 1 else set()
    return {d: " ".join(o for o in overrides[d] if o not in shared) or f"point {d.name}" for d in dirs}


def new_table(title: str, columns: Iterable[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def add_row(table: Table, *cells) -> None:
    table.add_row(*(escape(str(c)) for c in cells))  # job ids like 12_[0-3] are not markup


def summarize_states(tasks: List[Task]) -> str:
    return ", ".join(f"{n} {state}" for state, n in Counter(t.state for t in tasks).most_common())


# ------------------------------------------------------------------ commands
def task_row(task: Task, name: str) -> List[str]:
    p = task.progress
    return [name, task.backend, task.job_id, task.state, step_cell(p), fmt(p.loss), fmt(p.checkpoint)]


def list_rows(entry: Path, by_dir: Dict[Path, List[Task]], root: Path) -> List[List[str]]:
    """A run's rows, or a sweep's summary row followed by its points' rows."""
    if not is_sweep(entry):
        return [task_row(t, rel(entry, root)) for t in by_dir.get(entry, [])]
    tasks = [t for d in sweep_points(entry) for t in by_dir.get(d, [])]
    arrays = " ".join(sorted({t.job_id.split("_")[0] for t in tasks})) or "-"
    head = [f"{rel(entry, root)}/ (sweep, {len(tasks)} points)", tasks[0].backend if tasks else "-", arrays,
            summarize_states(tasks) or "-", "", "", ""]
    return [head] + [task_row(t, "  " + rel(t.run_dir, root)) for t in tasks]


def cmd_list(args, out: Console) -> int:
    root = args.root
    entries = sorted(discover(root), key=started_key, reverse=True)[: args.limit] if root.is_dir() else []
    if not entries:
        out.print(f"no runs under {root}", markup=False)
        return 0
    tasks, errors = describe([d for e in entries for d in run_dirs(e)])
    by_dir: Dict[Path, List[Task]] = {}
    for task in tasks:
        by_dir.setdefault(task.run_dir, []).append(task)
    table = new_table(f"runs under {root} (newest first)", ("run", "backend", "job", "state", "step", "loss", "checkpoint"))
    for entry in entries:
        for row in list_rows(entry, by_dir, root):
            add_row(table, *row)
    out.print(table)
    return show_errors(errors)


def cmd_status(args, out: Console) -> int:
    root = args.root
    target = resolve_run(args.run, root)
    dirs = run_dirs(target)
    if not dirs:
        raise JobsError(f"{target}: a sweep with no points yet")
    tasks, errors = describe(dirs)
    submission = read_json(dirs[0] / "submission.json")
    out.print(f"run        {target}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"backend    {submission.get('backend', '?')}   submitted {submission.get('submitted_at', '?')}", markup=False)
    out.print(f"command    {' '.join(submission.get('argv', []))}", highlight=False, markup=False, soft_wrap=True)
    labels = point_labels(dirs) if is_sweep(target) else {}
    columns = (["point"] if labels else []) + ["job", "state", "from", "requeues", "step", "loss", "checkpoint"]
    table = new_table("", columns)
    for task in tasks:
        p = task.progress
        first = [f"{task.run_dir.name}  {labels[task.run_dir]}"] if labels else []
        add_row(table, *first, task.job_id, task.state, task.source, fmt(task.requeues), step_cell(p), fmt(p.loss), fmt(p.checkpoint))
    out.print(table)
    return show_errors(errors)


def single_run(args) -> Path:
    root = args.root
    target = resolve_run(args.run, root)
    if is_sweep(target):
        points = ", ".join(rel(p, root) for p in sweep_points(target)[:5])
        raise JobsError(f"RUN {args.run!r} is a sweep: name one of its points ({points} ...)")
    return target


def task_state(run_dir: Path) -> Task:
    tasks, _ = describe([run_dir])
    return tasks[0]


def submitit_logs(run_dir: Path, rank: int) -> List[Path]:
    """submitit's stdout/stderr of this rank: where a job that died before training left its words."""
    jobs = read_json(run_dir / "submission.json").get("jobs") or []
    paths = [Path(j.get("submitit_folder", run_dir / "submitit")) / f"{j['job_id']}_{rank}_log.{ext}"
             for j in jobs for ext in ("out", "err")]
    return [p for p in paths if p.is_file()]


def cmd_logs(args, out: Console) -> int:
    run_dir = single_run(args)
    world = read_json(run_dir / "plan.json").get("world_size")
    if args.rank < 0 or (world and args.rank >= world):
        raise JobsError(f"--rank {args.rank}: the run has ranks 0..{(world or 1) - 1}")
    log = run_dir / "logs" / f"rank-{args.rank}.log"
    if not args.follow:
        if not log.exists():
            task = task_state(run_dir)
            hint = "".join(f"\n  see {p}" for p in submitit_logs(run_dir, args.rank))
            print(f"{log} does not exist yet (job {task.job_id} {task.state}){hint}", file=sys.stderr)
            return 0
        sys.stdout.write(read_text(log))
        return 0
    try:
        return follow(run_dir, log)
    except KeyboardInterrupt:
        return 0


def follow(run_dir: Path, log: Path) -> int:
    """Print the log as it grows until the job reaches a terminal state."""
    position, next_check, said_waiting = 0, 0.0, False
    while True:
        done = False
        if time.monotonic() >= next_check:
            task = task_state(run_dir)
            done, next_check = is_terminal(task), time.monotonic() + POLL_S
        if log.exists():
            with open(log, "rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        elif not said_waiting:
            print(f"{log} does not exist yet (job {task.job_id} {task.state}): waiting", file=sys.stderr)
            said_waiting = True
        if done:
            print(f"job {task.job_id} {task.state}", file=sys.stderr)
            return 0
        time.sleep(0.5)


def record_cancelled(run_dir: Path, what: List[str]) -> None:
    record = {"state": "CANCELLED", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": what}
    write_text_atomic(run_dir / "cancelled.json", json.dumps(record, indent=2) + "\n")


def cancel_slurm(tasks: List[Task], root: Path, out: Console) -> None:
    """One scancel for every job that has not ended (raises SlurmError, recording nothing, if it fails)."""
    live = [t for t in tasks if t.job_id != "-" and not is_terminal(t)]
    for task in (t for t in tasks if t not in live):
        out.print(f"job {task.job_id} ({rel(task.run_dir, root)}) already {task.state}: not cancelled", markup=False)
    if live:
        slurm(["scancel", *(t.job_id for t in live)])
    for task in live:
        record_cancelled(task.run_dir, [task.job_id])
        out.print(f"cancelled job {task.job_id} ({rel(task.run_dir, root)})", markup=False)


def cancel_local(task: Task, root: Path, out: Console) -> None:
    """SIGTERM to the run's ranks, as a first Ctrl-C would send: they save a checkpoint and exit."""
    pids = rank_pids(task.run_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # ended since we looked
    if not pids:
        out.print(f"local run {rel(task.run_dir, root)} ({task.state}) has no rank process on this machine: "
                  "nothing to cancel", markup=False)
        return
    record_cancelled(task.run_dir, [f"pid {pid}" for pid in pids])
    out.print(f"sent SIGTERM to the {len(pids)} rank processes of {rel(task.run_dir, root)}: they checkpoint and stop", markup=False)


def cmd_cancel(args, out: Console) -> int:
    tasks, errors = describe(run_dirs(resolve_run(args.run, args.root)))
    show_errors(errors)  # states only spare jobs that have ended: the others are cancelled regardless
    cancel_slurm([t for t in tasks if t.job_id != LOCAL], args.root, out)
    for task in (t for t in tasks if t.job_id == LOCAL):
        cancel_local(task, args.root, out)
    return 0


def cmd_report(args, out: Console) -> int:
    from launcher.jobs_report import plot_runs

    root = args.root
    target = resolve_run(args.run, root)
    dirs = run_dirs(target)
    labels = point_labels(dirs) if is_sweep(target) else {target: ""}
    series = [(labels[d], read_metrics(d)) for d in dirs]
    if not any(rows for _, rows in series):
        print(f"sft-jobs: note: no metrics yet in {target}: the panels are empty", file=sys.stderr)
    path = plot_runs(series, Path(args.out) if args.out else target / "report.png", rel(target, root))
    print(path)
    return 0


COMMANDS = {"list": cmd_list, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel, "report": cmd_report}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-jobs",
        description="Inspect and control runs started by `sft`. RUN is a run (or sweep) directory, or a unique "
                    "prefix of its path under --runs-root, e.g. tiny_sft or tiny_sft/20261124-2103.",
    )
    parser.add_argument("--runs-root", default="./runs", help="where runs live (default: ./runs)")
    # Also accepted after the command; SUPPRESS keeps the top-level value when it is not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default=argparse.SUPPRESS, help="where runs live (default: ./runs)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", parents=[common], help="recent runs and sweeps, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many runs and sweeps (default: 20)")
    p = sub.add_parser("status", parents=[common], help="state, requeues, step, loss and checkpoint of each job of RUN")
    p.add_argument("run", metavar="RUN")
    p = sub.add_parser("logs", parents=[common], help="print a rank's log; -f follows it until the job ends")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--rank", type=int, default=0, help="whose log (default: 0)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends (Ctrl-C stops)")
    p = sub.add_parser("cancel", parents=[common],
                       help="scancel the jobs of RUN (local runs: ask the ranks to checkpoint and stop)")
    p.add_argument("run", metavar="RUN")
    p = sub.add_parser("report", parents=[common],
                       help="PNG of loss, lr, eval metrics and tokens/s (a sweep: every point overlaid)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", help="where to write the PNG (default: RUN/report.png)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.root = Path(args.runs_root).expanduser().resolve()
    try:
        # COLUMNS, else the terminal, else 120 for pipes (rich's own default of 80 wraps run names).
        return COMMANDS[args.command](args, Console(highlight=False, width=shutil.get_terminal_size((120, 24)).columns))
    except JobsError as error:
        print(f"sft-jobs: error: {error}", file=sys.stderr)
        return error.code


if __name__ == "__main__":
    sys.exit(main())
