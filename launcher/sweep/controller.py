"""The search's controller: asks the study for trials, starts them, and records how each ended.

On Slurm it is one small requeueable job (SweepController) that submits trials through the same
submitit path as a sweep (one array when several start at once) and polls their jobs; locally it
runs in the foreground and trains one trial at a time. It asks only launcher.sweep.trials (Trials:
LocalTrials or SlurmTrials, picked once) how trials start, end and are cancelled. Everything it
knows is in the sweep dir (launcher.trial.study), so a requeued or restarted controller continues
where it was:
- a trial the study holds as running, with a job recorded in its run dir, is waited for, never
  submitted again;
- one without a job (the controller stopped between asking and submitting) is submitted now,
  with the point the study holds for it;
- asking and saving the sampler, and submitting and recording the job ids, each run with SIGTERM
  held back (scontrol requeue, scancel): a stop never falls between an sbatch and its record;
- a trial whose start failed for a reason not its own (its ranks could not meet, its node failed)
  is submitted again, up to START_RETRIES times; the reasons stay in its trial.json and the leaderboard;
- ranked by a benchmark metric (sweep.metric=harness/<task>/<metric>), a trial that has trained to
  the end stays running in the study until its final eval (launcher.harness_results) is done: its
  trial_end.json says "evaluating", it is looked at again at each poll, never started again, and
  it does not count against sweep.parallel (its training jobs have ended; the eval is a job of its
  own). A failed eval fails the trial. The rungs compare sweep.rung_metric meanwhile.
"""

import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from launcher.atomic import write_text_atomic
from launcher.rendezvous import START_FAILED_FILE, start_failure
from launcher.exit_codes import EXIT_STOPPED
from launcher import rundir
from launcher.rundir import LOGS, METRICS
from launcher.harness_results import FAILED, PREFIX as HARNESS_PREFIX, EvalState, eval_states, evals_dir, final_step, step_dir
from launcher.signals import STOP
from launcher.trial.rungs import EVALUATING, TrialRungs, trial_end, write_end
from launcher.trial.space import as_overrides, with_params
from launcher.trial.study import BASE_FILE, SearchSpec, make_sampler, open_study, promotable, trial_dir
from launcher.sweep.trials import INTERRUPTED, make_trials

log = logging.getLogger("launcher.sweep")
SAMPLER_FILE = "sampler.pkl"
MAX_FAILED = 3  # failed trials (crashes, invalid points) before the search itself gives up
START_RETRIES = 2  # starts of one trial that may fail for a reason not its own before it counts as failed


class SearchFailed(RuntimeError):
    pass


def load_base(sweep_dir: Path) -> DictConfig:
    from launcher.schema import Config

    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(Path(sweep_dir) / BASE_FILE))


