"""A search ranked by a benchmark metric (sweep.metric=harness/<task>/<metric>): the rungs compare
sweep.rung_metric in sweep.rung_direction, a trial that has trained waits in the study for its
final eval (not counted against sweep.parallel, never started again, told once), a failed eval
fails it; the search's own checks refuse a harness metric without a rung metric or a task."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

import launcher.service
from launcher.harness_results import step_dir, write_json
from launcher.schema import Config
from launcher.sweep.controller import Controller
from launcher.sweep.start import metric_problems
from launcher.sweep.trials import Trials
from launcher.trial.rungs import EVALUATING, SweepMetricError, TrialRungs, trial_end
from launcher.trial.space import split_overrides
from launcher.trial.study import BASE_FILE, RungPruner, SearchSpec, open_study, trial_dir

METRIC = "harness/tiny_tasks/exact_match"
LAST = 10  # every trial trains 10 steps; its final eval is evals/step-000010


# ------------------------------------------------------------------ the search's own checks
BENCH_YAML = {}  # the path of a task YAML named otherwise than its task (lm-eval reports the `task:` name)


@pytest.fixture(autouse=True)
def bench_yaml(tmp_path):
    path = tmp_path / "my_bench_file.yaml"
    path.write_text("task: my_bench\ndataset_path: json\noutput_type: loglikelihood\n")
    BENCH_YAML["path"] = str(path)


def config(**sweep):
    cfg = OmegaConf.structured(Config)
    cfg.data.eval_fraction = 0.05
    cfg.eval.harness.tasks = ["tiny_tasks", BENCH_YAML["path"]]
    for key, value in sweep.items():
        OmegaConf.update(cfg, f"sweep.{key}", value)
    return cfg


def test_a_harness_metric_without_a_rung_metric_is_refused_naming_sweep_rung_metric():
    [message] = metric_problems(config(metric=METRIC))
    assert message.startswith("sweep.rung_metric=None: sweep.metric=harness/tiny_tasks/exact_match is a benchmark eval")
    assert "sweep.rung_metric=eval/loss" in message


@pytest.mark.parametrize("sweep, message", [
    ({"metric": "harness/mmlu/acc", "rung_metric": "eval/loss"},
     "sweep.metric='harness/mmlu/acc': task 'mmlu' is not in eval.harness.tasks (tiny_tasks, my_bench)"),
    ({"metric": "harness/tiny_tasks", "rung_metric": "eval/loss"},
     "sweep.metric='harness/tiny_tasks': a benchmark metric is harness/<task>/<metric>[/<filter>]"),
    ({"metric": METRIC, "rung_metric": "harness/tiny_tasks/acc"},
     "sweep.rung_metric='harness/tiny_tasks/acc': the rungs compare a training-time metric"),
    ({"metric": METRIC, "rung_metric": "val/loss"}, "sweep.rung_metric='val/loss': must be <kind>/<key> with kind eval or train"),
    ({"metric": "val/loss"}, "or a benchmark eval harness/<task>/<metric>"),
])
def test_bad_metric_settings_name_the_key_the_value_and_what_is_valid(sweep, message):
    problems = metric_problems(config(**sweep))
    assert len(problems) == 1 and message in problems[0], problems


def test_valid_metric_settings_pass():
    assert metric_problems(config(metric=METRIC, rung_metric="eval/loss")) == []
    assert metric_problems(config(metric="harness/my_bench/acc/strict", rung_metric="train/loss")) == []  # the YAML's task:
    assert "task 'my_bench_file' is not in" in metric_problems(config(metric="harness/my_bench_file/acc", rung_metric="train/loss"))[0]
    assert metric_problems(config(metric="eval/loss")) == []
    no_eval_set = config(metric=METRIC, rung_metric="eval/loss")
    no_eval_set.data.eval_fraction = 0.0
    assert "sweep.rung_metric='eval/loss': the trials have no eval set" in metric_problems(no_eval_set)[0]


# ------------------------------------------------------------------ rungs in their own direction
def test_rungs_compare_in_the_rung_direction_not_the_studys():
    """The study maximizes the benchmark score; the rungs minimize eval/loss: the lowest loss goes on."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner([4, 12], 3, maximize=False))
    verdicts = []
    for loss in (3.0, 2.0, 4.0, 1.0):
        trial = study.ask()
        trial.report(loss, 4)
        verdicts.append(trial.should_prune())
    assert verdicts == [True, True, True, False]  # 1.0, the lowest of 4, alone goes on
    upside_down = optuna.create_study(direction="maximize", pruner=RungPruner([4, 12], 3))  # the study's direction
    verdicts = []
    for loss in (3.0, 2.0, 4.0, 1.0):
        trial = upside_down.ask()
        trial.report(loss, 4)
        verdicts.append(trial.should_prune())
    assert verdicts == [True, True, False, True]


