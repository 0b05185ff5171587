"""A search run in the foreground (cluster=local): real trials judged at their rungs through the
study, W&B offline runs read back from their files, and the errors a search gives before and
during its first rung."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from launcher.rendezvous import MASTER_PORT_RANGE
from tests.conftest import SFT, run_sft
from tests.utils.ports import held_ports
from tests.utils.wandb_file import find_runs, read_run

# One rank, a few steps; eval only where the rungs ask for it.
BASE = ["-m", "hydra/sweeper=search", "recipe=tiny_sft", "cluster.procs_per_node=1", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8", "trainer.log_every=2", "optim.warmup_steps=1", "eval.every_steps=0",
        "eval.generate_samples=0", "eval.max_batches=2", "checkpoint.every_steps=0",
        "checkpoint.export=false"]


def sweep_dir_of(stdout: str) -> Path:
    return Path(stdout.split("sweep directory: ")[1].split()[0])


def test_a_local_search_prunes_a_trial_and_tags_it_in_wandb(tmp_path):
    # Seeded sampler: trial 0 draws lr ~0.013, trial 1 ~0.7. Both wait at step 2 (fewer than
    # `reduction` trials there); with nothing left to start, the better (0) goes on and 1 is pruned.
    result = run_sft([*BASE, "trainer.max_steps=6", "sweep.rungs=[2,6]", "sweep.trials=2", "sweep.sampler_seed=42",
                      "optim.lr=tag(log,interval(1e-3,1.0))", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(result.stdout)
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [(r[0], r[2], r[4]) for r in rows] == [("0", "6", "completed"), ("1", "2", "pruned")], result.stdout
    assert "best: trial 0" in result.stdout

    runs = {n: read_run(find_runs(sweep_dir / str(n))[-1]) for n in (0, 1)}  # the newest segment
    group = f"{sweep_dir.parent.name}/{sweep_dir.name}"
    assert {r["group"] for r in runs.values()} == {group}
    assert "pruned" in runs[1]["tags"] and "trial:1" in runs[1]["tags"]
    assert runs[1]["summary"]["end_reason"] == "pruned" and runs[1]["summary"]["stopped_at_rung"] == 2
    assert "pruned" not in runs[0]["tags"] and runs[0]["summary"]["end_reason"] == "completed"
    assert max(row["_step"] for row in runs[1]["history"]) == 2


def test_a_trial_whose_ranks_cannot_meet_is_started_again_and_the_reason_is_on_the_leaderboard(tmp_path):
    # Every port of the configured rendezvous range is held until the first start has failed on it.
    with held_ports(MASTER_PORT_RANGE) as port:
        search = subprocess.Popen([SFT, *BASE, "tracking=none", "trainer.max_steps=2", "sweep.rungs=[2]", "sweep.trials=1",
                                   "optim.lr=tag(log,interval(1e-4,1e-2))", f"cluster.master_port={port}",
                                   f"runs_root={tmp_path}/runs"], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not any("are all in use" in log.read_text() for log in tmp_path.glob("runs/tiny_sft/*/0/logs/rank-0.log")):
            assert search.poll() is None and time.monotonic() < deadline, search.communicate()
            time.sleep(0.1)
    stdout, stderr = search.communicate(timeout=600)
    assert search.returncode == 0, stderr[-3000:]
    failure = (f"cluster.master_port={port}: ports {port}-{port + MASTER_PORT_RANGE - 1} are all in use on 127.0.0.1; "
               "pick another range, or leave cluster.master_port unset (null) to take a port the OS gives")
    assert "trial 0 ended FAILED, not of its own doing (" + failure + "): submitting it again (1 of 2)" in stderr
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in stdout.splitlines() if line.startswith("│")]
    assert [(r[0], r[2], r[4]) for r in rows] == [("0", "2", "completed, started 2x")], stdout
    assert f"trial 0: a start failed: {failure}" in " ".join(stdout.split())
    run_dir = sweep_dir_of(stdout) / "0"
    assert json.loads((run_dir / "trial.json").read_text())["start_failures"] == [failure]
    assert json.loads((run_dir / "rendezvous.json").read_text())["port"] == port  # free again: the first of the range
    assert not (run_dir / "start_failed.json").exists()


def test_a_metric_no_trial_logs_fails_the_search_at_the_first_rung(tmp_path):
    result = run_sft([*BASE, "tracking=none", "trainer.max_steps=4", "sweep.rungs=[2,4]", "sweep.trials=3",
                      "sweep.metric=eval/accuracy", "optim.lr=tag(log,interval(1e-4,1e-2))",
                      f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 1
    text = " ".join((result.stdout + result.stderr).split())
    assert ("sweep.metric='eval/accuracy': the trial logged no 'accuracy' in its 'eval' rows at rung step 2; "
            "it logged eval: loss, perplexity; train:") in text
    sweep_dir = sweep_dir_of(result.stdout)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0"]  # no second trial


@pytest.mark.parametrize("overrides,message", [
    (["trainer.global_batch_size=choice(8,12)"],
     "the search space holds an invalid point: optim.lr=0.0001 trainer.global_batch_size=12"),
    (["sweep.rungs=[2,40]"], "sweep.rungs=[2, 40]: the last rung is past the trials' end (step 4)"),
    (["data.eval_files=null"], "sweep.metric='eval/loss': the trials have no eval set"),
    (["model=choice(tiny,tiny)"], "model='choice(tiny,tiny)': a search covers plain config keys"),
    (["trainer.max_steps=choice(4,6)", "sweep.rungs=[2,4]"],
     "the space's points train different numbers of steps (4, 6), so their rungs would not compare equal budgets"),
    (["trainer.global_batch_size=interval(8,16)"],
     "invalid point: optim.lr=0.0001 trainer.global_batch_size=8.0: trainer.global_batch_size=8.0: the schema refuses it"),
    (["resume=never"], "resume='never': a search starts each trial afresh"),
])
def test_a_bad_space_is_refused_before_anything_is_written(tmp_path, overrides, message):
    result = run_sft([*BASE, "tracking=none", "trainer.max_steps=4",
                      "optim.lr=tag(log,interval(1e-4,1e-2))", f"runs_root={tmp_path}/runs", *overrides], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists()


def test_a_controller_requeued_during_prepare_leaves_its_trial_running_and_submits_it_once_when_started_again(
        tmp_path, monkeypatch):
    """submitit's USR2 handler requeues the controller and raises SystemExit(-1): when that lands
    inside a trial's `prepare` (which reads every data row), the trial is not a failed point. A
    real signal, delivered in the real prepare, to a handler that does what submitit's does."""
    import signal

    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    import launcher.service
    from launcher.sweep.controller import Controller
    from launcher.trial.space import split_overrides
    from launcher.trial.study import BASE_FILE, SearchSpec, open_study, trial_dir
    from tests.conftest import compose_config

    fixed, dims = split_overrides([*BASE[2:], "tracking=none", "trainer.max_steps=2", "optim.lr=tag(log,interval(1e-4,1e-2))",
                                   f"runs_root={tmp_path}/runs"])
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / BASE_FILE).write_text(OmegaConf.to_yaml(compose_config(fixed)))
    spec = SearchSpec(dims=dims, fixed=fixed, trials=1, parallel=1, metric="eval/loss", direction="minimize", rungs=[2],
                      reduction=3, sampler_seed=42, poll_s=1.0, backend="local", name="tiny_sft")
    spec.save(sweep_dir)
    open_study(sweep_dir, spec, create=True)

    real_prepare = launcher.service.prepare

    def prepare_under_a_time_limit(cfg):
        os.kill(os.getpid(), signal.SIGUSR2)  # Slurm's warning, in the middle of the prepare
        return real_prepare(cfg)

    def submitit_requeues(signum, frame):
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_requeues)
    monkeypatch.setattr(launcher.service, "prepare", prepare_under_a_time_limit)
    try:
        with pytest.raises(SystemExit):
            Controller(sweep_dir).run()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        monkeypatch.setattr(launcher.service, "prepare", real_prepare)
    [trial] = open_study(sweep_dir, spec).get_trials(deepcopy=False)
    assert trial.state == TrialState.RUNNING  # not FAILED: the exit was the controller's own
    assert not (trial_dir(sweep_dir, 0) / "submission.json").exists()

    assert Controller(sweep_dir).run() == 0  # the requeued controller: the same trial, started once
    [trial] = open_study(sweep_dir, spec).get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE
    rows = [json.loads(line) for line in (trial_dir(sweep_dir, 0) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2]  # log_every=2
    assert (trial_dir(sweep_dir, 0) / "logs" / "rank-0.log").read_text().count(" in total") == 1  # one start
