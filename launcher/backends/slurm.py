"""The Slurm backend: submit through submitit and return at once.

Each run's tasks run launcher.backends.slurm_rank.SlurmTask; the login-node partition checks are in
launcher.backends.slurm_partitions.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher import snapshot
from launcher import rundir
from launcher.atomic import write_text_atomic
from launcher.backends.slurm_partitions import check_partition, read_partitions
from launcher.backends.slurm_rank import SlurmTask


def preflight(cfg) -> None:
    check_partition(cfg.cluster, read_partitions())


def executor_parameters(cfg, plan, job_name: str) -> Dict[str, Any]:
    c = cfg.cluster
    extra: Dict[str, Any] = dict(c.sbatch_extra)
    if c.container_image:
        extra["container_image"] = c.container_image
    if c.container_mounts:
        extra["container_mounts"] = c.container_mounts
    params: Dict[str, Any] = dict(
        job_name=job_name, nodes=c.nodes, ntasks_per_node=plan.procs_per_node, cpus_per_task=c.cpus_per_task,
        time=c.time_min, signal_delay_s=c.signal_delay_s, setup=list(c.setup),
        # One rank failing ends the step: its peers would otherwise wait in a collective until timeout.
        srun_args=["--kill-on-bad-exit=1", *c.srun_args],
        array_parallelism=c.array_parallelism, additional_parameters={**extra, "requeue": True},
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


def sbatch_preview(cfg, plan, run_dir: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(cfg, plan, cfg.name)
    params.pop("array_parallelism")
    params["setup"] = [*snapshot.setup_lines(run_dir / rundir.CODE), *params["setup"]]
    command = f"{sys.executable} -u -m submitit.core._submit {run_dir}/submitit"
    return _make_sbatch_string(command=command, folder=str(run_dir / "submitit"), **params)


def record_jobs(run_dir: Path, jobs: List[Dict[str, Any]]) -> None:
    """Append: a run submitted again (sft run_dir=...) keeps its earlier jobs in its history."""
    path = run_dir / rundir.SUBMISSION
    record = json.loads(path.read_text())
    record["jobs"] = [*record.get("jobs", []), *jobs]
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def submit_runs(cfg, plan, run_dirs: List[Path], folder: Path, job_name: str, code: Optional[Path] = None) -> List[str]:
    """One sbatch call for all run dirs: a job array when there are several. Returns job ids.
    `code`: a snapshot already taken (a search's controller runs from it and submits with it)."""
    params = executor_parameters(cfg, plan, job_name)
    # Every task and requeue runs the code submitted now, whatever is checked out when it starts.
    code = code or snapshot.snapshot_code(folder.parent)
    params["setup"] = [*snapshot.setup_lines(code), *params["setup"]]
    executor = make_executor(folder, params)
    tasks = [SlurmTask(str(d), cfg.cluster.max_requeues) for d in run_dirs]
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(t) for t in tasks]
    for job, run_dir in zip(jobs, run_dirs):
        record_jobs(run_dir, [{"job_id": job.job_id, "submitit_folder": str(folder), "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])
    return [job.job_id for job in jobs]


def submit(cfg, run_dir: Path, plan) -> int:
    job_ids = submit_runs(cfg, plan, [run_dir], run_dir / "submitit", cfg.name)
    print(f"submitted job {job_ids[0]}\nrun directory: {run_dir}\nfollow it: sft-jobs logs {run_dir} -f", flush=True)
    if offline_wandb(cfg):
        print(f"upload W&B from this node as it runs: sft-jobs sync {run_dir} --follow", flush=True)
    return 0


def offline_wandb(cfg) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode == "offline"