def spec(backend="slurm", **kwargs) -> SearchSpec:
    _, dims = split_overrides(["optim.lr=tag(log,interval(1e-4,1e-2))"])
    values = dict(dims=dims, fixed=[], trials=2, parallel=1, metric=METRIC, direction="maximize", rungs=[5, LAST],
                  reduction=3, sampler_seed=7, poll_s=0.01, backend=backend, name="tiny_sft", rung_metric="eval/loss",
                  rung_direction="minimize")
    return SearchSpec(**{**values, **kwargs})


def test_a_spec_without_rung_settings_compares_its_metric(tmp_path):
    s = spec(metric="eval/loss", direction="minimize", rung_metric=None, rung_direction=None)
    s.save(tmp_path)
    data = json.loads((tmp_path / "search.json").read_text())
    del data["rung_metric"], data["rung_direction"]  # a search started before these settings
    (tmp_path / "search.json").write_text(json.dumps(data))
    loaded = SearchSpec.load(tmp_path)
    assert (loaded.compared, loaded.compared_direction, loaded.rung_maximize) == ("eval/loss", "minimize", False)
    assert (spec().compared, spec().compared_direction, spec().rung_maximize) == ("eval/loss", "minimize", False)


# ------------------------------------------------------------------ the controller
class FakeSlurmTrials(Trials):
    """Trials as SlurmTrials sees them: a job per start, a trial's latest job state at each poll
    (a completed one again and again), eval jobs that may end. `script` acts between polls."""

    evals_later = True

    def __init__(self, parallel: int, script):
        self.parallel = parallel
        self.script = script
        self.polls = 0
        self.started: List[tuple] = []  # (poll, trial number)
        self.completed: Dict[int, str] = {}
        self.eval_jobs: Dict[str, str] = {}

    def wait(self, stopped) -> None:
        self.polls += 1
        self.script(self, self.polls)

    def start(self, prepared, clear_end, ended) -> None:
        self.started += [(self.polls, int(Path(p.cfg.run_dir).name)) for p in prepared]

    def has_job(self, number: int) -> bool:
        return any(n == number for _, n in self.started)

    def ended(self, numbers):
        return {n: self.completed[n] for n in numbers if n in self.completed}

    def has_stopped(self, number: int) -> bool:
        return False

    def cancel(self, number: int) -> None:
        raise AssertionError("nothing is cancelled here")

    def eval_job_ended(self, job_id: str) -> Optional[str]:
        return self.eval_jobs.get(job_id)


