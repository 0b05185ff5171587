"""The sbatch parameters of a run's jobs and their record in its submission.json: what `sft` submits
(launcher.backends.slurm) and what an elastic run's rank 0 submits again (launcher.backends.slurm_rank)."""

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from launcher import rundir
from launcher.atomic import write_text_atomic


def executor_parameters(cfg, plan, job_name: str) -> Dict[str, Any]:
    c = cfg.cluster
    extra: Dict[str, Any] = dict(c.sbatch_extra)
    if c.container_image:
        extra["container_image"] = c.container_image
    if c.container_mounts:
        extra["container_mounts"] = c.container_mounts
    # Requeued in place, a job keeps its first start's node count: an elastic run's next start is a new
    # job its rank 0 submits (launcher.backends.slurm_rank), never a requeue, which would be a second.
    requeue = {"requeue": True}
    if c.min_nodes is not None:  # elastic: Slurm starts it on MIN..MAX nodes
        extra["nodes"] = f"{c.min_nodes}-{c.nodes}"
        requeue = {"no_requeue": True}
    params: Dict[str, Any] = dict(
        job_name=job_name, nodes=c.nodes, ntasks_per_node=plan.procs_per_node, cpus_per_task=c.cpus_per_task,
        time=c.time_min, signal_delay_s=c.signal_delay_s, setup=list(c.setup),
        # One rank failing ends the step: its peers would otherwise wait in a collective until timeout.
        srun_args=["--kill-on-bad-exit=1", *c.srun_args],
        array_parallelism=c.array_parallelism, additional_parameters={**extra, **requeue},
    )
    for key in ("partition", "account", "qos", "mem", "constraint", "exclude"):
        if c[key] is not None:
            params[key] = c[key]
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    return params


def make_executor(folder: Path, params: Dict[str, Any], max_num_timeout: int = 3):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), python=sys.executable, max_num_timeout=max_num_timeout)
    executor.update_parameters(**params)
    return executor


def record_jobs(run_dir: Path, jobs: List[Dict[str, Any]]) -> None:
    """Append: a run submitted again (sft run_dir=...) keeps its earlier jobs in its history."""
    path = run_dir / rundir.SUBMISSION
    record = json.loads(path.read_text())
    record["jobs"] = [*record.get("jobs", []), *jobs]
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
