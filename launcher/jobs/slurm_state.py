"""Job states: sacct/squeue queries and parsing, and each run's tasks with their state.

How a run's state is read (the `from` column of `status` says which rule answered):
- Slurm runs: `sacct` (one call for all job ids; its latest record per job or array task wins, and
  the earlier records of a requeued job count its requeues; FAILED with exit code 75 is STOPPED:
  the trainer checkpointed on a signal and the run resumes when started again). Ids sacct has no record of yet (just
  submitted, pending array tasks) are asked of `squeue`. When sacct is unavailable or silent, a
  `cancelled.json` written by `sft-jobs cancel` wins; with no Slurm answer at all the run's files
  decide as for a finished local run (export/ -> COMPLETED, an error in the logs -> FAILED ...).
- Local runs: a live `launcher.task RUN_DIR` process on this host -> RUNNING; export/ -> COMPLETED;
  cancelled.json -> CANCELLED; a rank log whose last attempt ends in "rank N failed" -> FAILED or in
  "stop signal received" -> STOPPED (resumable); every step trained, the final eval recorded and no
  export asked -> COMPLETED; a run from another
  host whose files changed in the last 5 minutes -> RUNNING; otherwise STOPPED (ended without a
  trace, e.g. killed).
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.jobs.errors import SlurmError
from launcher.signals import EXIT_STOPPED
from launcher.jobs.rundirs import Progress, local_state, log_requeues, read_json, state_from_files

LOCAL = "local"  # the job id column of a local run
SLURM_TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT", "STOPPED",
}


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
    """`sacct -P --duplicates -o JobID,State,ExitCode` rows (oldest first) -> latest state and requeue
    count per id. A job that ended with the trainer's stop code (75) checkpointed and stopped: STOPPED."""
    own: Dict[str, List[str]] = {}
    pending_arrays: Dict[str, List[str]] = {}
    for line in text.splitlines():
        job, _, rest = line.partition("|")
        state, _, exit_code = rest.partition("|")
        state = (state.split() or ["UNKNOWN"])[0]
        if state == "FAILED" and exit_code.split(":")[0] == str(EXIT_STOPPED):
            state = "STOPPED"
        tasks = expand_job_id(job.strip())
        for task in tasks:
            (own if tasks == [job.strip()] else pending_arrays).setdefault(task, []).append(state)
    history = {**pending_arrays, **own}  # a task's own records supersede its array's pending one
    return {job: JobInfo(states[-1], len(states) - 1, "sacct") for job, states in history.items()}


def parse_squeue(text: str) -> Dict[str, JobInfo]:
    """`squeue -o %i|%T|%r` rows; a pending job's state carries Slurm's reason: PENDING (ReqNodeNotAvail, ...)."""
    infos = {}
    for line in text.splitlines():
        job, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        state, reason = state.strip(), reason.strip()
        if state == "PENDING" and reason and reason != "None":
            state = f"PENDING ({reason})"
        infos[job.strip()] = JobInfo(state, None, "squeue")
    return infos


def query_jobs(ids: List[str]) -> Tuple[Dict[str, JobInfo], List[SlurmError]]:
    """State per job id: sacct for all in one call (by array), squeue for those it has no record of yet."""
    infos: Dict[str, JobInfo] = {}
    errors: List[SlurmError] = []
    bases = sorted({i.split("_")[0] for i in ids})
    try:
        infos = parse_sacct(slurm(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State,ExitCode", "-j", ",".join(bases)]))
    except SlurmError as error:
        errors.append(error)
    # squeue for ids sacct has no record of yet, and for the reason a pending job waits.
    missing = [i for i in ids if i not in infos or infos[i].state == "PENDING"]
    if missing:
        try:
            queued = parse_squeue(slurm(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(missing)]))
            for job, info in queued.items():
                known = infos.get(job)
                infos[job] = JobInfo(info.state, known.restarts, known.source) if known else info
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


def live_tasks(run_dir: Path) -> List[Task]:
    """The jobs (or local ranks) still queued or running on a run dir; none when Slurm cannot say."""
    if not (run_dir / "submission.json").is_file():
        return []
    tasks, _ = describe([run_dir])
    return [t for t in tasks if not is_terminal(t) and t.state != "NOT SUBMITTED" and t.source != "files"]
