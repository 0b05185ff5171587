"""sft-jobs and a run's benchmark evals (evals/step-N, launcher.harness_results): each eval's line in
`status`, the best trial's scores and each trial's in `sweep`, the scores over steps in `report`,
and the eval jobs' W&B segments in `sync`."""

import json
from pathlib import Path

import optuna
import pytest

from launcher import jobs
from launcher.harness_results import step_dir, write_json
from launcher.trial.rungs import EVALUATING, write_end
from launcher.trial.space import split_overrides
from launcher.trial.study import SearchSpec, open_study, trial_dir
from tests.unit.test_jobs import FakeWandb, cells, make_run, offline_segment, train_row

METRIC = "harness/tiny_tasks/exact_match"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


def eval_done(run: Path, step: int, scores: dict) -> Path:
    write_json(step_dir(run, step) / "summary.json", {"step": step, "scores": scores, "model": "m", "seconds": 2.0})
    return step_dir(run, step)


def eval_queued(run: Path, step: int, job: str) -> Path:
    write_json(step_dir(run, step) / "ready.json", {"step": step, "model": str(run / "export")})
    write_json(step_dir(run, step) / "job.json", {"step": step, "job_id": job})
    return step_dir(run, step)


def eval_failed(run: Path, step: int, error: str, log: str) -> Path:
    write_json(step_dir(run, step) / "failed.json", {"step": step, "error": error, "log": log})
    return step_dir(run, step)


