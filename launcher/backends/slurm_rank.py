"""What runs on the nodes: every task of a Slurm job runs `SlurmTask`.

It maps Slurm's task environment to RANK/WORLD_SIZE/MASTER_ADDR and runs the same entry point as
the local backend. How the job ends says how the run ended:
- trained to the end: exit 0 (COMPLETED);
- a USR2 (the time limit is near) that every rank agreed on: all ranks checkpoint, rank 0 requeues
  the job (after W&B's finish, which waits at most tracking.finish_timeout_s), and the restarted
  job resumes from the newest complete checkpoint (at most cluster.max_requeues times);
- a SIGTERM: all ranks checkpoint and exit. A preempted job (Slurm has set its PreemptTime) is
  requeued by rank 0, as a USR2 would be: Slurm itself requeues only a job that outlives its grace
  time. `scontrol requeue` requeues the job in Slurm, `scancel` ends it;
- a trial of a search paused at a rung: exit 75 and no requeue, even when preempted (its search
  resumes it if it is promoted);
- stopped and not requeued by us: rank 0 exits EXIT_STOPPED (75), so Slurm records the job as
  ended with exit code 75 (sft-jobs status: STOPPED, resumable), never as COMPLETED.
"""

import functools
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple

# Nothing slow at the top: submitit unpickles the task (importing this module) before STOP.install.

log = logging.getLogger(__name__)


class SlurmTask:
    """The callable submitit pickles: one per run directory, the same for every task and requeue."""

    def __init__(self, run_dir: str, max_requeues: int, restarts: int = 0):
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.restarts = restarts  # an elastic run's job submitted again by its previous one: its restart count

    def __call__(self) -> int:
        from launcher.exit_codes import EXIT_STOPPED
        from launcher.signals import STOP

        STOP.install()  # before anything slow: submitit's USR2 handler would exit without a checkpoint
        import submitit

        from omegaconf import OmegaConf

        from launcher import rundir
        from launcher.backends.slurm_elastic import GrowCheck
        from launcher.backends.slurm_eval import submit_eval
        from launcher.rank import run_rank
        from launcher.rank_env import RESTARTS_ENV
        from launcher.rendezvous import RENDEZVOUS_ENV, slurm_attempt_id

        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
            LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=env.hostnames[0],
            # Rank 0 publishes the port it got in the run directory under this start's id (launcher.rendezvous).
            **{RENDEZVOUS_ENV: slurm_attempt_id()},
        )
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        if self.restarts:  # continues the run (launcher.rank_env): resume, the same W&B run
            os.environ[RESTARTS_ENV] = str(self.restarts)
        cfg = OmegaConf.load(Path(self.run_dir) / rundir.CONFIG)
        elastic = cfg.cluster.get("min_nodes") is not None
        requeue = Requeue(env.job_id, self.max_requeues, self.run_dir, elastic)
        if env.global_rank == 0:  # rank 0 alone decides how the job ends
            STOP.requeue_job = requeue
            if elastic and cfg.cluster.grow:
                STOP.grow_check = GrowCheck(cfg.cluster.partition, env.num_nodes, cfg.cluster.nodes, cfg.cluster.grow_check_s)
        # Rank 0 submits each benchmark eval (eval.harness) as its own job once the step's model is exported.
        on_eval_model = functools.partial(submit_eval, Path(self.run_dir)) if env.global_rank == 0 else None
        code = run_rank(self.run_dir, on_eval_model)
        if code != EXIT_STOPPED:
            return code
        if env.global_rank != 0:
            # Exiting 0 does not trip srun's --kill-on-bad-exit.
            return 0
        if requeue() and not elastic:  # decided by the trainer already, or here for a stop it did not end (during start-up)
            time.sleep(600)  # Slurm's SIGTERM ends the task as the job goes back to the queue
            return code
        raise SystemExit(EXIT_STOPPED)  # the job's exit code; submitit would record a returned value as success