def make_search(tmp_path, monkeypatch, **kwargs) -> Path:
    """A sweep dir with a real study; a trial's prepare and create_run write only what the controller reads."""
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    base = OmegaConf.structured(Config)
    base.runs_root = str(tmp_path / "runs")
    (sweep_dir / BASE_FILE).write_text(OmegaConf.to_yaml(base))
    s = spec(**{"rungs": [LAST], **kwargs})  # one rung, at the end: a trial trains through
    s.save(sweep_dir)
    open_study(sweep_dir, s, create=True)

    def create_run(prep, run_dir, overrides, sweep_group=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(json.dumps({"total_steps": LAST}))
        prep.cfg.run_dir = str(run_dir)

    monkeypatch.setattr(launcher.service, "prepare", lambda cfg: SimpleNamespace(cfg=SimpleNamespace(run_dir=None)))
    monkeypatch.setattr(launcher.service, "create_run", create_run)
    return sweep_dir


def train(sweep_dir: Path, number: int, loss: float) -> None:
    """The trial's rank 0 at its last rung (the real hook): eval/loss reported, never pruned there."""
    rungs = TrialRungs.load(trial_dir(sweep_dir, number))
    assert not rungs.judge(LAST, {"eval": {"step": LAST, "loss": loss}})


def eval_queued(sweep_dir: Path, number: int, job: str) -> None:
    run_dir = trial_dir(sweep_dir, number)
    write_json(step_dir(run_dir, LAST) / "ready.json", {"step": LAST, "model": str(run_dir / "export")})
    write_json(step_dir(run_dir, LAST) / "job.json", {"step": LAST, "job_id": job})


def eval_done(sweep_dir: Path, number: int, score: float) -> None:
    write_json(step_dir(trial_dir(sweep_dir, number), LAST) / "summary.json",
               {"step": LAST, "scores": {METRIC: score, "harness/tiny_tasks/other": 0.5}, "model": "m", "seconds": 3.0})


def test_a_trial_waits_for_its_final_eval_without_holding_a_slot_and_is_told_once(tmp_path, monkeypatch, caplog):
    sweep_dir = make_search(tmp_path, monkeypatch)
    seen = {}

    def script(trials, poll):
        if poll == 1:  # trial 0 trains to the end; its eval job is queued
            train(sweep_dir, 0, 1.5)
            trials.completed[0] = "COMPLETED"
            eval_queued(sweep_dir, 0, "900")
        elif poll == 2:  # trial 1 started while trial 0 waited for its eval (parallel=1); it trains to the end
            seen["waiting"] = trial_end(trial_dir(sweep_dir, 0))
            train(sweep_dir, 1, 1.8)
            trials.completed[1] = "COMPLETED"
            eval_queued(sweep_dir, 1, "901")
            eval_done(sweep_dir, 0, 0.31)
        elif poll == 3:  # the search waits for trial 1's eval
            seen["states"] = [t.state for t in open_study(sweep_dir, spec()).get_trials()]
            write_json(step_dir(trial_dir(sweep_dir, 1), LAST) / "failed.json",
                       {"step": LAST, "error": "lm-eval raised KeyError: 'exact_match'\nTraceback ...", "log": "/x/eval.log"})
        elif poll > 6:
            raise AssertionError("the search never ended")

    controller = Controller(sweep_dir)
    controller.trials = trials = FakeSlurmTrials(1, script)
    with caplog.at_level(logging.INFO, logger="launcher.sweep"):
        assert controller.run() == 0
    assert trials.started == [(0, 0), (1, 1)]  # each started once; trial 1 while trial 0's eval was queued
    assert seen["waiting"] == {"state": EVALUATING, "step": LAST, "value": None}
    assert seen["states"] == [TrialState.COMPLETE, TrialState.RUNNING]
    first, second = open_study(sweep_dir, spec()).get_trials()
    assert (first.state, first.value, first.intermediate_values) == (TrialState.COMPLETE, 0.31, {LAST: 1.5})
    assert second.state == TrialState.FAIL
    failed = f"trial 1 failed: its final eval (step 10) failed: lm-eval raised KeyError: 'exact_match'; see " \
             f"{step_dir(trial_dir(sweep_dir, 1), LAST) / 'failed.json'} and /x/eval.log"
    assert failed in caplog.messages
    assert json.loads((sweep_dir / "search_end.json").read_text())["state"] == "completed"
    assert TrialRungs.load(trial_dir(sweep_dir, 0)).metric == "eval/loss"  # the rungs report sweep.rung_metric


def test_an_eval_job_that_ended_without_a_result_fails_its_trial(tmp_path, monkeypatch, caplog):
    sweep_dir = make_search(tmp_path, monkeypatch, trials=1)

    def script(trials, poll):
        if poll == 1:
            train(sweep_dir, 0, 1.5)
            trials.completed[0] = "COMPLETED"
            eval_queued(sweep_dir, 0, "900")
        elif poll == 2:
            trials.eval_jobs["900"] = "TIMEOUT"  # killed at its time limit: no summary.json, no failed.json
        elif poll > 4:
            raise AssertionError("the search never ended")

    controller = Controller(sweep_dir)
    controller.trials = FakeSlurmTrials(1, script)
    with caplog.at_level(logging.INFO, logger="launcher.sweep"):
        assert controller.run() == 0
    [trial] = open_study(sweep_dir, spec()).get_trials()
    assert trial.state == TrialState.FAIL
    assert any("its eval job 900 ended TIMEOUT without a result" in m for m in caplog.messages)


def test_a_local_trial_whose_final_eval_did_not_run_fails_at_once(tmp_path, monkeypatch, caplog):
    """Locally nothing evaluates a trial once its run has returned: it fails instead of waiting forever."""
    sweep_dir = make_search(tmp_path, monkeypatch, trials=1, backend="local")
    controller = Controller(sweep_dir)
    controller.study = open_study(sweep_dir, controller.spec)
    number = controller.study.ask().number
    trial_dir(sweep_dir, number).mkdir(parents=True)
    (trial_dir(sweep_dir, number) / "plan.json").write_text(json.dumps({"total_steps": LAST}))
    with caplog.at_level(logging.INFO, logger="launcher.sweep"):
        controller._tell(number, trial_dir(sweep_dir, number), "COMPLETED")
    assert controller.study.get_trials()[0].state == TrialState.FAIL
    assert any("trained to the end, but its final eval (step 10) has not run" in m for m in caplog.messages)


def test_a_final_eval_without_the_metric_stops_the_search_naming_what_it_scored(tmp_path, monkeypatch):
    from launcher.sweep.controller import SearchFailed

    sweep_dir = make_search(tmp_path, monkeypatch, trials=1, metric="harness/tiny_tasks/acc")
    controller = Controller(sweep_dir)
    controller.study = open_study(sweep_dir, controller.spec)
    number = controller.study.ask().number
    (trial_dir(sweep_dir, number)).mkdir(parents=True)
    (trial_dir(sweep_dir, number) / "plan.json").write_text(json.dumps({"total_steps": LAST}))
    eval_done(sweep_dir, number, 0.4)
    with pytest.raises(SearchFailed, match="scored no 'harness/tiny_tasks/acc'; it scored harness/tiny_tasks/exact_match, "
                                           "harness/tiny_tasks/other"):
        controller._tell(number, trial_dir(sweep_dir, number), "COMPLETED")


def test_a_rung_without_the_rung_metric_names_sweep_rung_metric(tmp_path, monkeypatch):
    sweep_dir = make_search(tmp_path, monkeypatch)
    study = open_study(sweep_dir, spec())
    trial = study.ask()
    run_dir = trial_dir(sweep_dir, trial.number)
    run_dir.mkdir(parents=True)
    TrialRungs(run_dir, str(sweep_dir), trial.number, trial._trial_id, [5, LAST], "eval/loss", setting="sweep.rung_metric").write()
    with pytest.raises(SweepMetricError, match=r"^sweep.rung_metric='eval/loss': the trial logged no 'loss'"):
        TrialRungs.load(run_dir).judge(5, {"train": {"step": 5, "loss": 1.0}})


def test_a_waiting_trial_is_promoted_in_the_rungs_direction_not_the_studys():
    """Ranked by a benchmark score (maximize) while the rungs compare the eval loss (minimize): the
    lowest loss at a rung is the one promoted."""
    study = optuna.create_study(direction="maximize")
    trials = []
    for loss in (1.0, 2.0, 3.0):
        trial = study.ask()
        trial.report(loss, 4)
        trials.append(study.trials[-1])
    resumed = []
    stub = SimpleNamespace(study=study, spec=SimpleNamespace(reduction=3, rung_maximize=False),
                           _resume=resumed.append, _rank_key=lambda v: v)
    Controller._promote(stub, trials, {t.number: 4 for t in trials}, free=3)
    assert resumed == [trials[0].number]  # loss 1.0; under the study's maximize it would have been loss 3.0
