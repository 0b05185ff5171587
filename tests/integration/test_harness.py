"""eval.harness on the local backend: real lm-evaluation-harness scores each checkpoint's exported
model after training, into evals/step-N/ and the run's own W&B run; the score on export/ equals
lm-eval's own CLI run by hand; a task that needs the Hub is refused before anything starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_sft
from tests.utils.wandb_file import read_run

LM_EVAL = str(Path(sys.executable).with_name("lm-eval"))
HARNESS = ["eval.harness.tasks=[tiny_tasks,tiny_tasks_ll]", "eval.harness.limit=32", "eval.harness.batch_size=8"]
RUN = ["recipe=tiny_sft", "trainer.max_steps=24", "trainer.log_every=4", "trainer.micro_batch_size=4",
       "trainer.global_batch_size=16", "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0",
       "eval.max_batches=2", "checkpoint.every_steps=12", "eval.harness.every_checkpoint=true", *HARNESS]


def summary(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "evals" / f"step-{step:06d}" / "summary.json").read_text())


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    run_dir = tmp / "run"
    result = run_sft([*RUN, f"run_dir={run_dir}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_each_checkpoint_is_scored_after_training_into_its_evals_folder(harness_run):
    run_dir, result = harness_run
    first, last = summary(run_dir, 12), summary(run_dir, 24)
    keys = {"harness/tiny_tasks/exact_match", "harness/tiny_tasks_ll/perplexity", "harness/tiny_tasks_ll/acc"}
    assert set(first["scores"]) == set(last["scores"]) == keys
    # The answers' perplexity falls as the model trains (lm-eval says lower is better).
    results = json.loads((run_dir / "evals" / "step-000024" / "results.json").read_text())
    assert results["higher_is_better"]["tiny_tasks_ll"]["perplexity"] is False
    assert last["scores"]["harness/tiny_tasks_ll/perplexity"] < first["scores"]["harness/tiny_tasks_ll/perplexity"]
    assert results["n-samples"]["tiny_tasks"]["effective"] == 32 and "samples" not in results
    # The last step scores export/; an earlier checkpoint's own copy is deleted once scored.
    assert last["model"] == str(run_dir / "export") and first["model"] == str(run_dir / "evals" / "step-000012" / "model")
    assert not (run_dir / "evals" / "step-000012" / "model").exists()
    for step in (12, 24):
        line = (run_dir / "evals" / f"step-{step:06d}" / "summary.txt").read_text().strip()
        assert line.startswith(f"step {step}: tiny_tasks/exact_match ") and line in result.stderr


def test_the_scores_are_in_the_runs_wandb_run_at_their_steps(harness_run):
    run_dir, _ = harness_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    for step in (12, 24):
        [path] = (run_dir / "evals" / f"step-{step:06d}" / "wandb").glob("offline-run-*/run-*.wandb")
        run = read_run(path)
        assert run["run_id"] == run_id and run["exit_code"] == 0
        [row] = [r for r in run["history"] if "harness/tiny_tasks/exact_match" in r]
        assert row["trainer/global_step"] == step
        assert {k: row[k] for k in summary(run_dir, step)["scores"]} == summary(run_dir, step)["scores"]


def test_the_final_score_equals_lm_evals_own_cli_on_the_export(harness_run, tmp_path):
    run_dir, _ = harness_run
    out = tmp_path / "by_hand"
    cli = subprocess.run([LM_EVAL, "run", "--model", "hf", "--model_args", f"pretrained={run_dir / 'export'},dtype=auto",
                          "--tasks", "tiny_tasks,tiny_tasks_ll", "--include_path", str(run_dir / "evals" / "tasks"),
                          "--limit", "32", "--batch_size", "8", "--device", "cpu", "--output_path", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    by_hand = json.loads(results_file.read_text())["results"]
    ours = summary(run_dir, 24)["scores"]
    assert ours["harness/tiny_tasks/exact_match"] == by_hand["tiny_tasks"]["exact_match,none"]
    assert ours["harness/tiny_tasks_ll/perplexity"] == by_hand["tiny_tasks_ll"]["perplexity,none"]
    assert ours["harness/tiny_tasks_ll/acc"] == by_hand["tiny_tasks_ll"]["acc,none"]


def test_a_task_whose_data_is_on_the_hub_is_refused_before_anything_starts(tmp_path):
    result = run_sft(["recipe=tiny_sft", "eval.harness.tasks=[arc_easy]", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "eval.harness.tasks" in result.stderr and "task 'arc_easy'" in result.stderr
    assert "dataset_path: allenai/ai2_arc" in result.stderr and "dataset_path: json" in result.stderr
    assert "eval.harness.allow_hub=true" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_dry_run_says_what_will_be_scored_and_where(tmp_path):
    result = run_sft(["recipe=tiny_sft", "dry_run=true", "eval.harness.tasks=[tiny_tasks]", "eval.harness.every_checkpoint=true"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("benchmark evals (lm-eval): tiny_tasks on the final export and 2 checkpoint(s) (steps 100, 200); "
            "after training, in this command") in result.stdout