class Requeue:
    """Rank 0's decision at a stop, made once: requeue the job (True) or let it end stopped.

    An elastic run (cluster.min_nodes) is not requeued in place: a requeued job keeps the task count
    of its first start, which pins it to that many nodes (measured on Slurm 22.05: `scontrol update`
    cannot lower it while the job is alive, and once it is pending this task is gone). Its rank 0
    submits the run again instead, as a new job over the whole range, and this job ends stopped."""

    def __init__(self, job_id: str, max_requeues: int, run_dir: str, elastic: bool = False):
        self.job_id, self.max_requeues, self.run_dir, self.elastic = job_id, max_requeues, run_dir, elastic
        self.done: Optional[bool] = None  # None: not decided yet

    def __call__(self) -> bool:
        """Slurm ends the task with a SIGTERM as the job goes back to the queue. Caught by the stop
        flag, it would leave the task lingering until KillWait's SIGKILL (30 s by default), the
        requeued job unable to start: held back until the requeue is issued, then fatal."""
        from launcher import rundir
        from launcher.rank_env import RESTARTS_ENV
        from launcher.signals import STOP
        from launcher.trial.rungs import trial_end

        if self.done is not None:
            return self.done
        restarts = int(os.environ.get(RESTARTS_ENV) or os.environ.get("SLURM_RESTART_COUNT", "0"))
        counted = restarts - grown(Path(self.run_dir))  # a stop to grow is not one of cluster.max_requeues
        # USR2 (agreed by all ranks): the time limit is near. SIGTERM with a preemption under way:
        # Slurm would requeue only a job still running when the grace time ends, and this one has
        # already saved. Any other SIGTERM (scancel --signal=TERM) stops without a requeue. A trial
        # paused at a rung waits for its search: requeued, it would train past the rung unpromoted.
        paused = trial_end(Path(self.run_dir)).get("state") == "paused"
        preempted = being_preempted(self.job_id)
        wanted = not paused and (STOP.agreed_requeue or preempted)
        self.done = bool(wanted and (STOP.grow or counted < self.max_requeues))
        if self.done and self.elastic:
            self.done = self._submit_again(restarts, preempted)
        elif self.done:
            with STOP.blocked() as after:
                subprocess.run(["scontrol", "requeue", self.job_id], check=True)
                after[signal.SIGTERM] = signal.SIG_DFL
            log.warning("requeued job %s (restart %d of at most %d)", self.job_id, restarts + 1, self.max_requeues)
            rundir.append_event(Path(self.run_dir), rundir.REQUEUED, job=self.job_id, restart=restarts + 1)
        elif wanted:
            log.warning("stopped after %d requeues (cluster.max_requeues=%d): not requeued again; "
                        "resume with sft run_dir=%s", restarts, self.max_requeues, self.run_dir)
        return self.done


    def _submit_again(self, restarts: int, preempted: bool) -> bool:
        """The elastic run's next job. Not when this one was cancelled meanwhile (`sft-jobs cancel`
        reads the jobs before this one records its successor): the run ends stopped then, and a
        successor submitted while the cancel came is cancelled too. A failed sbatch ends it stopped."""
        from launcher import rundir
        from launcher.backends.slurm_queue import cancel
        from launcher.signals import STOP

        if job_field(self.job_id, "JobState") == "CANCELLED":
            log.warning("job %s was cancelled: the run is not submitted again", self.job_id)
            return False
        try:
            with STOP.blocked():
                job, low = submit_again(Path(self.run_dir), self.job_id, self.max_requeues, restarts + 1, preempted)
        except Exception as error:  # noqa: BLE001 - sbatch refused or timed out: stopped, resumable by hand
            log.error("submitting the run again failed (%s: %s): it stopped at its checkpoint; resume with "
                      "sft run_dir=%s", type(error).__name__, error, self.run_dir)
            return False
        if job_field(self.job_id, "JobState") == "CANCELLED":
            cancel([job])
            log.warning("job %s was cancelled while its successor %s was submitted: cancelled that too", self.job_id, job)
            return False
        log.warning("submitted the run again as job %s on %d or more nodes of the range (restart %d%s)", job, low,
                    restarts + 1, ", to grow" if STOP.grow else f" of at most {self.max_requeues}")
        rundir.append_event(Path(self.run_dir), rundir.REQUEUED, job=self.job_id, restart=restarts + 1,
                            next_job=job, grow=STOP.grow)
        return True


def job_field(job_id: str, field: str) -> Optional[str]:
    """One field of `scontrol show job` (None when Slurm does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else None


def being_preempted(job_id: str) -> bool:
    """Whether Slurm has chosen this job for preemption (its PreemptTime is set during the grace time)."""
    return job_field(job_id, "PreemptTime") not in (None, "None", "Unknown")


def grown(run_dir: Path) -> int:
    """The requeues of this submission that were stops to grow (launcher.backends.slurm_elastic): those
    that submitted one of its jobs. A submission's jobs are its first (recorded by `sft`, or by a search
    controller, without a restart count) and the jobs its ranks submitted after it (with one). A resume
    by hand counts its restarts from 0, so an earlier submission's grows are not its own."""
    from launcher import rundir

    jobs = rundir.submission(run_dir).get("jobs") or []
    first = max((i for i, j in enumerate(jobs) if not j.get("restart")), default=-1)
    chain = {str(j.get("job_id")) for j in jobs[first + 1:]}
    return sum(1 for e in rundir.read_events(run_dir) or []
               if e.get("event") == rundir.REQUEUED and e.get("grow") and str(e.get("next_job")) in chain)


def submit_again(run_dir: Path, job_id: str, max_requeues: int, restarts: int, preempted: bool) -> Tuple[str, int]:
    """An elastic run's next start: the same job submitted anew (from the run's config and the code
    snapshot it runs), recorded in its submission.json; returns its id and its fewest nodes.

    It asks for the nodes it can count on, and up to the range's most: its own (unless preempted:
    they go to the preemptor) plus those idle now (launcher.backends.slurm_elastic.lower_bound). A
    lower bound of the range's own minimum would let Slurm start it on the first node that frees up."""
    from omegaconf import OmegaConf

    from launcher import rundir, snapshot
    from launcher.backends.slurm_elastic import lower_bound, submit_with_bound
    from launcher.backends.slurm_queue import without_job_env
    from launcher.backends.slurm_submit import executor_parameters, make_executor, record_jobs

    cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    layout = SimpleNamespace(procs_per_node=rundir.plan(run_dir)["procs_per_node"])
    own = 0 if preempted else int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    low = lower_bound(cfg.cluster, own=own)
    params = executor_parameters(cfg, layout, cfg.name)
    params.pop("array_parallelism")
    # Not before this job has let its nodes go: started at once, it would take only the others.
    params["additional_parameters"]["dependency"] = f"afterany:{job_id}"
    params["setup"] = [*snapshot.setup_lines(snapshot.PACKAGE.parent), *params["setup"]]
    folder = run_dir / "submitit"
    task = SlurmTask(str(run_dir), max_requeues, restarts)
    # This rank's own W&B service and process group are not the next job's.
    with without_job_env(("WANDB_SERVICE", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                          "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")):
        job, low = submit_with_bound(lambda p: make_executor(folder, p).submit(task), params, low, cfg.cluster, log.warning)
    record_jobs(run_dir, [{"job_id": job.job_id, "submitit_folder": str(folder), "restart": restarts, "min_nodes": low,
                           "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])
    return job.job_id, low
