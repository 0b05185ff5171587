"""The search's controller: asks the study for trials, starts them, and records how each ended.

On Slurm it is one small requeueable job (SweepController) that submits trials through the same
submitit path as a sweep (one array when several start at once) and polls their jobs; locally it
runs in the foreground and trains one trial at a time. Everything it knows is in the sweep dir
(launcher.sweep.study), so a requeued or restarted controller continues where it was:
- a trial the study holds as running, with a job recorded in its run dir, is waited for, never
  submitted again;
- one without a job (the controller stopped between asking and submitting) is submitted now;
- asking, writing the run dirs, submitting and recording the job ids run with SIGTERM held back
  (scontrol requeue, scancel), so a stop never falls between the sbatch call and its record.
"""

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from launcher.atomic import write_text_atomic
from launcher.sweep.rungs import END_FILE, TrialRungs, trial_end
from launcher.sweep.space import as_overrides
from launcher.sweep.study import BASE_FILE, SearchSpec, make_sampler, open_study

log = logging.getLogger("launcher.sweep")
SAMPLER_FILE = "sampler.pkl"
MAX_FAILED = 3  # failed trials (crashes, invalid points) before the search itself gives up


class SearchFailed(RuntimeError):
    pass


def load_base(sweep_dir: Path) -> DictConfig:
    from launcher.schema import Config

    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(Path(sweep_dir) / BASE_FILE))


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / str(number)


