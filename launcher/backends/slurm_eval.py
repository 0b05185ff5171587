"""Benchmark evals on Slurm: one job per evaluated step, in its own allocation (eval.harness.gpus,
cpus, time_min, partition), submitted through submitit by the training's rank 0 once the step's
model is exported (launcher.harness runs in it).

Never twice for one step while one is queued, running or done (evals/step-N/job.json and the job's
state; summary.json). A preempted or timed-out eval job is requeued by submitit (EvalTask.checkpoint);
a failed one leaves failed.json and the training as it ended.
"""

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from launcher import harness_results as files
from launcher import rundir, snapshot
from launcher.backends.slurm_queue import SLURM_TERMINAL, SlurmError, query_jobs, without_job_env

log = logging.getLogger(__name__)


class EvalTask:
    """What an eval job runs (pickled by submitit)."""

    def __init__(self, run_dir: str, step: int):
        self.run_dir, self.step = run_dir, step

    def __call__(self) -> int:
        from launcher.harness import run_eval
        from launcher.rendezvous import RENDEZVOUS_ENV

        # Submitted by a training rank, the job inherits its environment: with RANK, WORLD_SIZE and
        # MASTER_PORT set, lm-eval's model (through accelerate) joins the training's process group.
        # WANDB_SERVICE points W&B at the rank's own service, which is gone; the rank's GPUs are not
        # this job's (Slurm sets CUDA_VISIBLE_DEVICES again for a job that has GPUs).
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", RENDEZVOUS_ENV,
                    "WANDB_SERVICE"):
            os.environ.pop(key, None)
        if not (os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS")):
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        os.environ["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        # submitit ignores SIGTERM; lm-eval's worker pools (bootstrapped standard errors) inherit that,
        # and the pool's SIGTERM at its end would leave them, and the job, waiting forever.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

        code = run_eval(Path(self.run_dir), self.step)
        if code:
            raise SystemExit(code)  # the job FAILED in Slurm too; failed.json says why
        return code

    def checkpoint(self, *args, **kwargs):
        """Preempted or at its time limit: submitit requeues the job, which evaluates from the start."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def eval_parameters(cfg, step: int) -> Dict[str, Any]:
    """One task on one node with eval.harness's resources; the site's settings (account, container,
    sbatch extras, memory, constraints) as the training has them."""
    h, c = cfg.eval.harness, cfg.cluster
    extra: Dict[str, Any] = {**dict(c.sbatch_extra), "requeue": True}
    extra.pop("nodes", None)
    if c.container_image:
        extra["container_image"] = c.container_image
    if c.container_mounts:
        extra["container_mounts"] = c.container_mounts
    params: Dict[str, Any] = dict(
        job_name=f"{cfg.name}-eval-{step}", nodes=1, ntasks_per_node=1, cpus_per_task=h.cpus, time=h.time_min,
        signal_delay_s=min(c.signal_delay_s, 60), setup=list(c.setup), additional_parameters=extra,
    )
    partition = h.partition or c.partition
    if partition:
        params["partition"] = partition
    for key in ("account", "qos", "mem", "constraint", "exclude"):
        if c[key] is not None:
            params[key] = c[key]
    if h.gpus:
        params["gpus_per_node"] = h.gpus
    return params


def live_job(state: Optional[files.EvalState]) -> Optional[str]:
    """The job id of the step's eval still queued or running, if any."""
    if state is None or state.state != "queued" or not state.job_id:
        return None
    try:
        infos, _ = query_jobs([state.job_id])
    except SlurmError:
        return state.job_id  # Slurm did not answer: not a reason to submit a second
    info = infos.get(state.job_id)
    return state.job_id if info is None or info.state.split()[0] not in SLURM_TERMINAL else None


def submit_eval(run_dir: Path, step: int) -> Optional[str]:
    """Submit the eval of `step` unless one is queued, running or done; returns the new job id."""
    import submitit

    run_dir = Path(run_dir)
    folder = files.step_dir(run_dir, step)
    state = files.read_state(folder)
    if state is not None and state.state == "done":
        log.info("the benchmark eval of step %d is done already", step)
        return None
    running = live_job(state)
    if running:
        log.info("the benchmark eval of step %d is job %s already", step, running)
        return None
    cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    params = eval_parameters(cfg, step)
    # The code this rank runs (the run's snapshot; a search trial's is its search's).
    params["setup"] = [*snapshot.setup_lines(snapshot.PACKAGE.parent), *params["setup"]]
    executor = submitit.SlurmExecutor(folder=str(folder / "submitit"), python=sys.executable, max_num_timeout=3)
    executor.update_parameters(**params)
    with without_job_env():
        job = executor.submit(EvalTask(str(run_dir), step))
    files.write_json(folder / files.JOB, {"job_id": job.job_id, "step": step, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "log": str(folder / "submitit" / f"{job.job_id}_0_log.out")})
    (folder / files.FAILED).unlink(missing_ok=True)  # an earlier try's
    log.info("submitted the benchmark eval of step %d: job %s", step, job.job_id)
    return job.job_id
