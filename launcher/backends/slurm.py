"""The Slurm backend: submit through submitit and return at once.

Each run's tasks run launcher.backends.slurm_rank.SlurmTask; the login-node partition checks are in
launcher.backends.slurm_partitions.
"""

import sys
import time
from pathlib import Path
from typing import List, Optional

from launcher import rundir, snapshot
from launcher.backends.slurm_elastic import lower_bound, submit_with_bound
from launcher.backends.slurm_partitions import check_eval_partition, check_partition, read_partitions
from launcher.backends.slurm_rank import SlurmTask
from launcher.backends.slurm_submit import executor_parameters, make_executor, record_jobs
from launcher.errors import ConfigError


def preflight(cfg) -> None:
    """The training's partition, and the eval jobs' (eval.harness), can hold their jobs: every problem of both."""
    partitions, problems = read_partitions(), []
    for check in (lambda: check_partition(cfg.cluster, partitions), lambda: check_eval_partition(cfg, partitions)):
        try:
            check()
        except ConfigError as error:
            problems += error.problems
    if problems:  # the eval jobs' partition defaults to the training's: a bad name is said once
        raise ConfigError(list(dict.fromkeys(problems)))


def sbatch_preview(cfg, plan, run_dir: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(cfg, plan, cfg.name)
    params.pop("array_parallelism")
    params["setup"] = [*snapshot.setup_lines(run_dir / rundir.CODE), *params["setup"]]
    command = f"{sys.executable} -u -m submitit.core._submit {run_dir}/submitit"
    return _make_sbatch_string(command=command, folder=str(run_dir / "submitit"), **params)


def submit_runs(cfg, plan, run_dirs: List[Path], folder: Path, job_name: str, code: Optional[Path] = None) -> List[str]:
    """One sbatch call for all run dirs: a job array when there are several. Returns job ids.
    `code`: a snapshot already taken (a search's controller runs from it and submits with it)."""
    params = executor_parameters(cfg, plan, job_name)
    # Every task and requeue runs the code submitted now, whatever is checked out when it starts.
    code = code or snapshot.snapshot_code(folder.parent)
    params["setup"] = [*snapshot.setup_lines(code), *params["setup"]]
    tasks = [SlurmTask(str(d), cfg.cluster.max_requeues) for d in run_dirs]
    submit = lambda p: submit_tasks(make_executor(folder, p), tasks)  # noqa: E731
    low = None
    if cfg.cluster.min_nodes is None:
        jobs = submit(params)
    else:  # elastic: start on every node free now, not on the fewest
        low = lower_bound(cfg.cluster, sharing=min(len(run_dirs), params["array_parallelism"]))
        print(f"elastic range: each job asks for {low}-{cfg.cluster.nodes} nodes ({low}: what is idle and unclaimed now, "
              f"at least cluster.min_nodes={cfg.cluster.min_nodes}; Slurm starts a range on its fewest)", flush=True)
        jobs, low = submit_with_bound(submit, params, low, cfg.cluster, lambda text: print(text, flush=True))
    bound = {} if low is None else {"min_nodes": low}
    for job, run_dir in zip(jobs, run_dirs):
        record_jobs(run_dir, [{"job_id": job.job_id, "submitit_folder": str(folder), **bound,
                               "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])
    return [job.job_id for job in jobs]


def submit_tasks(executor, tasks: List[SlurmTask]) -> list:
    """One job, or one array for several."""
    if len(tasks) == 1:
        return [executor.submit(tasks[0])]
    with executor.batch():
        return [executor.submit(t) for t in tasks]


def submit(cfg, run_dir: Path, plan) -> int:
    job_ids = submit_runs(cfg, plan, [run_dir], run_dir / "submitit", cfg.name)
    print(f"submitted job {job_ids[0]}\nrun directory: {run_dir}\nfollow it: sft-jobs logs {run_dir} -f", flush=True)
    if offline_wandb(cfg):
        print(f"upload W&B from this node as it runs: sft-jobs sync {run_dir} --follow", flush=True)
    return 0


def offline_wandb(cfg) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode == "offline"
