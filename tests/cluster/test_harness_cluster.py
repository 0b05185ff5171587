"""eval.harness on the local Slurm cluster: rank 0 submits one lm-eval job per saved checkpoint (and
the final export), each in its own allocation; the scores land in evals/step-N/ and in the run's W&B
run at those steps; an eval job that fails leaves the training COMPLETED and says so."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.backends.slurm_eval import submit_eval
from tests.conftest import SFT_JOBS
from tests.utils.wandb_file import read_run
from tests.cluster.test_slurm_backend import SLURM, TINY, restarts, submit, wait_for_line, wait_for_state

pytestmark = pytest.mark.slurm

EVAL_JOBS = ["eval.harness.gpus=0", "eval.harness.cpus=1", "eval.harness.time_min=10", "eval.harness.limit=32"]
STEPS = (8, 16)


def eval_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "evals" / f"step-{step:06d}"


def eval_job(run_dir: Path, step: int) -> str:
    return json.loads((eval_folder(run_dir, step) / "job.json").read_text())["job_id"]


@pytest.fixture(scope="module")
def eval_runs(slurm_cluster, tmp_path_factory):
    """Two runs at once: one scored at every checkpoint, one whose eval job fails (its task's data
    file is deleted once the run is submitted: checked at submission, gone when the eval starts)."""
    tmp = tmp_path_factory.mktemp("harness")
    scored = submit(tmp, [*TINY, *SLURM, "trainer.max_steps=16", "checkpoint.every_steps=8", *EVAL_JOBS,
                          "eval.harness.tasks=[tiny_tasks_ll]", "eval.harness.every_checkpoint=true"], "scored")
    data = tmp / "broken.jsonl"
    data.write_text(json.dumps({"prompt": "add 1 1", "answer": "2"}) + "\n")
    task = tmp / "broken_task.yaml"
    task.write_text(yaml.safe_dump({
        "task": "broken_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}]}))
    broken = submit(tmp, [*TINY, *SLURM, "trainer.max_steps=4", *EVAL_JOBS, f"eval.harness.tasks=[{task}]"], "broken")
    data.unlink()
    return scored, broken


def test_each_checkpoint_gets_one_eval_job_whose_scores_improve(eval_runs):
    (run_dir, job_id), _ = eval_runs
    # The first eval job is preempted as Slurm warns a job (USR2) once lm-eval runs: it is requeued.
    wait_for_line(eval_folder(run_dir, 8) / "eval.log", "Running loglikelihood requests")
    subprocess.run(["scancel", "--signal=USR2", eval_job(run_dir, 8)], check=True)
    assert wait_for_state(job_id) == "COMPLETED"
    jobs = [eval_job(run_dir, step) for step in STEPS]
    assert len(set(jobs)) == 2 and job_id not in jobs
    assert [wait_for_state(j, timeout=300) for j in jobs] == ["COMPLETED"] * 2
    log = (eval_folder(run_dir, 8) / "eval.log").read_text()
    # The requeued job evaluates again, or (the USR2 came after the summary) finds the step scored.
    assert restarts(jobs[0]) == 1 and (log.count("Running loglikelihood") == 2 or "step 8 is scored already" in log)
    scores = [json.loads((eval_folder(run_dir, s) / "summary.json").read_text())["scores"] for s in STEPS]
    perplexity = [s["harness/tiny_tasks_ll/perplexity"] for s in scores]
    assert perplexity[0] > perplexity[1], perplexity  # lower is better (lm-eval's higher_is_better)
    results = json.loads((eval_folder(run_dir, 16) / "results.json").read_text())
    assert results["higher_is_better"]["tiny_tasks_ll"]["perplexity"] is False
    # A second eval of a checkpoint whose eval is done is not submitted.
    assert submit_eval(run_dir, 16) is None and eval_job(run_dir, 16) == jobs[1]
    status = subprocess.run([SFT_JOBS, "status", str(run_dir)], capture_output=True, text=True)
    for step in STEPS:
        assert f"eval step {step}: done" in status.stdout, status.stdout + status.stderr


def test_the_scores_are_in_the_runs_wandb_run_at_their_steps(eval_runs):
    (run_dir, job_id), _ = eval_runs
    wait_for_state(job_id)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    for step in STEPS:
        wait_for_state(eval_job(run_dir, step), timeout=300)
        [path] = (eval_folder(run_dir, step) / "wandb").glob("offline-run-*/run-*.wandb")
        run = read_run(path)
        [row] = [r for r in run["history"] if "harness/tiny_tasks_ll/perplexity" in r]
        assert run["run_id"] == run_id and row["trainer/global_step"] == step
        summary = json.loads((eval_folder(run_dir, step) / "summary.json").read_text())
        assert row["harness/tiny_tasks_ll/perplexity"] == summary["scores"]["harness/tiny_tasks_ll/perplexity"]


def test_a_failed_eval_job_leaves_the_run_completed_and_status_names_it(eval_runs):
    _, (run_dir, job_id) = eval_runs
    assert wait_for_state(job_id) == "COMPLETED"
    assert wait_for_state(eval_job(run_dir, 4), timeout=300) == "FAILED"
    failed = json.loads((eval_folder(run_dir, 4) / "failed.json").read_text())
    assert "broken.jsonl" in failed["error"] and Path(failed["log"]).is_file()
    status = subprocess.run([SFT_JOBS, "status", str(run_dir)], capture_output=True, text=True)
    assert "COMPLETED" in status.stdout and "eval step 4: FAILED" in status.stdout, status.stdout + status.stderr
    assert failed["log"] in status.stdout
