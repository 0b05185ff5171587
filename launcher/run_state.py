"""What a run is doing: its jobs' states from Slurm (launcher.backends.slurm_queue) and its own
files, and its progress. `sft-jobs`, `sft` (one live job per run directory) and the search
controller read runs through here.

How a run's state is read (the `from` column of `sft-jobs status` says which rule answered):
- Slurm runs: `sacct` (its latest record per job or array task; FAILED with exit code 75 is
  STOPPED). Ids sacct has no record of yet are asked of `squeue`. When sacct is unavailable or
  silent, a `cancelled.json` written by `sft-jobs cancel` wins; with no Slurm answer at all the
  run's files decide as for a finished local run.
- Local runs: a live `launcher.rank RUN_DIR` process on this host -> RUNNING; export/ ->
  COMPLETED; cancelled.json -> CANCELLED; the run's events (launcher.rundir): a rank whose last start
  ended in `failed` -> FAILED, in `stopped` -> STOPPED (resumable); every step trained, the final
  eval recorded and no export asked -> COMPLETED; a run from another host whose files changed in
  the last 5 minutes -> RUNNING; otherwise STOPPED (ended without a trace, e.g. killed).
  A run directory from before events (no events file) is read from its logs instead, in one
  compatibility function (legacy_log_outcome).
"""

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.backends.slurm_queue import SLURM_TERMINAL, JobInfo, SlurmError, query_jobs
from launcher.metrics import read_metrics
from launcher.rundir import (CANCELLED, COMPLETED, CONFIG, EVENTS, EXPORT, FAILED, FINAL_EVAL, METRICS, REQUEUED, STARTED,
                             STOPPED, SUBMISSION, last_checkpoint, plan, rank_log, rank_logs, read_events, read_json,
                             read_text, submission)

RECENT_S = 300  # a local run seen from another host counts as running if its files changed this recently


def total_steps(run_dir: Path) -> Optional[int]:
    """plan.json's total, else the trainer's count once it has tokenised the data (its start event)."""
    total = plan(run_dir).get("total_steps")
    if total:
        return total
    events = read_events(run_dir)
    if events is None:
        return legacy_log_total(run_dir)
    totals = [e["total_steps"] for e in events if e["event"] == STARTED and e.get("total_steps")]
    return totals[-1] if totals else None


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


def outcome(run_dir: Path, events: Optional[List[dict]]) -> Tuple[Optional[str], str]:
    """(FAILED or STOPPED when a rank's last start ended that way, else None; what said so).
    events: the run's (read_events); None for a run directory from before events."""
    if events is None:
        return legacy_log_outcome(run_dir), "logs"
    # The newest start's ranks only: after an elastic run shrank, the ranks it no longer has keep
    # the STOPPED of the bigger start before it.
    newest = next((e["attempt"] for e in reversed(events) if e["event"] in (STARTED, FAILED, STOPPED) and e.get("attempt")), None)
    last = {}  # rank -> how its last start ended (None: it has not ended, or ended otherwise)
    for event in events:
        if newest is not None and event.get("attempt") not in (newest, None):
            continue
        if event["event"] == STARTED:
            last[event.get("rank")] = None
        elif event["event"] in (FAILED, STOPPED):
            last[event.get("rank")] = event["event"].upper()
    ended = set(last.values())
    return next((o for o in ("FAILED", "STOPPED") if o in ended), None), "events"


def nodes_per_job(run_dir: Path) -> Dict[str, int]:
    """{job id (LOCAL for local ranks): the nodes of its newest start}, from the ranks' start events."""
    found: Dict[str, int] = {}
    for event in read_events(run_dir) or []:
        attempt = str(event.get("attempt") or "")
        if event["event"] != STARTED or not isinstance(event.get("nodes"), int):
            continue
        job = attempt.split("-")[1] if attempt.startswith("slurm-") else LOCAL
        found[job] = event["nodes"]
    return found


def requeues(run_dir: Path) -> Optional[int]:
    """Requeues of the run's job its events record (rank 0 records each one); None when nothing says."""
    events = read_events(run_dir)
    if events is None:
        return legacy_log_requeues(run_dir)
    found = [e.get("restart") or 0 for e in events if e["event"] in (REQUEUED, STARTED)]
    return max(found) if found else None


# ------------------------------------------------------------------ run directories from before the events file
TAIL_BYTES = 1 << 20  # how much of each rank log is scanned for the last attempt's outcome
FAILED_LINE = re.compile(r"rank \d+ failed")  # launcher.rank logged it with the traceback
STOPPED_LINE = "stop signal received"  # the trainer saved a checkpoint and exited to be resumed
ATTEMPT_LINE = re.compile(r"steps: \d+ per epoch, (\d+) in total")  # every (re)start logged it
REQUEUE_LINE = re.compile(r"requeued job \S+ \(restart (\d+)|SLURM_RESTART_COUNT\W+(\d+)")


def legacy_log_outcome(run_dir: Path) -> Optional[str]:
    """FAILED or STOPPED when a rank log's last attempt ended that way; None when none did (yet)."""
    outcomes = []
    for log in rank_logs(run_dir):
        found = None
        for line in read_text(log, tail=TAIL_BYTES).splitlines():
            if FAILED_LINE.search(line):
                found = "FAILED"
            elif STOPPED_LINE in line:
                found = "STOPPED"
            elif ATTEMPT_LINE.search(line):
                found = None
        outcomes.append(found)
    return next((o for o in ("FAILED", "STOPPED") if o in outcomes), None)


