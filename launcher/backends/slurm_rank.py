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
from typing import Optional

log = logging.getLogger(__name__)


class SlurmTask:
    """The callable submitit pickles: one per run directory, the same for every task and requeue."""

    def __init__(self, run_dir: str, max_requeues: int):
        self.run_dir = run_dir
        self.max_requeues = max_requeues

    def __call__(self) -> int:
        from launcher.exit_codes import EXIT_STOPPED
        from launcher.signals import STOP

        STOP.install()  # before anything slow: submitit's USR2 handler would exit without a checkpoint
        import submitit

        from launcher.rendezvous import RENDEZVOUS_ENV, slurm_attempt_id
        from launcher.backends.slurm_eval import submit_eval
        from launcher.rank import run_rank

        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
            LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=env.hostnames[0],
            # Rank 0 publishes the port it got in the run directory under this start's id (launcher.rendezvous).
            **{RENDEZVOUS_ENV: slurm_attempt_id()},
        )
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        requeue = Requeue(env.job_id, self.max_requeues, self.run_dir)
        if env.global_rank == 0:  # rank 0 alone decides how the job ends
            STOP.requeue_job = requeue
        # Rank 0 submits each benchmark eval (eval.harness) as its own job once the step's model is exported.
        on_eval_model = functools.partial(submit_eval, Path(self.run_dir)) if env.global_rank == 0 else None
        code = run_rank(self.run_dir, on_eval_model)
        if code != EXIT_STOPPED:
            return code
        if env.global_rank != 0:
            # Exiting 0 does not trip srun's --kill-on-bad-exit.
            return 0
        if requeue():  # decided by the trainer already, or here for a stop it did not end (during start-up)
            time.sleep(600)  # Slurm's SIGTERM ends the task as the job goes back to the queue
            return code
        raise SystemExit(EXIT_STOPPED)  # the job's exit code; submitit would record a returned value as success


class Requeue:
    """Rank 0's decision at a stop, made once: requeue the job (True) or let it end stopped."""

    def __init__(self, job_id: str, max_requeues: int, run_dir: str):
        self.job_id, self.max_requeues, self.run_dir = job_id, max_requeues, run_dir
        self.done: Optional[bool] = None  # None: not decided yet

    def __call__(self) -> bool:
        """Slurm ends the task with a SIGTERM as the job goes back to the queue. Caught by the stop
        flag, it would leave the task lingering until KillWait's SIGKILL (30 s by default), the
        requeued job unable to start: held back until the requeue is issued, then fatal."""
        from launcher import rundir
        from launcher.signals import STOP
        from launcher.trial.rungs import trial_end

        if self.done is not None:
            return self.done
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # USR2 (agreed by all ranks): the time limit is near. SIGTERM with a preemption under way:
        # Slurm would requeue only a job still running when the grace time ends, and this one has
        # already saved. Any other SIGTERM (scancel --signal=TERM) stops without a requeue. A trial
        # paused at a rung waits for its search: requeued, it would train past the rung unpromoted.
        paused = trial_end(Path(self.run_dir)).get("state") == "paused"
        wanted = not paused and (STOP.agreed_requeue or being_preempted(self.job_id))
        self.done = bool(wanted and restarts < self.max_requeues)
        if self.done:
            with STOP.blocked() as after:
                subprocess.run(["scontrol", "requeue", self.job_id], check=True)
                after[signal.SIGTERM] = signal.SIG_DFL
            log.warning("requeued job %s (restart %d of at most %d)", self.job_id, restarts + 1, self.max_requeues)
            rundir.append_event(Path(self.run_dir), rundir.REQUEUED, job=self.job_id, restart=restarts + 1)
        elif wanted:
            log.warning("stopped after %d requeues (cluster.max_requeues=%d): not requeued again; "
                        "resume with sft run_dir=%s", restarts, self.max_requeues, self.run_dir)
        return self.done


def being_preempted(job_id: str) -> bool:
    """Whether Slurm has chosen this job for preemption (its PreemptTime is set during the grace time)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"\bPreemptTime=(\S+)", out)
    return bool(found) and found.group(1) not in ("None", "Unknown")