# ------------------------------------------------------------------ status
def test_status_lists_each_eval_done_queued_and_failed(tmp_path, capsys):
    root = tmp_path / "runs"
    run = make_run(root, "tiny_sft/20261124-210300", rows=[train_row(100, 2.0)])
    eval_done(run, 100, {METRIC: 0.31, "harness/tiny_tasks_ll/acc": 0.5})
    eval_queued(run, 200, "123")
    eval_failed(run, 300, "CUDA out of memory\nTraceback (most recent call last): ...", "/runs/x/evals/step-000300/eval.log")
    write_json(step_dir(run, 400) / "ready.json", {"step": 400, "model": "m"})
    assert jobs.main(["--runs-root", str(root), "status", "tiny"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval step")]
    assert lines == [
        "eval step 100: done  tiny_tasks/exact_match 0.31, tiny_tasks_ll/acc 0.5",
        "eval step 200: queued (job 123)",
        "eval step 300: FAILED: CUDA out of memory; log: /runs/x/evals/step-000300/eval.log",
        "eval step 400: ready (the model is exported; its eval has not started)",
    ]


def test_status_of_a_run_without_evals_says_nothing_of_them(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root, "tiny_sft/20261124-210300")
    assert jobs.main(["--runs-root", str(root), "status", "tiny"]) == 0
    assert "eval step" not in capsys.readouterr().out


# ------------------------------------------------------------------ the leaderboard
def make_search(root: Path) -> Path:
    """A search ranked by exact match (maximize), its rungs comparing eval/loss (minimize): trials 0
    and 1 completed, 2 waits for its final eval, 3 was pruned at the first rung."""
    sweep = root / "search" / "20261124-210300"
    sweep.mkdir(parents=True)
    _, dims = split_overrides(["optim.lr=tag(log,interval(1e-4,1e-2))"])
    spec = SearchSpec(dims=dims, fixed=[], trials=4, parallel=2, metric=METRIC, direction="maximize", rungs=[4, 12],
                      reduction=3, sampler_seed=1, poll_s=1.0, backend="slurm", name="tiny_sft", rung_metric="eval/loss",
                      rung_direction="minimize")
    spec.save(sweep)
    study = open_study(sweep, spec, create=True)
    for number, (lr, losses, state, score) in enumerate([
            (1e-3, {4: 2.0, 12: 1.5}, "complete", 0.31),
            (2e-3, {4: 2.2, 12: 1.7}, "complete", 0.45),  # a higher loss, yet the better benchmark score
            (3e-3, {4: 1.9, 12: 1.2}, "evaluating", None),
            (4e-3, {4: 3.0}, "pruned", None)]):
        trial = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        run = make_run(sweep, str(number), total=12, export=True)
        for step, loss in losses.items():
            trial.report(loss, step)
        assert trial.params["optim.lr"] and trial.number == number
        if score is not None:
            eval_done(run, 12, {METRIC: score, "harness/tiny_tasks/other": score / 2})
            eval_done(run, 4, {METRIC: 0.1})  # an earlier checkpoint's eval: not the final one
            study.tell(trial, score)
        elif state == "evaluating":
            eval_queued(run, 12, "777")
            write_end(run, EVALUATING, 12, None)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            write_end(run, "pruned", 4, 3.0)
    return sweep


def test_the_leaderboard_ranks_by_the_benchmark_and_shows_the_best_trials_scores(tmp_path, capsys):
    root = tmp_path / "runs"
    sweep = make_search(root)
    code = jobs.main(["--runs-root", str(root), "sweep", str(sweep)])
    out = capsys.readouterr().out
    assert code == 0
    title = " ".join(out.split("┏")[0].split())  # the table's title, over two lines
    assert "4 of 4 trials (2 completed, 1 evaluating, 1 pruned); harness/tiny_tasks/exact_match (maximize) of the final eval, eval/loss (minimize) at steps [4, 12]" in title
    rows = [cells(out, f"│ {n} ") for n in range(4)]
    order = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│ ") and line.split("│")[1].strip().isdigit()]
    assert order == ["1", "0", "2", "3"]  # completed by score (maximize), then waiting for its eval, then pruned
    # trial, parameters, last rung, eval/loss at rung, the benchmark, state
    assert rows[1][2:] == ["12", "1.7", "0.45", "completed"]
    assert rows[2][2:] == ["12", "1.2", "-", "evaluating"]
    assert rows[3][2:] == ["4", "3", "-", "pruned"]
    below = out.split("best: trial 1")[1].splitlines()
    assert below[2:5] == ["its final eval (step 12):", "  tiny_tasks/exact_match  0.45", "  tiny_tasks/other  0.225"]


def test_the_leaderboard_json_has_each_trials_final_eval_scores(tmp_path, capsys):
    root = tmp_path / "runs"
    sweep = make_search(root)
    assert jobs.main(["--runs-root", str(root), "sweep", str(sweep), "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert (board["metric"], board["rung_metric"], board["rung_direction"]) == (METRIC, "eval/loss", "minimize")
    by_trial = {t["trial"]: t for t in board["trials"]}
    assert [t["trial"] for t in board["trials"]] == [1, 0, 2, 3]
    assert by_trial[1]["harness"] == {METRIC: 0.45, "harness/tiny_tasks/other": 0.225}
    assert by_trial[0]["harness"] == {METRIC: 0.31, "harness/tiny_tasks/other": 0.155}  # step 12's, not step 4's
    assert by_trial[2]["harness"] == {} and by_trial[2]["value"] is None and by_trial[2]["rung_value"] == 1.2
    assert (by_trial[1]["value"], by_trial[1]["rung_value"]) == (0.45, 1.7)


# ------------------------------------------------------------------ report
def test_report_plots_each_benchmark_metric_over_steps(tmp_path, capsys):
    from launcher.harness_results import harness_scores
    from launcher.jobs.plots import draw, harness_rows

    root = tmp_path / "runs"
    run = make_run(root, "r/20261124-210300", rows=[train_row(s, 3 - s / 100) for s in (50, 100, 150, 200)], total=200)
    eval_done(run, 100, {METRIC: 0.2, "harness/tiny_tasks_ll/acc": 0.4})
    eval_done(run, 200, {METRIC: 0.35, "harness/tiny_tasks_ll/acc": 0.6})
    eval_queued(run, 300, "9")  # not done: no point
    fig = draw([("", harness_rows(harness_scores(run)))], "r")
    [panel] = [ax for ax in fig.axes if ax.get_title() == "benchmark evals (eval.harness)"]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panel.lines}
    assert lines == {"tiny_tasks/exact_match": ([100, 200], [0.2, 0.35]), "tiny_tasks_ll/acc": ([100, 200], [0.4, 0.6])}
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["tiny_tasks/exact_match", "tiny_tasks_ll/acc"]
    code, _ = jobs.main(["--runs-root", str(root), "report", "r"]), capsys.readouterr()
    import matplotlib.image

    image = matplotlib.image.imread(run / "report.png")
    assert code == 0 and image.shape[:2] == (1275, 1300)  # a third row of panels: 13 x 12.75 in at 100 dpi


def test_a_sweeps_report_colours_runs_and_styles_benchmark_metrics():
    from launcher.jobs.plots import draw

    series = [("optim.lr=1e-3", [train_row(10, 2.0), {"kind": "harness", "step": 10, METRIC: 0.1, "harness/b/acc": 0.3}]),
              ("optim.lr=2e-3", [train_row(10, 1.5), {"kind": "harness", "step": 10, METRIC: 0.2}])]
    fig = draw(series, "sweep")
    [panel] = [ax for ax in fig.axes if ax.get_title() == "benchmark evals (eval.harness)"]
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in panel.lines}
    assert styles == {"optim.lr=1e-3: b/acc": ("C0", "-"), "optim.lr=1e-3: tiny_tasks/exact_match": ("C0", "--"),
                      "optim.lr=2e-3: tiny_tasks/exact_match": ("C1", "--")}
    [legend] = fig.legends
    assert {"b/acc", "tiny_tasks/exact_match"} <= {t.get_text() for t in legend.get_texts()}


def test_a_run_without_evals_keeps_its_four_panels(tmp_path):
    from launcher.jobs.plots import draw

    fig = draw([("", [train_row(10, 2.0)])], "r")
    assert len(fig.axes) == 4 and not any(ax.get_title().startswith("benchmark") for ax in fig.axes)


# ------------------------------------------------------------------ sync
def eval_segment(run: Path, step: int, stamp: str, run_id: str = "abcd1234") -> Path:
    return offline_segment(step_dir(run, step), stamp, run_id)


def test_sync_uploads_ended_evals_segments_in_time_order_with_the_training_ones(tmp_path):
    from launcher.jobs.sync import sync

    root = tmp_path / "runs"
    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    first = offline_segment(run, "20261124_210400")
    done = eval_segment(run, 100, "20261124_213000")  # the eval of step 100 ran while training went on
    eval_done(run, 100, {METRIC: 0.3})
    second = offline_segment(run, "20261124_220000")  # a requeue
    failed = eval_segment(run, 200, "20261124_221000")
    eval_failed(run, 200, "boom", "/x.log")
    running = eval_segment(run, 300, "20261124_222000")  # its eval still runs: not yet
    eval_queued(run, 300, "77")
    newest = offline_segment(run, "20261124_230000")  # still being written: the job is live
    later = eval_segment(run, 400, "20261124_231000")  # ended, but newer than the live training segment
    eval_done(run, 400, {METRIC: 0.4})
    wandb, said = FakeWandb(), []
    assert sync([run], lambda d: True, follow=False, run=wandb, say=said.append) == 4
    assert wandb.calls == [["wandb", "beta", "sync", str(first), str(done), str(second), str(failed)]]
    assert f"{newest}: still being written (the job runs); sync it when the job ends, or use --follow" in said
    assert any(line.startswith(f"{later}: waits for the older {newest.name}") for line in said)
    eval_done(run, 300, {METRIC: 0.35})  # the eval and the training job end
    assert sync([run], lambda d: False, follow=False, run=wandb, say=said.append) == 3
    assert wandb.calls[-1] == ["wandb", "beta", "sync", str(running), str(newest), str(later)]
    assert sync([run], lambda d: False, follow=False, run=wandb, say=said.append) == 0  # each once
    assert len(wandb.calls) == 2


def test_an_eval_segment_is_not_held_back_as_the_newest_while_the_job_lives(tmp_path):
    """The rule on the segment still being written is the training segments' alone."""
    from launcher.jobs.sync import sync

    root = tmp_path / "runs"
    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    training = offline_segment(run, "20261124_210400", synced=True)
    final = eval_segment(run, 100, "20261124_220000")  # the newest segment of all, its eval done
    eval_done(run, 100, {METRIC: 0.3})
    wandb = FakeWandb()
    assert sync([run], lambda d: True, follow=False, run=wandb, say=lambda t: None) == 1
    assert wandb.calls == [["wandb", "beta", "sync", str(final)]] and training.exists()


def test_an_eval_whose_job_ended_without_a_result_reads_as_failed(tmp_path):
    from launcher import harness_results as files
    from launcher.backends.slurm_queue import JobInfo
    from launcher.jobs.cli import eval_lines

    for step, job in ((10, "41"), (20, "42")):
        files.mark_ready(tmp_path, step, tmp_path / "model")
        files.write_json(files.step_dir(tmp_path, step) / files.JOB, {"job_id": job, "step": step})
    files.mark_ready(tmp_path, 30, tmp_path / "model")
    files.write_json(files.step_dir(tmp_path, 30) / files.JOB, {"job_id": "43", "step": 30})
    infos = {"41": JobInfo("CANCELLED", 0, "sacct"), "42": JobInfo("PENDING (Priority)", None, "squeue"),
             "43": JobInfo("OUT_OF_MEMORY", 0, "sacct")}
    assert eval_lines(files.eval_states(tmp_path), infos) == [
        "eval step 10: cancelled (job 41, without a result)",
        "eval step 20: queued (job 42, PENDING (Priority))",
        "eval step 30: FAILED: its job 43 ended OUT_OF_MEMORY without a result"]


def test_sync_follow_waits_for_the_eval_jobs_after_the_training_ends(tmp_path):
    """The training has ended, the eval of its export has not: --follow keeps polling until the eval
    ends, then uploads its segment; it stops once no eval job is left."""
    from launcher.jobs.sync import sync

    root = tmp_path / "runs"
    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    training = offline_segment(run, "20261124_210400")
    final = eval_segment(run, 100, "20261124_220000")
    eval_queued(run, 100, "77")
    polls = []

    def evals_pending(dirs):
        polls.append(len(polls))
        if len(polls) == 2:  # the eval job ends between the second and third look
            eval_done(run, 100, {METRIC: 0.3})
        return len(polls) <= 2

    wandb, said = FakeWandb(), []
    assert sync([run], lambda d: False, follow=True, run=wandb, say=said.append, poll_s=0, evals_pending=evals_pending) == 2
    assert wandb.calls == [["wandb", "beta", "sync", str(training)], ["wandb", "beta", "sync", str(final)]]
    assert said.count("following the run's eval jobs until they end") == 1 and len(polls) == 3
    assert sync([run], lambda d: False, follow=True, run=wandb, say=said.append, poll_s=0) == 0  # nothing pending: one pass


def test_an_eval_job_slurm_does_not_report_is_live_only_while_just_submitted(tmp_path, monkeypatch):
    """sacct and squeue answer but know nothing of the job: live right after its submission (sacct
    lags), gone after that (its record purged): sync --follow and cancel do not wait on it for ever."""
    import os

    from launcher.jobs.cli import live_eval_jobs

    for name in ("sacct", "squeue"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    root = tmp_path / "runs"
    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    eval_queued(run, 100, "77")
    live, errors = live_eval_jobs([run])
    assert [(d, e.job_id) for d, e in live] == [(run, "77")] and errors == []
    hour_ago = step_dir(run, 100) / "job.json"
    os.utime(hour_ago, (hour_ago.stat().st_mtime - 3600,) * 2)
    assert live_eval_jobs([run]) == ([], [])
