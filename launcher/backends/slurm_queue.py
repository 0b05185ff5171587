"""Slurm's answers about jobs: sacct and squeue queries and their parsing, and scancel.

A job's latest sacct record (per job or array task) wins, and the earlier records of a requeued
job count its requeues; FAILED with exit code 75 is STOPPED (the trainer checkpointed on a signal
and the run resumes when started again). Ids sacct has no record of yet (just submitted, pending
array tasks) are asked of squeue, which also says why a pending job waits.
"""

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from launcher.exit_codes import EXIT_STOPPED

SLURM_TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT", "STOPPED",
}


class SlurmError(Exception):
    """A Slurm command that failed; `code` is the exit code of an `sft-jobs` command it ends (1)."""

    code = 1

    def __init__(self, cmd: List[str], stderr: str, unavailable: bool = False):
        super().__init__(f"`{' '.join(cmd)}` failed: {stderr.strip()}")
        self.unavailable = unavailable  # not installed here, or no accounting: not a failure of the cluster


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


def cancel(job_ids: List[str]) -> None:
    """One scancel for the jobs (raises SlurmError if it fails)."""
    slurm(["scancel", *job_ids])


@contextlib.contextmanager
def without_job_env(also=()):
    """For an sbatch from inside a job: the new job must not inherit this job's allocation
    (srun reads SLURM_MEM_PER_NODE, SLURM_CPUS_PER_TASK, ... as input); SLURM_CONF stays.
    `also`: more variables of this process the new job must not see."""
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if (k.startswith("SLURM_") and k != "SLURM_CONF") or k.startswith("SBATCH_") or k in also}
    try:
        yield
    finally:
        os.environ.update(saved)