def final_value(run_dir: Path, metric: str) -> Optional[float]:
    """The metric's value in the last row of its kind (the final eval of a completed trial)."""
    from launcher.metrics import read_metrics

    kind, _, key = metric.partition("/")
    rows = [r for r in read_metrics(run_dir) if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return float(rows[-1][key]) if rows else None


def final_eval(run_dir: Path) -> Tuple[Optional[int], Optional[EvalState]]:
    """A trial's final eval: (its last step, the eval at that step or None)."""
    states = eval_states(run_dir)
    last = final_step(run_dir)
    if last is None:
        return (states[-1].step, states[-1]) if states else (None, None)
    return last, next((s for s in states if s.step == last), None)


def not_its_own(run_dir: Path, state: str) -> Optional[str]:
    """Why the trial's latest start failed for a reason that is not the trial's (its ranks could not
    meet, its node failed); None when the failure may be its own (a crash, a bad point)."""
    failure = start_failure(run_dir)
    if failure is not None:
        return failure
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return f"its job ended {state}"
    return None


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
    """The trial's point: the values the study holds for it, any missing one drawn now (a
    controller stopped in the middle of asking)."""
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
        self.trials = make_trials(self.sweep_dir, self.spec)  # where trials run: asked, never the backend

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.study = open_study(self.sweep_dir, self.spec, sampler=load_sampler(self.sweep_dir, self.spec))
        started = len(self.study.get_trials(deepcopy=False))
        log.info("search %s: %d of %d trials started so far, %d at a time", self.sweep_dir, started, self.spec.trials,
                 self.parallel)
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self.stop_signal:
                self._settle()
                trials = self.study.get_trials(deepcopy=False)
                failed = sum(t.state == TrialState.FAIL for t in trials)
                if failed >= MAX_FAILED:
                    raise SearchFailed(f"{failed} trials failed: the search stops (their logs are in their run dirs)")
                running = [t for t in trials if t.state == TrialState.RUNNING]
                paused = {t.number: step for t in running if (step := self._paused_at(t)) is not None}
                evaluating = self._evaluating(running)  # trained to the end: their final evals decide
                live = [t for t in running if t.number not in paused and t.number not in evaluating]
                resumed = self._promote([t for t in running if t.number in paused], paused, self.parallel - len(live))
                if not live and not resumed and len(trials) >= self.spec.trials:
                    if evaluating:  # whether any trial passed the top rung waits on their evals
                        self._sleep()
                        continue
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
        return EXIT_STOPPED

    @property
    def parallel(self) -> int:
        return self.trials.parallel

    def _on_term(self, signum, frame) -> None:
        self.stop_signal = signum

    def _sleep(self) -> None:
        self.trials.wait(lambda: bool(self.stop_signal))

    def _write_end(self, state: str, message: str = "") -> None:
        write_text_atomic(self.sweep_dir / "search_end.json", json.dumps({"state": state, "message": message}) + "\n")

    # ------------------------------------------------------------------ starting trials
    def _start(self, live, count: int, resumed: int) -> None:
        """Submit live trials that have no job yet, and new ones up to sweep.parallel."""
        unsubmitted = [t._trial_id for t in live if not self._has_job(t)]
        wanted = min(self.parallel - len(live) - resumed, self.spec.trials - count)
        if not unsubmitted and wanted <= 0:
            return
        with STOP.blocked():  # asked, the points and the sampler are recorded together
            asked = [self.study.ask({d.key: d.distribution() for d in self.spec.dims})._trial_id for _ in range(max(0, wanted))]
            if asked:
                save_sampler(self.sweep_dir, self.study.sampler)
        prepared = [p for p in (self._prepare_trial(trial_id) for trial_id in [*unsubmitted, *asked]) if p is not None]
        if prepared and not self.stop_signal:
            self._launch(prepared)

    def _has_job(self, trial) -> bool:
        return self.trials.has_job(trial.number)

    def _prepare_trial(self, trial_id: int):
        """The trial's config and run dir; None (the trial failed) when it cannot start."""
        import optuna

        from launcher.service import create_run, prepare
        from launcher.errors import ConfigError

        trial = optuna.trial.Trial(self.study, trial_id)
        number, params = trial.number, sample(trial, self.spec.dims)
        run_dir = trial_dir(self.sweep_dir, number)
        point = " ".join(as_overrides(params))
        try:
            cfg = with_params(self.base, params)
            OmegaConf.update(cfg, "tracking.tags", [*cfg.tracking.tags, f"trial:{number}"], merge=False)
            if cfg.tracking.name is None:
                cfg.tracking.name = f"{self.sweep_dir.name}-trial{number}"
            prep = prepare(cfg)
        except ConfigError as error:  # only a bad point fails it: the controller's own exit (SystemExit) is not the trial's
            log.error("trial %d (%s) is an invalid point: %s", number, point, error)
            self.study.tell(number, state=TrialState.FAIL)
            return None
        try:
            create_run(prep, run_dir, [*self.spec.fixed, *as_overrides(params)], sweep_group=self.group)
        except (ConfigError, FileNotFoundError) as error:  # e.g. its checkpoint no longer resumes with this code
            log.error("trial %d (%s) cannot start in %s: %s", number, point, run_dir, error)
            self.study.tell(number, state=TrialState.FAIL)
            return None
        earlier = TrialRungs.load(run_dir)
        TrialRungs(run_dir, str(self.sweep_dir), number, trial_id, self.spec.rungs, self.spec.compared,
                   earlier.stop_resumes if earlier else 0, earlier.start_failures if earlier else [],
                   "sweep.rung_metric" if self.spec.rung_metric else "sweep.metric").write()
        log.info("trial %d: %s -> %s", number, point, run_dir)
        return prep

    def _launch(self, prepared, clear_end: bool = False) -> None:
        """Start prepared trials; `clear_end`: they resume after waiting (their trial_end.json goes)."""
        for prep in prepared:  # a start failure on file is the last start's: this one is judged on its own
            (Path(prep.cfg.run_dir) / START_FAILED_FILE).unlink(missing_ok=True)
        self.trials.start(prepared, clear_end, self._ended)  # a run in the foreground ends in there

    def _resume(self, number: int, after_stop: bool = False) -> None:
        """Start a trial again in its run dir: it continues from its newest checkpoint."""
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        prep = self._prepare_trial(trial._trial_id)
        if prep is None:
            return
        if after_stop:
            rungs = TrialRungs.load(trial_dir(self.sweep_dir, number))
            rungs.stop_resumes += 1
            rungs.write()
        self._launch([prep], clear_end=True)

    # ------------------------------------------------------------------ rungs: promote, or prune for good
    def _paused_at(self, trial) -> Optional[int]:
        """The rung a trial stopped at and waits on (its job has ended), else None."""
        end = trial_end(trial_dir(self.sweep_dir, trial.number))
        if end.get("state") != "paused":
            return None
        if not self.trials.has_stopped(trial.number):
            return None  # still saving its checkpoint (or requeued by a preemption and training on)
        return end.get("step")

    def _promote(self, candidates, paused: Dict[int, int], free: int) -> list:
        """ASHA: resume each waiting trial that now ranks in the best 1/reduction at its rung
        (the highest rung first, the best value first)."""
        resumed = []
        for t in sorted(candidates, key=lambda t: (-paused[t.number], self._rank_key(t.intermediate_values[paused[t.number]]))):
            if len(resumed) >= free:
                break
            if promotable(self.study, t, paused[t.number], self.spec.reduction, self.spec.rung_maximize):
                log.info("trial %d promoted at step %d: it resumes from its checkpoint", t.number, paused[t.number])
                self._resume(t.number)
                resumed.append(t)
        return resumed

    def _rank_key(self, value: float) -> float:
        if value is None or not math.isfinite(value):
            return math.inf
        return -value if self.spec.rung_maximize else value  # the rungs' values

    def _finish_rungs(self, waiting, paused: Dict[int, int], trials) -> None:
        """No trial left to start or training: if no trial has completed past the highest rung
        anyone waits at, its best goes on (a search trains one to the end); otherwise the waiting
        trials are pruned for good."""
        top = max(paused.values())
        passed = any(t.state == TrialState.COMPLETE and max(t.intermediate_values, default=0) > top for t in trials)
        at_top = [t for t in waiting if paused[t.number] == top and math.isfinite(self._rank_key(t.intermediate_values[top]))]
        if not passed and at_top:
            best = min(at_top, key=lambda t: self._rank_key(t.intermediate_values[top]))
            log.info("trial %d goes on from step %d: no trial is left to compare it with", best.number, top)
            self._resume(best.number)
            return
        for t in waiting:
            step = paused[t.number]
            with STOP.blocked():  # told first: a trial whose end file says pruned is pruned in the study too
                self.study.tell(t.number, state=TrialState.PRUNED)
                write_end(trial_dir(self.sweep_dir, t.number), "pruned", step, t.intermediate_values.get(step))
                rundir.append_event(trial_dir(self.sweep_dir, t.number), rundir.PRUNED, step=step, trial=t.number)
            log.info("trial %d pruned at step %d (%s %.6g)", t.number, step, self.spec.compared, t.intermediate_values[step])

    # ------------------------------------------------------------------ how trials ended
    def _ended(self, run_dir: Path, state: str, number: Optional[int] = None) -> None:
        """A trial's run ended `state` (a Slurm job state; a foreground run's exit code read as one)."""
        if state in ("STOPPED", INTERRUPTED) and trial_end(run_dir).get("state") == "paused":
            return  # waits at its rung
        if state == INTERRUPTED:
            self.stop_signal = signal.SIGINT  # interrupted: the trial stays running in the study
            return
        self._tell(TrialRungs.load(run_dir).number if number is None else number, run_dir, state)

    def _settle(self) -> None:
        """Record each running trial whose run has ended since the last poll (on Slurm, one query for
        all of them; a run in the foreground was recorded as it ended)."""
        running = [t.number for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        ended = self.trials.ended(running)
        for number, state in ended.items():
            self._ended(trial_dir(self.sweep_dir, number), state, number)
        for number in running:  # trained to the end before (a poll, or a controller, ago): is its eval done?
            run_dir = trial_dir(self.sweep_dir, number)
            if number not in ended and trial_end(run_dir).get("state") == EVALUATING:
                self._judge_final_eval(number, run_dir)

    def _evaluating(self, running) -> Set[int]:
        """The running trials that have trained to the end and wait for their final eval."""
        return {t.number for t in running if trial_end(trial_dir(self.sweep_dir, t.number)).get("state") == EVALUATING}

    def _tell(self, number: int, run_dir: Path, state: str) -> None:
        end = trial_end(run_dir)
        if end.get("state") == "error":
            raise SearchFailed(f"trial {number}: {end.get('message')}")
        if end.get("state") == "pruned":  # told, then stopped before the file was written: the study says so
            return
        if state == "COMPLETED" and self.spec.metric.startswith(HARNESS_PREFIX):
            self._judge_final_eval(number, run_dir)
            return
        if state == "COMPLETED":
            value = final_value(run_dir, self.spec.metric)
            if value is None:
                raise SearchFailed(f"trial {number} completed but logged no {self.spec.metric!r}: set sweep.metric to a "
                                   f"<kind>/<key> of its {METRICS} rows")
            if math.isfinite(value):
                self.study.tell(number, value)
            else:  # diverged: no value to rank
                self.study.tell(number, state=TrialState.FAIL)
            log.info("trial %d completed: %s %.6g", number, self.spec.metric, value)
            return
        trial = TrialRungs.load(run_dir)
        if state == "STOPPED" and trial is not None and trial.stop_resumes < self.base.cluster.max_requeues:
            # Stopped outside a rung (scancel --signal=TERM, requeues used up): it resumes from its checkpoint.
            log.warning("trial %d stopped outside a rung: submitting it again to resume", number)
            self._resume(number, after_stop=True)
            return
        reason = not_its_own(run_dir, state)
        if reason is not None and trial is not None and len(trial.start_failures) < START_RETRIES:
            trial.start_failures.append(reason)
            trial.write()
            log.warning("trial %d ended %s, not of its own doing (%s): submitting it again (%d of %d)", number, state,
                        reason, len(trial.start_failures), START_RETRIES)
            self._resume(number)
            return
        self.study.tell(number, state=TrialState.FAIL)
        log.error("trial %d ended %s: see %s", number, state, run_dir / LOGS)

    def _judge_final_eval(self, number: int, run_dir: Path) -> None:
        """A trial ranked by a benchmark metric has trained to the end: told its final eval's score
        once that eval is done, failed if the eval failed; until then it waits (trial_end.json
        says so, and the next poll looks again)."""
        step, final = final_eval(run_dir)
        if final is not None and final.state == "queued" and final.job_id:
            ended = self.trials.eval_job_ended(final.job_id)
            if ended is not None:  # its job has ended: its result, if any, is on disk by now
                step, final = final_eval(run_dir)
                if final is not None and final.state == "queued":
                    final = EvalState(final.step, "failed", job_id=final.job_id, log=final.log,
                                      error=f"its eval job {final.job_id} ended {ended} without a result")
        if final is None or final.state in ("queued", "ready"):
            if not self.trials.evals_later:  # nothing evaluates a trial once its run has returned here
                self.study.tell(number, state=TrialState.FAIL)
                log.error("trial %d trained to the end, but its final eval (step %s) has not run: no %s in %s",
                          number, step, self.spec.metric, evals_dir(run_dir))
                return
            if trial_end(run_dir).get("state") != EVALUATING:
                write_end(run_dir, EVALUATING, step, None)
                log.info("trial %d trained to the end: its final eval (step %s) gives its %s", number, step, self.spec.metric)
            return
        if final.state == "failed":
            self.study.tell(number, state=TrialState.FAIL)
            lines = (final.error or "").strip().splitlines()
            where = step_dir(run_dir, final.step) / FAILED
            log.error("trial %d failed: its final eval (step %d) failed: %s; see %s%s", number, final.step,
                      lines[0] if lines else "no error recorded", where if where.is_file() else where.parent,
                      f" and {final.log}" if final.log else "")
            return
        value = final.scores.get(self.spec.metric)
        if value is None:
            raise SearchFailed(f"trial {number}'s final eval (step {final.step}) scored no {self.spec.metric!r}; it scored "
                               f"{', '.join(sorted(final.scores)) or 'nothing'}: set sweep.metric to one of those")
        if math.isfinite(value):
            self.study.tell(number, value)
        else:
            self.study.tell(number, state=TrialState.FAIL)
        log.info("trial %d completed: %s %.6g (its final eval, step %d)", number, self.spec.metric, value, final.step)

    def _cancel_running(self) -> None:
        """A failed search leaves no trial training: its running trials' jobs are cancelled."""
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING and self._has_job(t):
                self.trials.cancel(t.number)
                self.study.tell(t.number, state=TrialState.FAIL)


class SweepController:
    """What the controller's Slurm job runs (pickled by submitit); requeued at its time limit."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def __call__(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
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
