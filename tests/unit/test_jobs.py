"""sft-jobs on fake run directories: RUN resolution, states and tables of local runs, metrics, reports."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from launcher import jobs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_row(step, loss, lr=1e-3):
    return {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": 1.0,
            "tokens_per_s": 1000.0 + step, "trained_tokens_per_s": 200.0 + step}


def eval_row(step, loss, accuracy=None):
    row = {"kind": "eval", "step": step, "loss": loss, "perplexity": 2.718 ** loss}
    if accuracy is not None:
        row["accuracy"] = accuracy
    return row


def make_run(root: Path, rel: str, *, backend="local", rows=(), jobs_=(), total=100, world=2, overrides=("recipe=tiny_sft",),
             logs=None, checkpoints=(), incomplete=(), export=False, host=None, final_eval=False,
             config="name: x\n") -> Path:
    """A run directory as `sft` and the trainer leave it."""
    run = root / rel
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text(config)
    if final_eval:
        (run / "final_eval.json").write_text(json.dumps({"step": total, "result": {"loss": 1.0}}))
    (run / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run / "plan.json").write_text(json.dumps({"world_size": world, "total_steps": total}))
    submission = {"backend": backend, "argv": ["sft", *overrides], "host": host or os.uname().nodename,
                  "submitted_at": "2026-11-24T21:03:00+0000",
                  "jobs": [{"job_id": j, "submitit_folder": str(run / "submitit"), "submitted_at": "x"} for j in jobs_]}
    (run / "submission.json").write_text(json.dumps(submission))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for rank, text in (logs or {0: "2026-11-24 21:03:05,000 [rank 0] INFO launcher.trainer: steps: 10 per epoch, 100 in total\n"}).items():
        (run / "logs" / f"rank-{rank}.log").write_text(text)
    for step in checkpoints:
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").write_text(json.dumps({"step": step, "world_size": world}))
    for step in incomplete:
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    if export:
        (run / "export").mkdir()
    return run


def make_sweep(root: Path, rel: str, points) -> Path:
    sweep = root / rel
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for i, (overrides, rows) in enumerate(points):
        make_run(sweep, str(i), overrides=overrides, rows=rows, export=True)
    return sweep


def cells(out: str, key: str) -> list:
    """The cells of the table row that contains key."""
    row = next(line for line in out.splitlines() if key in line and line.startswith("│"))
    return [c.strip() for c in row.strip("│ ").split("│")]


def sft_jobs(capsys, root: Path, *args) -> tuple:
    code = jobs.main(["--runs-root", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich would otherwise wrap table cells


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "runs"


# ------------------------------------------------------------------ RUN resolution
def test_resolve_path_prefix_and_exact(root, monkeypatch, tmp_path):
    a = make_run(root, "tiny_sft/20261124-210300")
    b = make_run(root, "tiny_sft/20261124-210300-1")
    c = make_run(root, "other/20261124-220000")
    assert jobs.resolve_run(str(a), root) == a  # a path
    assert jobs.resolve_run("oth", root) == c  # a unique prefix
    assert jobs.resolve_run("tiny_sft/20261124-210300", root) == a  # exact beats longer names
    assert jobs.resolve_run("tiny_sft/20261124-210300-", root) == b
    monkeypatch.chdir(tmp_path)
    assert jobs.resolve_run("runs/tiny_sft/20261124-210300-", root) == b  # a partial path into the root


def test_ambiguous_and_missing_run_exit_2(root, capsys):
    make_run(root, "tiny_sft/20261124-210300")
    make_run(root, "tiny_sft/20261124-210400")
    code, out, err = sft_jobs(capsys, root, "status", "tiny")
    assert code == 2
    assert "RUN 'tiny' is ambiguous: it matches 2 runs" in err
    assert "tiny_sft/20261124-210300" in err and "tiny_sft/20261124-210400" in err
    code, _, err = sft_jobs(capsys, root, "status", "nothing_like_it")
    assert code == 2 and "RUN 'nothing_like_it' matches no run under" in err


def test_sweep_prefix_means_the_sweep_not_its_points(root):
    sweep = make_sweep(root, "sw/20261124-210300", [(["optim.lr=1e-5"], []), (["optim.lr=2e-5"], [])])
    assert jobs.resolve_run("sw", root) == sweep
    assert jobs.resolve_run("sw/20261124-210300/1", root) == sweep / "1"


# ------------------------------------------------------------------ metrics
def test_resumed_metrics_last_row_of_a_step_wins(tmp_path):
    run = make_run(tmp_path, "r", rows=[
        eval_row(0, 6.0), train_row(10, 5.0), train_row(20, 4.0), eval_row(20, 4.5), train_row(30, 3.9),  # killed after 30
        train_row(30, 3.5), train_row(40, 3.0),  # resumed from the step-20 checkpoint: 30 is logged again
    ])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a row still being written
    rows = jobs.read_metrics(run)
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [
        ("eval", 0, 6.0), ("train", 10, 5.0), ("train", 20, 4.0), ("eval", 20, 4.5), ("train", 30, 3.5), ("train", 40, 3.0)]


def test_rows_of_an_abandoned_attempt_past_the_resume_point_are_dropped(tmp_path):
    run = make_run(tmp_path, "r", rows=[train_row(10, 5.0), train_row(20, 4.0), train_row(30, 3.9), train_row(20, 3.8)])
    assert [(r["step"], r["loss"]) for r in jobs.read_metrics(run)] == [(10, 5.0), (20, 3.8)]


# ------------------------------------------------------------------ status and list of local runs
def test_status_of_a_local_run(root, capsys):
    make_run(root, "tiny_sft/20261124-210300", rows=[train_row(10, 5.0), train_row(30, 3.25)],
             checkpoints=(20,), incomplete=(30,),
             logs={0: "x INFO launcher.trainer: steps: 10 per epoch, 100 in total\n"
                      "x WARNING launcher.trainer: stop signal received: saving a checkpoint at step 30 and exiting (75)\n"})
    assert jobs.main(["status", "tiny", "--runs-root", str(root)]) == 0  # the option also after the command
    out = capsys.readouterr().out
    assert "sft recipe=tiny_sft" in out
    # job, state, from, requeues, step, loss, checkpoint (the unmarked step-30 save does not count), nodes
    assert cells(out, "│ local") == ["local", "STOPPED", "logs", "-", "30 / 100", "3.25", "20", "-"]


def test_status_names_the_slowest_rank_of_the_last_log_step(root, capsys):
    health = {"step_time_min_s": 0.5, "step_time_max_s": 0.6, "slowest_rank": 3, "peak_mem_gib_max": 71.5, "data_wait_s_max": 0.02}
    make_run(root, "tiny_sft/20261124-210300", rows=[train_row(10, 5.0), {**train_row(20, 4.0), **health}])
    code, out, _ = sft_jobs(capsys, root, "status", "tiny")
    assert code == 0
    assert ("health     step 20: step time 0.5-0.6 s over ranks (slowest: rank 3, +20%), peak memory max 71.5 GiB, "
            "data wait max 0.02 s") in out


@pytest.mark.parametrize("setup, state, source", [
    (dict(export=True), "COMPLETED", "export/"),
    (dict(logs={1: "x INFO launcher.trainer: steps: 10 per epoch, 100 in total\nx ERROR launcher: rank 1 failed\n"}), "FAILED", "logs"),
    (dict(logs={0: "x ERROR launcher: rank 0 failed\nx INFO launcher.trainer: steps: 10 per epoch, 100 in total\n"}), "STOPPED", "no process"),
    (dict(rows=[train_row(100, 1.0)], total=None, final_eval=True, config="checkpoint: {export: false}\n"),
     "COMPLETED", "final_eval.json"),
    # Every step trained, killed in the final eval, or in the export it asked for: resumable, not done.
    (dict(rows=[train_row(100, 1.0)], total=None), "STOPPED", "no process"),
    (dict(rows=[train_row(100, 1.0)], total=None, final_eval=True), "STOPPED", "no process"),
    (dict(host="elsewhere"), "RUNNING", "recent writes"),
])
def test_local_state_rules(tmp_path, setup, state, source):
    run = make_run(tmp_path, "r", **setup)
    assert jobs.local_state(run, jobs.Progress.of(run)) == (state, source)


def events(run: Path, *rows) -> None:
    """Appends events as the ranks, the Slurm task and the controller do (launcher.rundir)."""
    from launcher import rundir

    for event, fields in rows:
        rundir.append_event(run, event, **fields)


# What the logs say (legacy wording, or none) does not count once a run has events: the events decide.
@pytest.mark.parametrize("rows, state, source", [
    ([("started", dict(rank=0, total_steps=100)), ("started", dict(rank=1, total_steps=100)),
      ("failed", dict(rank=1, reason="RuntimeError: x"))], "FAILED", "events"),
    # A rank that failed in an earlier start and started again: that start has not ended.
    ([("started", dict(rank=0)), ("failed", dict(rank=0, reason="x")), ("started", dict(rank=0))], "STOPPED", "no process"),
    ([("started", dict(rank=0)), ("stopped", dict(rank=0, signal="SIGUSR2", step=30))], "STOPPED", "events"),
    ([("started", dict(rank=0)), ("stopped", dict(rank=0, signal="SIGTERM", step=None))], "STOPPED", "events"),
    ([("started", dict(rank=0)), ("started", dict(rank=1)), ("stopped", dict(rank=1, signal="SIGUSR2", step=3)),
      ("failed", dict(rank=0, reason="x"))], "FAILED", "events"),
    ([("started", dict(rank=0)), ("completed", dict(step=100))], "COMPLETED", "events"),
    ([("started", dict(rank=0)), ("paused", dict(step=20, trial=3))], "STOPPED", "no process"),
])
def test_local_state_from_events_not_log_words(tmp_path, rows, state, source):
    run = make_run(tmp_path, "r", logs={0: "x ERROR launcher: rank 0 failed\nx WARNING stop signal received\n"})
    events(run, *rows)
    assert jobs.local_state(run, jobs.Progress.of(run)) == (state, source)


def test_total_steps_and_requeues_come_from_events(tmp_path):
    from launcher.run_state import requeues

    run = make_run(tmp_path, "r", total=None, logs={0: "steps: 10 per epoch, 999 in total\nrequeued job 7 (restart 9 of\n"})
    assert requeues(run) == 9 and jobs.Progress.of(run).total == 999  # no events: the logs, as before events
    events(run, ("started", dict(rank=0, restart=0, total_steps=40)), ("requeued", dict(job="7", restart=1)),
           ("started", dict(rank=0, restart=1, total_steps=40)), ("requeued", dict(job="7", restart=2)))
    assert requeues(run) == 2 and jobs.Progress.of(run).total == 40
    (run / "events.jsonl").write_text((run / "events.jsonl").read_text() + '{"event": "started", "ra')  # cut mid-write
    assert requeues(run) == 2


def test_list_newest_first_with_sweep_points_and_limit(root, capsys):
    make_run(root, "old/20261101-090000", rows=[train_row(50, 2.5)], export=True)
    make_run(root, "tiny_sft/20261124-210300", rows=[train_row(10, 4.0)], total=None,
             logs={0: "x INFO launcher.trainer: steps: 10 per epoch, 100 in total\nx ERROR launcher: rank 0 failed\n"})
    make_sweep(root, "sw/20261124-220000", [(["recipe=tiny_sft", "optim.lr=1e-5"], [train_row(100, 1.5)]),
                                            (["recipe=tiny_sft", "optim.lr=2e-5"], [train_row(100, 1.25)])])
    code, out, _ = sft_jobs(capsys, root, "list")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == [
        "sw/20261124-220000/ (sweep, 2 points)", "sw/20261124-220000/0", "sw/20261124-220000/1",
        "tiny_sft/20261124-210300", "old/20261101-090000"]
    assert "2 COMPLETED" in lines[0]
    assert "FAILED" in lines[3] and "10 / 100" in lines[3]  # total from the trainer's log line
    assert "COMPLETED" in lines[4] and "50 / 100" in lines[4] and "2.5" in lines[4]
    _, out, _ = sft_jobs(capsys, root, "list", "--limit", "1")
    assert "sw/20261124-220000/" in out and "tiny_sft" not in out


def test_status_of_a_sweep_labels_points_by_their_overrides(root, capsys):
    make_sweep(root, "sw/20261124-220000", [(["recipe=tiny_sft", "optim.lr=1e-5"], [train_row(100, 1.5)]),
                                            (["recipe=tiny_sft", "optim.lr=2e-5"], [train_row(100, 1.25)])])
    code, out, _ = sft_jobs(capsys, root, "status", "sw")
    assert code == 0
    assert "0  optim.lr=1e-5" in out and "1  optim.lr=2e-5" in out and "recipe=tiny_sft │" not in out


# ------------------------------------------------------------------ Slurm runs without Slurm
def test_parse_sacct_arrays_and_requeues():
    text = ("7|COMPLETED|0:0\n8|REQUEUED|0:0\n8|RUNNING|0:0\n9_0|CANCELLED by 0|0:15\n9_[1-2,5%2]|PENDING|0:0\n"
            "9_2|REQUEUED|0:0\n9_2|PENDING|0:0\n10|FAILED|75:0\n11|FAILED|1:0\n")
    infos = jobs.parse_sacct(text)
    assert {k: (v.state, v.restarts) for k, v in infos.items()} == {
        "7": ("COMPLETED", 0), "8": ("RUNNING", 1), "9_0": ("CANCELLED", 0),
        "9_1": ("PENDING", 0), "9_2": ("PENDING", 1), "9_5": ("PENDING", 0),
        "10": ("STOPPED", 0), "11": ("FAILED", 0)}


def test_cancel_record_wins_when_slurm_is_unavailable(root, capsys, monkeypatch, tmp_path):
    run = make_run(root, "big/20261124-210300", backend="slurm", jobs_=["4242"], rows=[train_row(10, 4.0)],
                   logs={0: "x WARNING launcher.backends.slurm: requeued job 4242 (restart 2 of at most 3)\n"})
    (run / "cancelled.json").write_text(json.dumps({"state": "CANCELLED", "at": "2026-11-24T22:00:00"}))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    code, out, err = sft_jobs(capsys, root, "status", "big")
    assert code == 0  # no Slurm commands here is not a Slurm failure
    assert "sacct is not on PATH" in err
    assert cells(out, "4242")[:4] == ["4242", "CANCELLED", "cancelled.json", "2"]  # requeues from the log


def test_cancel_without_scancel_exits_1(root, capsys, monkeypatch, tmp_path):
    make_run(root, "big/20261124-210300", backend="slurm", jobs_=["4242"])
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    code, _, err = sft_jobs(capsys, root, "cancel", "big")
    assert code == 1 and "`scancel 4242` failed: scancel is not on PATH" in err
    assert not (root / "big/20261124-210300/cancelled.json").exists()


# ------------------------------------------------------------------ logs, cancel of a local run
def test_logs_prints_a_rank_and_refuses_sweeps(root, capsys):
    make_run(root, "r/20261124-210300", logs={0: "rank zero\n", 1: "rank one\n"}, export=True)
    make_sweep(root, "sw/20261124-220000", [([], []), ([], [])])
    assert sft_jobs(capsys, root, "logs", "r", "--rank", "1")[1] == "rank one\n"
    code, out, err = sft_jobs(capsys, root, "logs", "r", "-f")  # the run has ended: print and return
    assert (code, out) == (0, "rank zero\n") and "COMPLETED" in err
    code, _, err = sft_jobs(capsys, root, "logs", "sw")
    assert code == 2 and "is a sweep: name one of its points" in err


def test_cancel_a_running_local_run(root, capsys):
    run = make_run(root, "r/20261124-210300")
    # Stands in for a rank: its command line names launcher.rank and the run dir, as the local backend's do.
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "launcher.rank", str(run)])
    try:
        time.sleep(0.2)
        assert cells(sft_jobs(capsys, root, "status", "r")[1], "local")[:3] == ["local", "RUNNING", "processes"]
        code, out, _ = sft_jobs(capsys, root, "cancel", "r")
        assert code == 0 and "sent SIGTERM to the 1 rank processes of r/20261124-210300" in out
        assert rank.wait(timeout=10) == -15
        assert json.loads((run / "cancelled.json").read_text())["state"] == "CANCELLED"
        assert cells(sft_jobs(capsys, root, "status", "r")[1], "local")[:3] == ["local", "CANCELLED", "cancelled.json"]
    finally:
        rank.kill()
        rank.wait()


# ------------------------------------------------------------------ report
def assert_png(path: Path, legend_beside: bool = False) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    if legend_beside:  # a sweep: the panels and, to their right, the legend
        assert image.shape[0] > 800 and image.shape[1] > 1300
    else:
        assert image.shape[:2] == (850, 1300)  # figsize 13 x 8.5 at 100 dpi
    assert image.std() > 0.05  # something was drawn


def test_report_of_a_run(root, capsys):
    run = make_run(root, "r/20261124-210300", rows=[eval_row(0, 6.0, 0.0), *(train_row(s, 6 - s / 10) for s in range(10, 60, 10)),
                                                    eval_row(50, 1.5, 0.5)])
    code, out, _ = sft_jobs(capsys, root, "report", "r")
    assert code == 0 and out.strip() == str(run / "report.png")
    assert_png(run / "report.png")


def test_report_of_a_sweep_overlays_points(root, capsys, tmp_path):
    make_sweep(root, "sw/20261124-220000", [
        (["optim.lr=1e-5"], [train_row(s, 5 - s / 20, 1e-5) for s in range(10, 60, 10)] + [eval_row(50, 3.0)]),
        (["optim.lr=2e-5"], [train_row(s, 5 - s / 15, 2e-5) for s in range(10, 60, 10)] + [eval_row(50, 2.0)]),
    ])
    out_file = tmp_path / "plots" / "sweep.png"
    code, out, _ = sft_jobs(capsys, root, "report", "sw", "--out", str(out_file))
    assert code == 0 and out.strip() == str(out_file)
    assert_png(out_file, legend_beside=True)


def test_a_sweeps_report_has_one_legend_beside_the_panels_and_single_points_show():
    from launcher.jobs.plots import draw

    series = [(f"optim.lr={i}e-5", [train_row(10, 2.0 - i / 10), train_row(20, 1.5 - i / 10), eval_row(20, 1.6)]) for i in range(12)]
    series.append(("optim.lr=9e-4", [train_row(10, 3.0)]))  # a run that logged one step so far
    fig = draw(series, "sweep")
    assert all(ax.get_legend() is None for ax in fig.axes)  # nothing drawn over the curves
    [legend] = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:13] == [label for label, _ in series] and "eval" in labels
    one_point = [line for line in fig.axes[0].lines if line.get_label() == "optim.lr=9e-4: train"]
    assert one_point and one_point[0].get_marker() == "o"


def test_report_without_metrics_still_writes_a_png(root, capsys):
    run = make_run(root, "r/20261124-210300")
    code, _, err = sft_jobs(capsys, root, "report", "r")
    assert code == 0 and "no metrics yet" in err
    assert (run / "report.png").read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------ sync
def offline_segment(run_dir: Path, stamp: str, run_id: str = "abcd1234", synced: bool = False) -> Path:
    folder = run_dir / "wandb" / f"offline-run-{stamp}-{run_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{run_id}.wandb").write_bytes(b"W&B")
    if synced:
        (folder / f"run-{run_id}.wandb.synced").write_text("")
    return folder


class FakeWandb:
    """Records the commands; marks what it uploads as `wandb beta sync` does."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd):
        self.calls.append([Path(c).name if c.startswith("/") and "offline-run" not in c else c for c in cmd])
        for arg in cmd:
            if "offline-run-" in arg:
                for f in Path(arg).glob("run-*.wandb"):
                    f.with_name(f.name + ".synced").write_text("")
        return 0


