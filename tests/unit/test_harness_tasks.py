"""eval.harness's checks before submission (launcher.harness_tasks, launcher.validate) and the evals/
files' readers (launcher.harness_results): pure logic over lm-eval's own task YAMLs on disk."""

import json

import pytest
import yaml

from launcher import harness_results as files
from launcher.errors import ConfigError
from launcher.harness_tasks import check_tasks, read_task_yaml, task_names
from launcher.validate import check_config


def write_task(path, **fields):
    path.write_text(yaml.safe_dump({"task": path.stem, "output_type": "loglikelihood", **fields}))
    return path


def test_bundled_tasks_pass_and_unknown_names_are_refused_naming_what_is_valid():
    assert check_tasks(["tiny_tasks", "tiny_tasks_ll"], allow_hub=False) == []
    [found] = check_tasks(["no_such_task_anywhere"], allow_hub=False)
    assert "'no_such_task_anywhere' is neither bundled (tiny_tasks, tiny_tasks_ll)" in found and "lm-eval's registry" in found


@pytest.mark.parametrize("task, source", [("arc_easy", "allenai/ai2_arc"), ("gsm8k", "openai/gsm8k")])
def test_a_registered_task_on_the_hub_is_refused_with_the_fix_unless_the_hub_is_allowed(task, source):
    [found] = check_tasks([task], allow_hub=False)
    assert f"task {task!r}" in found and f"dataset_path: {source}" in found
    assert "dataset_path: json" in found and "eval.harness.allow_hub=true" in found
    assert check_tasks([task], allow_hub=True) == []


def test_a_task_yaml_with_local_data_passes_and_one_whose_file_is_missing_is_named(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"q": "a", "a": "b"}\n')
    good = write_task(tmp_path / "local_qa.yaml", dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}})
    assert check_tasks([str(good)], allow_hub=False) == []
    assert task_names([str(good)]) == ["local_qa"]
    gone = write_task(tmp_path / "gone.yaml", dataset_path="json", dataset_kwargs={"data_files": [str(tmp_path / "nope.jsonl")]})
    [found] = check_tasks([str(gone)], allow_hub=False)
    assert "nope.jsonl" in found and "does not exist" in found
    [found] = check_tasks([str(tmp_path / "absent.yaml")], allow_hub=False)
    assert "absent.yaml" in found and "does not exist" in found


def test_an_include_chain_is_followed_to_its_hub_dataset_and_function_tags_are_not_run(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("dataset_path: cais/mmlu\nprocess_docs: !function utils.process_docs\noutput_type: multiple_choice\n")
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\ntask: child_task\n")
    assert read_task_yaml(child)["dataset_path"] == "cais/mmlu" and read_task_yaml(child)["task"] == "child_task"
    [found] = check_tasks([str(child)], allow_hub=False)
    assert "task 'child_task'" in found and "dataset_path: cais/mmlu" in found


def test_validation_names_each_harness_key_before_anything_starts(compose_cfg):
    cfg = compose_cfg(["eval.harness.tasks=[tiny_tasks,arc_easy]", "checkpoint.export=false", "eval.harness.every_checkpoint=true",
                       "checkpoint.every_steps=0", "eval.harness.limit=0", "eval.harness.gpus=-1"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = "\n".join(info.value.problems)
    [task_problem] = [p for p in info.value.problems if "task '" in p]  # the bundled task is fine
    assert task_problem.startswith("eval.harness.tasks=") and "task 'arc_easy'" in task_problem
    for key in ("checkpoint.export", "eval.harness.every_checkpoint", "eval.harness.limit", "eval.harness.gpus"):
        assert key in text, key
    check_config(compose_cfg(["eval.harness.tasks=[tiny_tasks]"]))  # the bundled task alone passes


def test_scores_are_lm_evals_metrics_as_harness_keys_without_stderrs():
    results = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                                      "exact_match,flexible-extract": 0.6},
                           "tiny_tasks": {"name": "tiny_tasks", "sample_len": 32, "exact_match,none": 0.25}}}
    assert files.scores_of(results) == {"harness/gsm8k/exact_match/strict-match": 0.5,
                                        "harness/gsm8k/exact_match/flexible-extract": 0.6,
                                        "harness/tiny_tasks/exact_match": 0.25}