def final_value(run_dir: Path, metric: str) -> Optional[float]:
    """The metric's value in the last row of its kind (the final eval of a completed trial)."""
    from launcher.metrics import read_metrics

    kind, _, key = metric.partition("/")
    rows = [r for r in read_metrics(run_dir) if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return float(rows[-1][key]) if rows else None


def load_sampler(sweep_dir: Path, spec: SearchSpec):
    """The sampler as the last controller left it: a requeued controller goes on drawing where it
    stopped (a fresh seeded one would repeat the points it drew before)."""
    import pickle

    path = Path(sweep_dir) / SAMPLER_FILE
    if path.is_file():
        return pickle.loads(path.read_bytes())
    return make_sampler(spec.sampler_seed)


def save_sampler(sweep_dir: Path, sampler) -> None:
    import pickle

    tmp = Path(sweep_dir) / f".{SAMPLER_FILE}.tmp"
    tmp.write_bytes(pickle.dumps(sampler))
    os.replace(tmp, Path(sweep_dir) / SAMPLER_FILE)


def sample(trial, dims) -> Dict[str, Any]:
    """The trial's point, drawn by the study's sampler."""
    params = {}
    for d in dims:
        if d.kind == "choice":
            params[d.key] = trial.suggest_categorical(d.key, list(d.values))
        elif d.kind == "int":
            params[d.key] = trial.suggest_int(d.key, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            params[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
    return params


class Controller:
    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir).resolve()
        self.spec = SearchSpec.load(self.sweep_dir)
        self.base = load_base(self.sweep_dir)
        self.group = f"{self.sweep_dir.parent.name}/{self.sweep_dir.name}"
        self.stop_signal = 0
        self.study = None
        self.ended: Dict[int, str] = {}  # Slurm: trial number -> how its latest job ended (this poll)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        import optuna

        self.study = open_study(self.sweep_dir, self.spec, sampler=load_sampler(self.sweep_dir, self.spec))
        started = len(self.study.get_trials(deepcopy=False))
        log.info("search %s: %d of %d trials started so far, %d at a time", self.sweep_dir, started, self.spec.trials,
                 self.parallel)
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self.stop_signal:
                self._settle()
                trials = self.study.get_trials(deepcopy=False)
                failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
                if failed >= MAX_FAILED:
                    raise SearchFailed(f"{failed} trials failed: the search stops (their logs are in their run dirs)")
                running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                paused = {t.number: step for t in running if (step := self._paused_at(t)) is not None}
                live = [t for t in running if t.number not in paused]
                resumed = self._promote([t for t in running if t.number in paused], paused, self.parallel - len(live))
                if not live and not resumed and len(trials) >= self.spec.trials:
                    if paused:  # nothing left to start: the best at the top rung goes on, or the rest is pruned
                        self._finish_rungs([t for t in running if t.number in paused], paused, trials)
                        continue
                    self._write_end("completed")
                    log.info("search complete: %s", self.sweep_dir)
                    return 0
                self._start(live, len(trials), len(resumed))
                self._sleep()
        except SearchFailed as error:
            self._write_end("failed", str(error))
            log.error("search failed: %s", error)
            self._cancel_running()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        log.warning("stop signal received: the controller exits; started again, it continues from %s", self.sweep_dir)
        from launcher.signals import EXIT_STOPPED

        return EXIT_STOPPED

    @property
    def parallel(self) -> int:
        return 1 if self.spec.backend == "local" else self.spec.parallel

    def _on_term(self, signum, frame) -> None:
        self.stop_signal = signum

    def _sleep(self) -> None:
        if self.spec.backend == "local":
            return
        deadline = time.monotonic() + self.spec.poll_s
        while not self.stop_signal and time.monotonic() < deadline:
            time.sleep(min(1.0, self.spec.poll_s))

    def _write_end(self, state: str, message: str = "") -> None:
        import json

        write_text_atomic(self.sweep_dir / "search_end.json", json.dumps({"state": state, "message": message}) + "\n")

    # ------------------------------------------------------------------ starting trials
    def _start(self, live, count: int, resumed: int) -> None:
        """Submit live trials that have no job yet, and new ones up to sweep.parallel."""
        from launcher.signals import STOP

        unsubmitted = [t for t in live if not self._has_job(t)]
        wanted = min(self.parallel - len(live) - resumed, self.spec.trials - count)
        if not unsubmitted and wanted <= 0:
            return
        if self.spec.backend == "local":  # in the foreground: the ranks must get Ctrl-C and SIGTERM
            return self._launch(self._ask_and_prepare(unsubmitted, wanted))
        with STOP.blocked():  # a SIGTERM waits until the jobs are submitted and recorded
            prepared = self._ask_and_prepare(unsubmitted, wanted)
            if prepared:
                self._launch(prepared)

    # ------------------------------------------------------------------ rungs: promote, or prune for good
    def _paused_at(self, trial) -> Optional[int]:
        """The rung a trial stopped at and waits on (its job has ended), else None."""
        end = trial_end(trial_dir(self.sweep_dir, trial.number))
        if end.get("state") != "paused":
            return None
        if self.spec.backend == "slurm" and trial.number not in self.ended:
            return None  # it has written the file and is still saving its checkpoint
        return end.get("step")

    def _promote(self, candidates, paused: Dict[int, int], free: int) -> list:
        """ASHA: resume each waiting trial that now ranks in the best 1/reduction at its rung (best first)."""
        from launcher.sweep.study import promotable

        sign = -1 if self.spec.direction == "maximize" else 1
        resumed = []
        for t in sorted(candidates, key=lambda t: (-paused[t.number], sign * t.intermediate_values[paused[t.number]])):
            if len(resumed) >= free:
                break
            if promotable(self.study, t, paused[t.number], self.spec.reduction):
                log.info("trial %d promoted at step %d: it resumes from its checkpoint", t.number, paused[t.number])
                self._resume(t.number)
                resumed.append(t)
        return resumed

    def _finish_rungs(self, waiting, paused: Dict[int, int], trials) -> None:
        """No trial left to start or training: if none has passed the highest rung anyone waits at,
        its best trial goes on (a search always trains one to the end); otherwise the waiting
        trials are pruned for good."""
        top = max(paused.values())
        if not any(max(t.intermediate_values, default=0) > top for t in trials):
            sign = -1 if self.spec.direction == "maximize" else 1
            best = min((t for t in waiting if paused[t.number] == top), key=lambda t: sign * t.intermediate_values[top])
            log.info("trial %d goes on from step %d: no trial is left to compare it with", best.number, top)
            self._resume(best.number)
            return
        import optuna

        from launcher.sweep.rungs import write_end

        for t in waiting:
            step = paused[t.number]
            write_end(trial_dir(self.sweep_dir, t.number), "pruned", step, t.intermediate_values.get(step))
            self.study.tell(t.number, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned at step %d (%s %.6g)", t.number, step, self.spec.metric, t.intermediate_values[step])

    def _ask_and_prepare(self, unsubmitted, wanted: int) -> list:
        trials = [(t.number, t._trial_id, t.params) for t in unsubmitted]
        for _ in range(max(0, wanted)):
            trial = self.study.ask()
            trials.append((trial.number, trial._trial_id, sample(trial, self.spec.dims)))
        if wanted > 0:
            save_sampler(self.sweep_dir, self.study.sampler)
        prepared = [self._prepare_trial(number, trial_id, params) for number, trial_id, params in trials]
        return [p for p in prepared if p is not None]

    def _has_job(self, trial) -> bool:
        from launcher.jobs.slurm_state import job_ids

        run_dir = trial_dir(self.sweep_dir, trial.number)
        return self.spec.backend == "slurm" and bool((run_dir / "submission.json").is_file() and job_ids(run_dir))

    def _prepare_trial(self, number: int, trial_id: int, params: Dict[str, Any]):
        """The trial's config and run dir; None (the trial failed) when its point is invalid."""
        from rich.console import Console

        from launcher.cli import create_run, prepare
        from launcher.errors import ConfigError

        cfg = self.base.copy()
        for key, value in params.items():
            OmegaConf.update(cfg, key, value, merge=True)
        OmegaConf.update(cfg, "tracking.tags", [*cfg.tracking.tags, f"trial:{number}"], merge=False)
        if cfg.tracking.name is None:
            cfg.tracking.name = f"{self.sweep_dir.name}-trial{number}"
        run_dir = trial_dir(self.sweep_dir, number)
        overrides = [*self.spec.fixed, *as_overrides(params)]
        try:
            prep = prepare(cfg, Console(stderr=True, soft_wrap=True))
            create_run(prep, run_dir, overrides, sweep_group=self.group)
        except (SystemExit, ConfigError) as error:  # prepare printed its problems
            log.error("trial %d (%s) is an invalid point: %s", number, " ".join(as_overrides(params)), error)
            import optuna

            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            return None
        TrialRungs(run_dir, str(self.sweep_dir), number, trial_id, self.spec.rungs, self.spec.metric).write()
        log.info("trial %d: %s -> %s", number, " ".join(as_overrides(params)), run_dir)
        return prep

    def _launch(self, prepared) -> None:
        if self.spec.backend == "slurm":
            from launcher.backends.slurm import submit_runs

            run_dirs = [Path(p.cfg.run_dir) for p in prepared]
            ids = submit_runs(prepared[0].cfg, prepared[0].plan, run_dirs, self.sweep_dir / "submitit", self.spec.name,
                              code=self.sweep_dir / "code")
            log.info("submitted %s", ", ".join(ids))
            return
        from launcher.backends.local import run_local

        for prep in prepared:  # one at a time, in the foreground (parallel is 1 locally)
            code = run_local(prep.cfg, Path(prep.cfg.run_dir), prep.plan)
            self._settle_local(prep, code)

    # ------------------------------------------------------------------ how trials ended
    def _settle_local(self, prep, code: int) -> None:
        from launcher.signals import EXIT_STOPPED

        run_dir = Path(prep.cfg.run_dir)
        trial = TrialRungs.load(run_dir)
        if code == EXIT_STOPPED and trial_end(run_dir).get("state") == "paused":
            return  # waits at its rung
        if code == EXIT_STOPPED:
            self.stop_signal = signal.SIGINT  # interrupted: the trial stays running in the study
            return
        self._tell(trial.number, run_dir, "COMPLETED" if code == 0 else ("STOPPED" if code == EXIT_STOPPED else "FAILED"))

    def _settle(self) -> None:
        """Slurm: record each running trial whose job has ended (one query for all of them)."""
        import optuna

        from launcher.jobs.slurm_state import SLURM_TERMINAL, job_ids, query_jobs

        self.ended = {}
        if self.spec.backend != "slurm":
            return
        running = [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        latest = {t.number: job_ids(trial_dir(self.sweep_dir, t.number))[-1] for t in running if self._has_job(t)}
        if not latest:
            return
        infos, errors = query_jobs(sorted(set(latest.values())))
        for error in errors:
            log.warning("slurm: %s", error)
        for t in running:
            info = infos.get(latest.get(t.number, ""))
            if info is not None and info.state.split()[0] in SLURM_TERMINAL:
                self.ended[t.number] = info.state.split()[0]
                if trial_end(trial_dir(self.sweep_dir, t.number)).get("state") != "paused":
                    self._tell(t.number, trial_dir(self.sweep_dir, t.number), info.state.split()[0])

    def _tell(self, number: int, run_dir: Path, state: str) -> None:
        import optuna

        end = trial_end(run_dir)
        if end.get("state") == "error":
            raise SearchFailed(f"trial {number}: {end.get('message')}")
        if state == "COMPLETED":
            value = final_value(run_dir, self.spec.metric)
            if value is None:
                raise SearchFailed(f"trial {number} completed but logged no {self.spec.metric!r}: set sweep.metric to a "
                                   f"<kind>/<key> of its metrics.jsonl rows")
            if math.isfinite(value):
                self.study.tell(number, value)
            else:  # diverged: no value to rank
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            log.info("trial %d completed: %s %.6g", number, self.spec.metric, value)
            return
        if state == "STOPPED" and self.spec.backend == "slurm" and len(self._jobs(run_dir)) <= self.base.cluster.max_requeues:
            # Stopped, not at a rung (scancel --signal=TERM, requeues used up): it resumes from its checkpoint.
            log.warning("trial %d stopped outside a rung: submitting it again to resume", number)
            self._resume(number)
            return
        self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        log.error("trial %d ended %s: see %s", number, state, run_dir / "logs")

    def _cancel_running(self) -> None:
        """A failed search leaves no trial training: its running trials' jobs are cancelled."""
        import optuna

        from launcher.jobs.slurm_state import job_ids

        if self.spec.backend != "slurm":
            return
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.RUNNING and self._has_job(t):
                subprocess.run(["scancel", job_ids(trial_dir(self.sweep_dir, t.number))[-1]], check=False)
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    def _jobs(self, run_dir: Path) -> List[str]:
        from launcher.jobs.slurm_state import job_ids

        return job_ids(run_dir)

    def _resume(self, number: int) -> None:
        """Start a trial again in its run dir: it continues from its newest checkpoint."""
        from launcher.signals import STOP

        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        run_dir = trial_dir(self.sweep_dir, number)
        if self.spec.backend == "local":
            (run_dir / END_FILE).unlink(missing_ok=True)
            prep = self._prepare_trial(number, trial._trial_id, trial.params)
            return self._launch([prep]) if prep is not None else None
        with STOP.blocked():
            # Killed after this unlink and before the submission, the trial reads as stopped: it is resumed then.
            (run_dir / END_FILE).unlink(missing_ok=True)
            prep = self._prepare_trial(number, trial._trial_id, trial.params)
            if prep is not None:
                self._launch([prep])


class SweepController:
    """What the controller's Slurm job runs (pickled by submitit); requeued at its time limit."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def __call__(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        # The trials' sbatch and srun must not inherit this job's allocation (SLURM_MEM_PER_NODE,
        # SLURM_CPUS_PER_TASK, ... are input variables of srun in the trial's job).
        for key in [k for k in os.environ if (k.startswith("SLURM_") and k != "SLURM_CONF") or k.startswith("SBATCH_")]:
            del os.environ[key]
        code = Controller(Path(self.sweep_dir)).run()
        if code:
            raise SystemExit(code)
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m launcher.sweep.controller SWEEP_DIR`: continue a search in the foreground."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return Controller(Path(argv[0])).run()


if __name__ == "__main__":
    sys.exit(main())