def test_sync_uploads_each_finished_segment_once_in_order(root):
    from launcher.jobs.sync import sync

    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    first = offline_segment(run, "20261124_210400", synced=True)  # uploaded by an earlier sync
    second = offline_segment(run, "20261124_220000")
    third = offline_segment(run, "20261124_220000-1")  # same second: wandb adds -1
    fourth = offline_segment(run, "20261124_230000")  # still being written
    wandb = FakeWandb()
    said = []
    assert sync([run], lambda d: True, follow=False, run=wandb, say=said.append) == 2
    assert wandb.calls == [["wandb", "beta", "sync", str(second), str(third)]]
    assert f"{fourth}: still being written (the job runs); sync it when the job ends, or use --follow" in said
    assert sync([run], lambda d: True, follow=False, run=wandb, say=said.append) == 0  # nothing twice
    assert sync([run], lambda d: False, follow=False, run=wandb, say=said.append) == 1  # the job ended
    assert wandb.calls[-1] == ["wandb", "beta", "sync", str(fourth)] and len(wandb.calls) == 2
    assert first.exists() and all(any(s.glob("*.synced")) for s in (first, second, third, fourth))


def test_sync_follow_follows_the_live_segment(root):
    from launcher.jobs.sync import sync

    run = make_run(root, "tiny_sft/20261124-210300", backend="slurm", jobs_=["4242"])
    older = offline_segment(run, "20261124_210400")
    newest = offline_segment(run, "20261124_220000")
    wandb = FakeWandb()
    assert sync([run], lambda d: False, follow=True, run=wandb, say=lambda t: None) == 2  # job ended: both, plainly
    assert wandb.calls == [["wandb", "beta", "sync", str(older), str(newest)]]
    run2 = make_run(root, "tiny_sft/20261124-210301", backend="slurm", jobs_=["4243"])
    newest2 = offline_segment(run2, "20261124_220000")
    wandb2, alive = FakeWandb(), iter([True, False])
    assert sync([run2], lambda d: next(alive), follow=True, run=wandb2, say=lambda t: None, poll_s=0) == 1
    assert wandb2.calls == [["wandb", "beta", "sync", "--live", str(newest2)]]


