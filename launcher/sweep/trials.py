"""How a search's trials run: the one interface the controller (launcher.sweep.controller) starts,
watches and cancels them through, with a local and a Slurm implementation.

A trial is named by its number (its run dir is launcher.trial.study.trial_dir). How a run ended is
a Slurm job state (launcher.backends.slurm_queue): COMPLETED, STOPPED, FAILED, NODE_FAIL, ...; a
run in the foreground has its exit code read as one, and INTERRUPTED for a stop that came with
the controller's own.
"""

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from launcher.backends.local import run_local
from launcher.backends.slurm import submit_runs
from launcher.backends.slurm_queue import without_job_env
from launcher.exit_codes import EXIT_STOPPED
from launcher.signals import STOP
from launcher.trial.rungs import END_FILE
from launcher.trial.study import SearchSpec, trial_dir

log = logging.getLogger("launcher.sweep")

# A foreground run stopped on a signal: the controller's (Ctrl-C, SIGTERM reach the ranks through it).
INTERRUPTED = "INTERRUPTED"

Ended = Callable[[Path, str], None]  # (run dir, how its run ended), for a run that ended in start()


class Trials:
    """Where the trials run. The controller asks only this, never the backend."""

    parallel: int  # trials that train at once
    evals_later: bool  # a trial's benchmark evals may still run after its run has ended (jobs of their own)

    def wait(self, stopped: Callable[[], bool]) -> None:
        """Between two polls of the controller (returns early once `stopped()`)."""
        raise NotImplementedError

    def start(self, prepared: list, clear_end: bool, ended: Ended) -> None:
        """Start prepared trials (launcher.service.prepare's results, their run dirs created);
        `clear_end`: they resume after waiting (their trial_end.json goes). A run that ends while
        this returns (in the foreground) is handed to `ended`."""
        raise NotImplementedError

    def has_job(self, number: int) -> bool:
        """The trial was submitted: a job recorded in its run dir is waited for, never submitted again."""
        raise NotImplementedError

    def ended(self, numbers: List[int]) -> Dict[int, str]:
        """Of these running trials, those whose run has ended since it was started: number -> how."""
        raise NotImplementedError

    def has_stopped(self, number: int) -> bool:
        """A trial paused at its rung has ended its run (after the last ended()), so it waits there."""
        raise NotImplementedError

    def cancel(self, number: int) -> None:
        """Stop the trial's run (a failed search leaves no trial training); says, never raises, if it cannot."""
        raise NotImplementedError

    def eval_job_ended(self, job_id: str) -> Optional[str]:
        """How a trial's eval job (launcher.harness_results' job.json) ended; None while it has not."""
        raise NotImplementedError


class LocalTrials(Trials):
    """One trial at a time, in the foreground (launcher.backends.local): start() returns when it has ended."""

    parallel = 1
    evals_later = False  # its evals ran before its run returned, or never will

    def wait(self, stopped: Callable[[], bool]) -> None:
        return

    def start(self, prepared: list, clear_end: bool, ended: Ended) -> None:
        for prep in prepared:
            run_dir = Path(prep.cfg.run_dir)
            if clear_end:
                (run_dir / END_FILE).unlink(missing_ok=True)
            code = run_local(prep.cfg, run_dir, prep.plan)
            ended(run_dir, "COMPLETED" if code == 0 else INTERRUPTED if code == EXIT_STOPPED else "FAILED")

    def has_job(self, number: int) -> bool:
        return False

    def ended(self, numbers: List[int]) -> Dict[int, str]:
        return {}  # each was handed over as it ended

    def has_stopped(self, number: int) -> bool:
        return True  # its run returned before the controller went on

    def cancel(self, number: int) -> None:
        return  # nothing trains once the controller goes on

    def eval_job_ended(self, job_id: str) -> Optional[str]:
        return None  # no eval job here


class SlurmTrials(Trials):
    """Jobs submitted through submitit (one array when several start at once), polled with one query."""

    evals_later = True

    def __init__(self, sweep_dir: Path, spec: SearchSpec):
        self.sweep_dir = Path(sweep_dir)
        self.spec = spec
        self.parallel = spec.parallel
        self.last: Dict[int, str] = {}  # trial number -> how its latest job ended (the last poll)

    def wait(self, stopped: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.spec.poll_s
        while not stopped() and time.monotonic() < deadline:
            time.sleep(min(1.0, self.spec.poll_s))

    def start(self, prepared: list, clear_end: bool, ended: Ended) -> None:
        run_dirs = [Path(p.cfg.run_dir) for p in prepared]
        with STOP.blocked():  # a SIGTERM waits until the jobs are submitted and recorded
            if clear_end:  # stopped before the sbatch below, the trial reads as stopped: it is resumed then
                for run_dir in run_dirs:
                    (run_dir / END_FILE).unlink(missing_ok=True)
            try:
                with without_job_env():
                    ids = submit_runs(prepared[0].cfg, prepared[0].plan, run_dirs, self.sweep_dir / "submitit",
                                      self.spec.name, code=self.sweep_dir / "code")
            except Exception as error:  # noqa: BLE001 - sbatch refused or timed out: the next poll tries again
                log.error("submitting trials %s failed, trying again at the next poll: %s",
                          ", ".join(d.name for d in run_dirs), error)
                return
        log.info("submitted %s", ", ".join(ids))

    def _jobs(self, number: int) -> List[str]:
        from launcher.run_state import job_ids

        return job_ids(trial_dir(self.sweep_dir, number))

    def has_job(self, number: int) -> bool:
        return bool(self._jobs(number))

    def ended(self, numbers: List[int]) -> Dict[int, str]:
        from launcher.backends.slurm_queue import SLURM_TERMINAL, query_jobs

        self.last = {}
        latest = {n: self._jobs(n)[-1] for n in numbers if self.has_job(n)}
        if not latest:
            return {}
        infos, errors = query_jobs(sorted(set(latest.values())))
        for error in errors:
            log.warning("slurm: %s", error)
        for n in numbers:
            info = infos.get(latest.get(n, ""))
            if info is None or info.state.split()[0] not in SLURM_TERMINAL:
                continue
            self.last[n] = info.state.split()[0]
        return dict(self.last)

    def has_stopped(self, number: int) -> bool:
        return self.last.get(number) == "STOPPED"  # else still saving its checkpoint (or requeued and training on)

    def cancel(self, number: int) -> None:
        from launcher.backends.slurm_queue import SlurmError, cancel

        try:
            cancel([self._jobs(number)[-1]])
        except SlurmError as error:  # the search fails anyway: say it, and go on
            log.warning("%s", error)


    def eval_job_ended(self, job_id: str) -> Optional[str]:
        from launcher.backends.slurm_queue import SLURM_TERMINAL, query_jobs

        infos, errors = query_jobs([job_id])
        for error in errors:
            log.warning("slurm: %s", error)
        info = infos.get(job_id)
        state = info.state.split()[0] if info is not None and info.state else None
        return state if state in SLURM_TERMINAL else None


def make_trials(sweep_dir: Path, spec: SearchSpec) -> Trials:
    return LocalTrials() if spec.backend == "local" else SlurmTrials(sweep_dir, spec)
