"""The Slurm backend: check the partition, submit through submitit, return at once.

Every task of the job runs `SlurmTask`, which maps Slurm's task environment to RANK/WORLD_SIZE/
MASTER_ADDR and runs the same entry point as the local backend. On SIGUSR2 (time limit or
preemption) the trainer checkpoints on all ranks and rank 0 requeues the job; the restarted job
resumes from the newest complete checkpoint. Requeues are bounded by cluster.max_requeues.
"""

import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.errors import ConfigError, problem
from launcher.atomic import write_text_atomic
from launcher.plan import default_procs_per_node

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ what runs on the nodes
class SlurmTask:
    """The callable submitit pickles: one per run directory, the same for every task and requeue."""

    def __init__(self, run_dir: str, max_requeues: int, master_port: int):
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.master_port = master_port

    def __call__(self) -> int:
        from launcher.signals import EXIT_STOPPED, STOP

        STOP.install()  # before anything slow: submitit's USR2 handler would exit without a checkpoint
        import submitit

        from launcher.task import run_rank

        env = submitit.JobEnvironment()
        job_num = int(re.sub(r"\D", "", os.environ.get("SLURM_JOB_ID", "0")) or 0)
        os.environ.update(
            RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
            LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=env.hostnames[0],
            # A port per job: two jobs sharing a node must not collide.
            MASTER_PORT=str(self.master_port + job_num % 10000),
        )
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        code = run_rank(self.run_dir)
        # Only USR2 (time limit, preemption) requeues; SIGTERM is scancel or Slurm ending the job.
        if code != EXIT_STOPPED or STOP.signum != signal.SIGUSR2:
            return code
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.global_rank == 0:
            if restarts >= self.max_requeues:
                raise RuntimeError(f"stopped by a signal after {restarts} requeues (cluster.max_requeues={self.max_requeues}): not requeued again")
            # Every rank has saved (the save ends with a barrier); requeue the whole job.
            subprocess.run(["scontrol", "requeue", env.job_id], check=True)
            log.warning("requeued job %s (restart %d of at most %d)", env.job_id, restarts + 1, self.max_requeues)
        time.sleep(600)  # Slurm ends this task as the job goes back to the queue
        return code


# ------------------------------------------------------------------ login-node checks
@dataclass
class Partition:
    name: str
    default: bool
    max_time_min: Optional[int]  # None: unlimited
    total_nodes: int
    max_nodes: Optional[int]  # per job; None: unlimited
    gpus_per_node: int
    cpus_per_node: int


def parse_slurm_minutes(text: str) -> Optional[int]:
    """Slurm's [days-]hours:minutes:seconds (or minutes, or UNLIMITED) as minutes."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


@functools.lru_cache(maxsize=1)  # once per command, however many sweep points
def read_partitions() -> tuple:
    try:
        out = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True, timeout=30, check=True).stdout
    except FileNotFoundError:
        raise ConfigError([problem("cluster", "slurm", "scontrol is not on PATH: submit from a Slurm login node (or cluster=local)")])
    except subprocess.CalledProcessError as exc:
        raise ConfigError([problem("cluster", "slurm", f"cannot reach the Slurm controller: {exc.stderr.strip()}")])
    partitions = []
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        node_info = subprocess.run(["sinfo", "-h", "-p", fields["PartitionName"], "-o", "%G|%c"], capture_output=True, text=True, timeout=30).stdout
        gpus = max((int(m) for m in re.findall(r"gpu(?::[\w-]+)?:(\d+)", node_info)), default=0)
        cpus = max((int(m) for m in re.findall(r"\|(\d+)", node_info)), default=0)
        partitions.append(Partition(
            name=fields["PartitionName"], default=fields.get("Default") == "YES",
            max_time_min=parse_slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
            total_nodes=int(fields.get("TotalNodes", 0)), gpus_per_node=gpus, cpus_per_node=cpus,
            max_nodes=None if fields.get("MaxNodes", "UNLIMITED") == "UNLIMITED" else int(fields["MaxNodes"]),
        ))
    return tuple(partitions)


def check_partition(cluster, partitions: List[Partition]) -> Partition:
    """The partition the job would land on, if it fits; else ConfigError naming what does not."""
    names = [p.name for p in partitions]
    if cluster.partition is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            raise ConfigError([problem("cluster.partition", None, f"the cluster has no default partition; choose one of {', '.join(names)}")])
    else:
        chosen = next((p for p in partitions if p.name == cluster.partition), None)
        if chosen is None:
            raise ConfigError([problem("cluster.partition", cluster.partition, f"no such partition; valid: {', '.join(names)}")])
    problems = []
    if chosen.max_time_min is not None and cluster.time_min > chosen.max_time_min:
        problems.append(problem("cluster.time_min", cluster.time_min, f"must be <= partition {chosen.name}'s MaxTime ({chosen.max_time_min} min)"))
    if cluster.nodes > chosen.total_nodes:
        problems.append(problem("cluster.nodes", cluster.nodes, f"must be <= the {chosen.total_nodes} nodes of partition {chosen.name}"))
    elif chosen.max_nodes is not None and cluster.nodes > chosen.max_nodes:
        problems.append(problem("cluster.nodes", cluster.nodes, f"must be <= partition {chosen.name}'s MaxNodes ({chosen.max_nodes}) per job"))
    if cluster.gpus_per_node > chosen.gpus_per_node:
        problems.append(problem("cluster.gpus_per_node", cluster.gpus_per_node, f"must be <= the {chosen.gpus_per_node} GPUs per node of partition {chosen.name}"))
    tasks = default_procs_per_node(cluster)
    if chosen.cpus_per_node and tasks * cluster.cpus_per_task > chosen.cpus_per_node:
        problems.append(problem("cluster.cpus_per_task", cluster.cpus_per_task, f"x {tasks} tasks per node must be <= the {chosen.cpus_per_node} CPUs per node of partition {chosen.name}"))
    if problems:
        raise ConfigError(problems)
    return chosen


def preflight(cfg) -> None:
    check_partition(cfg.cluster, read_partitions())


# ------------------------------------------------------------------ submission
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


def make_executor(folder: Path, params: Dict[str, Any]):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), python=sys.executable)
    executor.update_parameters(**params)
    return executor


def sbatch_preview(cfg, plan, run_dir: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(cfg, plan, cfg.name)
    params.pop("array_parallelism")
    command = f"{sys.executable} -u -m submitit.core._submit {run_dir}/submitit"
    return _make_sbatch_string(command=command, folder=str(run_dir / "submitit"), **params)


def record_jobs(run_dir: Path, jobs: List[Dict[str, Any]]) -> None:
    path = run_dir / "submission.json"
    record = json.loads(path.read_text())
    record["jobs"] = jobs
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def submit_runs(cfg, plan, run_dirs: List[Path], folder: Path, job_name: str) -> List[str]:
    """One sbatch call for all run dirs: a job array when there are several. Returns job ids."""
    executor = make_executor(folder, executor_parameters(cfg, plan, job_name))
    tasks = [SlurmTask(str(d), cfg.cluster.max_requeues, cfg.cluster.master_port) for d in run_dirs]
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
    return 0
