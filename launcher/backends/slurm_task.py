"""What runs on the nodes: every task of a Slurm job runs `SlurmTask`.

It maps Slurm's task environment to RANK/WORLD_SIZE/MASTER_ADDR and runs the same entry point as
the local backend. How the job ends says how the run ended:
- trained to the end: exit 0 (COMPLETED);
- a USR2 (the time limit is near) that every rank agreed on: all ranks checkpoint, rank 0 requeues
  the job, and the restarted job resumes from the newest complete checkpoint (at most
  cluster.max_requeues times);
- a SIGTERM (preemption, `scontrol requeue`, `scancel`): all ranks checkpoint and exit; Slurm
  requeues a preempted or requeued job itself and ends a cancelled one;
- stopped and not requeued by us: rank 0 exits EXIT_STOPPED (75), so Slurm records the job as
  ended with exit code 75 (sft-jobs status: STOPPED, resumable), never as COMPLETED.
"""

import logging
import os
import re
import subprocess
import time

log = logging.getLogger(__name__)


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
        if code != EXIT_STOPPED:
            return code
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # Only a USR2 requeues from here; Slurm requeues a preempted job (SIGTERM) itself.
        if STOP.agreed_requeue and restarts < self.max_requeues:
            if env.global_rank == 0:
                # Every rank has saved (the save ends with a barrier); requeue the whole job.
                subprocess.run(["scontrol", "requeue", env.job_id], check=True)
                log.warning("requeued job %s (restart %d of at most %d)", env.job_id, restarts + 1, self.max_requeues)
            time.sleep(600)  # Slurm ends this task as the job goes back to the queue
            return code
        if STOP.agreed_requeue:
            log.warning("stopped after %d requeues (cluster.max_requeues=%d): not requeued again; "
                        "resume with sft run_dir=%s", restarts, self.max_requeues, self.run_dir)
        # One exit code for the job: rank 0's. Other ranks exit 0, so srun's --kill-on-bad-exit
        # does not cut rank 0 short while it closes W&B.
        if env.global_rank == 0:
            raise SystemExit(EXIT_STOPPED)  # submitit would record a returned value as success
        return 0
