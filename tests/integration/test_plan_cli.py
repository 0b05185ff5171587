"""The plan as the `sft` command prints it: the fit verdict's refusal and its override, a real recipe's dry run, and
what a dry run imports."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_sft


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    result = run_sft(["cluster.gpu_mem_gib=0.1", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr
    assert "cluster.gpu_mem_gib=0.1: the run does not fit: the plan predicts" in message
    assert "0.09 GiB is usable" in message and "plan.force=true" in message
    assert "model states" in message and "activations" in message
    assert not (tmp_path / "runs").exists()


def test_forcing_a_run_that_does_not_fit_passes_the_check(tmp_path):
    warned = run_sft(["cluster.gpu_mem_gib=0.1", "dry_run=true"], cwd=tmp_path)
    forced = run_sft(["cluster.gpu_mem_gib=0.1", "plan.force=true", "dry_run=true"], cwd=tmp_path)
    assert warned.returncode == forced.returncode == 0, forced.stderr
    assert "a real run would stop here" in warned.stderr and "the run does not fit" in warned.stderr
    assert "DOES NOT FIT" in forced.stdout and "the run does not fit" not in forced.stderr


def test_dry_run_of_the_8b_recipe_prints_every_prediction(tmp_path):
    result = run_sft(["recipe=llama3_8b_sft", "cluster.gpu=h100", "dry_run=true", "plan.scaling=true", "plan.max_nodes=4"],
                     cwd=tmp_path, env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("peak memory per GPU", "model states", "ZeRO buffers", "activations", "loss logits (chunks of 1024 tokens)",
                 "fits (", "communication per step", "step time (at best)", "MFU ceiling", "checkpoint size",
                 "stop window", "needs ", "Scaling (same global batch)"):
        assert text in out, text
    rows = [line for line in out.splitlines() if line.startswith("│") and line.split("│")[1].strip() in ("1", "2", "4")]
    assert [r.split("│")[1].strip() for r in rows] == ["1", "2", "4"]


@pytest.mark.parametrize("recipe", ["llama3_8b_sft", "tiny_sft"])
def test_a_dry_run_imports_neither_torch_nor_transformers(recipe, tmp_path):
    """What made the plan slow (4.6 s): counting parameters through torch and transformers."""
    from launcher import bundled
    from launcher.devices import local_gpu_count

    if recipe == "tiny_sft" and local_gpu_count():
        pytest.skip("a local run on a GPU machine asks torch for its devices")
    bundled.resolve("bundled://tiny-llama")  # built once per cache (with torch); read from then on
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher.cli", f"recipe={recipe}", "dry_run=true"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "launcher.plan.memory" in imported
    assert not imported & {"torch", "transformers", "deepspeed", "datasets"}