def test_squeue_gives_the_reason_a_job_waits():
    from launcher.backends.slurm_queue import parse_squeue

    infos = parse_squeue("5|PENDING|ReqNodeNotAvail, UnavailableNodes:node1\n6|RUNNING|None\n7|PENDING|None\n")
    assert {k: v.state for k, v in infos.items()} == {
        "5": "PENDING (ReqNodeNotAvail, UnavailableNodes:node1)", "6": "RUNNING", "7": "PENDING"}


def test_status_warns_when_packages_changed_since_the_first_submission(root, capsys):
    run = make_run(root, "tiny_sft/20261124-210300")
    submission = json.loads((run / "submission.json").read_text())
    first = {"launcher": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"}
    (run / "submission.json").write_text(json.dumps({**submission, "first_versions": first, "versions": first}))
    assert jobs.main(["status", "tiny", "--runs-root", str(root)]) == 0
    assert "packages" not in capsys.readouterr().out
    now = {**first, "transformers": "5.25.0", "launcher": "0.2.0"}  # the launcher's own version: the fingerprint's concern
    (run / "submission.json").write_text(json.dumps({**submission, "first_versions": first, "versions": now}))
    assert jobs.main(["status", "tiny", "--runs-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "packages   changed since the first submission: transformers 5.24.0 -> 5.25.0\n" in out