def test_an_evals_state_follows_its_files(tmp_path):
    folder = files.step_dir(tmp_path, 100)
    assert folder.name == "step-000100" and files.eval_states(tmp_path) == []
    files.mark_ready(tmp_path, 100, tmp_path / "model")
    assert [(s.step, s.state) for s in files.eval_states(tmp_path)] == [(100, "ready")]
    files.write_json(folder / files.JOB, {"job_id": "7", "step": 100})
    assert files.read_state(folder).state == "queued" and files.read_state(folder).job_id == "7"
    files.write_json(folder / files.FAILED, {"step": 100, "error": "boom", "log": "x.log"})
    assert files.read_state(folder).state == "failed" and files.read_state(folder).error == "boom"
    files.write_json(folder / files.SUMMARY, {"step": 100, "scores": {"harness/t/acc": 0.5}})
    assert files.harness_scores(tmp_path) == {100: {"harness/t/acc": 0.5}}
    assert files.final_score(tmp_path, "harness/t/acc", 100) == 0.5 and files.final_score(tmp_path, "harness/t/acc", 200) is None


def test_a_done_eval_is_not_submitted_again(tmp_path):
    from launcher.backends.slurm_eval import submit_eval

    files.write_json(files.step_dir(tmp_path, 5) / files.SUMMARY, {"step": 5, "scores": {"harness/t/acc": 1.0}})
    assert submit_eval(tmp_path, 5) is None  # returns before it would read the config or call sbatch
    assert json.loads((files.step_dir(tmp_path, 5) / files.SUMMARY).read_text())["scores"] == {"harness/t/acc": 1.0}


def test_the_final_step_is_where_the_run_completed_not_the_plans_estimate(tmp_path):
    from launcher import rundir

    (tmp_path / "plan.json").write_text(json.dumps({"total_steps": 9}))  # an epoch-based estimate from raw rows
    assert files.final_step(tmp_path) == 9
    rundir.append_event(tmp_path, rundir.STARTED, rank=0, total_steps=7)  # the trainer's count once tokenised
    assert files.final_step(tmp_path) == 7
    rundir.append_event(tmp_path, rundir.COMPLETED, step=7)
    assert files.final_step(tmp_path) == 7


def test_eval_jobs_resources_are_checked_against_their_partition_before_submission(compose_cfg):
    """A typo in eval.harness's job resources is refused with the training's partition check, not found
    when the first checkpoint's eval job is submitted."""
    from launcher.backends.slurm_partitions import Partition, check_eval_partition

    parts = [Partition("cpu", True, 60, 2, None, 0, 4), Partition("gpu", False, None, 2, None, 8, 64)]
    assert check_eval_partition(compose_cfg(["cluster=slurm"]), parts) is None  # no tasks: no eval jobs
    scored = ["cluster=slurm", "eval.harness.tasks=[tiny_tasks]"]
    with pytest.raises(ConfigError) as error:
        check_eval_partition(compose_cfg([*scored, "eval.harness.time_min=90", "eval.harness.cpus=8"]), parts)
    assert [str(p) for p in error.value.problems] == [
        "eval.harness.time_min=90: must be <= partition cpu's MaxTime (60 min)",
        "eval.harness.gpus=1: must be <= the 0 GPUs per node of partition cpu (0: score on CPUs)",
        "eval.harness.cpus=8: must be <= the 4 CPUs per node of partition cpu"]
    with pytest.raises(ConfigError) as error:
        check_eval_partition(compose_cfg([*scored, "eval.harness.partition=gpus"]), parts)
    assert [str(p) for p in error.value.problems] == ["eval.harness.partition='gpus': no such partition; valid: cpu, gpu"]
    assert check_eval_partition(compose_cfg([*scored, "eval.harness.partition=gpu", "eval.harness.time_min=600"]), parts).name == "gpu"
    assert check_eval_partition(compose_cfg([*scored, "eval.harness.gpus=0"]), parts).name == "cpu"  # cluster.partition's default


def test_preflight_names_a_bad_partition_once_for_the_training_and_its_evals(compose_cfg, monkeypatch):
    from launcher.backends import slurm as backend
    from launcher.backends.slurm_partitions import Partition

    parts = (Partition("cpu", True, 60, 2, None, 0, 4),)
    monkeypatch.setattr(backend, "read_partitions", lambda: parts)
    with pytest.raises(ConfigError) as error:
        backend.preflight(compose_cfg(["cluster=slurm", "cluster.partition=cpus", "eval.harness.tasks=[tiny_tasks]"]))
    assert error.value.problems == ["cluster.partition='cpus': no such partition; valid: cpu"]
    with pytest.raises(ConfigError) as error:  # each check's own problems, together
        backend.preflight(compose_cfg(["cluster=slurm", "cluster.partition=cpu", "cluster.gpus_per_node=0",
                                       "cluster.time_min=90", "cluster.cpus_per_task=1", "cluster.procs_per_node=1",
                                       "eval.harness.tasks=[tiny_tasks]", "eval.harness.gpus=0",
                                       "eval.harness.time_min=120"]))
    assert [p.split(":")[0] for p in error.value.problems] == ["cluster.time_min=90", "eval.harness.time_min=120"]