def legacy_log_total(run_dir: Path) -> Optional[int]:
    found = ATTEMPT_LINE.findall(read_text(rank_log(run_dir, 0)))
    return int(found[-1]) if found else None


def legacy_log_requeues(run_dir: Path) -> Optional[int]:
    found = [int(a or b) for a, b in REQUEUE_LINE.findall(read_text(rank_log(run_dir, 0)))]
    return max(found) if found else None


# ------------------------------------------------------------------ local runs
def rank_pids(run_dir: Path) -> List[int]:
    """This machine's rank processes of the run (`python -m launcher.rank RUN_DIR`)."""
    target, pids = run_dir.resolve(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # launcher.task: the rank entry point's name before launcher.rank, in runs started before the rename
        module = next((m for m in (b"launcher.rank", b"launcher.task") if m in args[:-1]), None)
        if module and Path(os.fsdecode(args[args.index(module) + 1])).resolve() == target:
            pids.append(int(proc.name))
    return pids


def last_write(run_dir: Path) -> float:
    paths = [run_dir / METRICS, run_dir / EVENTS, *rank_logs(run_dir)]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def state_from_files(run_dir: Path, progress: Progress) -> Tuple[str, str]:
    """(state, what said so) from the run's files alone."""
    if (run_dir / EXPORT).is_dir():
        return "COMPLETED", f"{EXPORT}/"
    recorded = read_json(run_dir / CANCELLED).get("state")
    if recorded:
        return recorded, CANCELLED
    events = read_events(run_dir)
    if events and events[-1]["event"] == COMPLETED:  # rank 0's last word: trained, evaluated, exported if asked
        return "COMPLETED", "events"
    ended, source = outcome(run_dir, events)
    if ended:
        return ended, source
    # Every step trained is not enough: a run killed in its final eval or export has trained them all.
    if progress.finished and (run_dir / FINAL_EVAL).is_file() and not export_asked(run_dir):
        return "COMPLETED", FINAL_EVAL
    return "UNKNOWN", "files"


def export_asked(run_dir: Path) -> bool:
    """checkpoint.export of the run's config (true unless it says false)."""
    import yaml

    try:
        cfg = yaml.safe_load(read_text(run_dir / CONFIG)) or {}
    except yaml.YAMLError:
        return True
    return (cfg.get("checkpoint") or {}).get("export", True) is not False


def local_state(run_dir: Path, progress: Progress) -> Tuple[str, str]:
    same_host = submission(run_dir).get("host") in (None, socket.gethostname())
    if same_host and rank_pids(run_dir):
        return "RUNNING", "processes"
    state, source = state_from_files(run_dir, progress)
    if state != "UNKNOWN":
        return state, source
    if not same_host and time.time() - last_write(run_dir) < RECENT_S:
        return "RUNNING", "recent writes"
    return "STOPPED", "no process"


LOCAL = "local"  # the job id column of a local run


@dataclass
class RunJob:
    run_dir: Path
    backend: str
    job_id: str
    state: str
    source: str
    requeues: Optional[int]
    progress: Progress


def backend(run_dir: Path) -> str:
    return submission(run_dir).get("backend", "?")


def job_ids(run_dir: Path) -> List[str]:
    jobs = submission(run_dir).get("jobs") or []
    return [str(j["job_id"]) for j in jobs if isinstance(j, dict) and j.get("job_id")]


def slurm_job(run_dir: Path, job_id: str, info: Optional[JobInfo], progress: Progress) -> RunJob:
    requeued = info.restarts if info and info.restarts is not None else requeues(run_dir)
    if info and info.source == "sacct":
        return RunJob(run_dir, "slurm", job_id, info.state, "sacct", requeued, progress)
    recorded = read_json(run_dir / CANCELLED).get("state")
    if recorded:
        return RunJob(run_dir, "slurm", job_id, recorded, CANCELLED, requeued, progress)
    if info:
        return RunJob(run_dir, "slurm", job_id, info.state, info.source, requeued, progress)
    return RunJob(run_dir, "slurm", job_id, *state_from_files(run_dir, progress), requeued, progress)


def describe(dirs: List[Path]) -> Tuple[List[RunJob], List[SlurmError]]:
    """One task per job id of each run dir (one per local run); Slurm is asked once for all."""
    ids = [j for d in dirs if backend(d) == "slurm" for j in job_ids(d)]
    infos, errors = query_jobs(ids) if ids else ({}, [])
    tasks = []
    for d in dirs:
        progress = Progress.of(d)
        if backend(d) != "slurm":
            tasks.append(RunJob(d, backend(d), LOCAL, *local_state(d, progress), None, progress))
        elif not job_ids(d):
            tasks.append(RunJob(d, "slurm", "-", "NOT SUBMITTED", SUBMISSION, None, progress))
        else:
            tasks += [slurm_job(d, job, infos.get(job), progress) for job in job_ids(d)]
    return tasks, errors


def is_terminal(task: RunJob) -> bool:
    return task.state in SLURM_TERMINAL if task.job_id != LOCAL else task.state != "RUNNING"


def live_jobs(run_dir: Path) -> List[RunJob]:
    """The jobs (or local ranks) still queued or running on a run dir; none when Slurm cannot say."""
    if not (run_dir / SUBMISSION).is_file():
        return []
    tasks, _ = describe([run_dir])
    return [t for t in tasks if not is_terminal(t) and t.state != "NOT SUBMITTED" and t.source != "files"]
