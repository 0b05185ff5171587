"""The `sft` command on the config tree: every recipe dry-runs, bad input is named and nothing is written."""

import json

import pytest

from tests.conftest import RECIPES, run_sft


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_dry_runs(recipe, tmp_path):
    result = run_sft([f"recipe={recipe}", "dry_run=true", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Plan" in result.stdout and "world size" in result.stdout
    assert '"zero_optimization"' in result.stdout
    assert "dry run: nothing written" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_typo_in_override_names_the_nearest_keys(tmp_path):
    result = run_sft(["optim.lrr=1e-4", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2
    assert "optim.lrr: unknown key; did you mean optim.lr?" in result.stderr
    assert "valid keys of optim: name, lr, weight_decay" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_input_writes_nothing(tmp_path):
    result = run_sft(["optim.lr=-1", "deepspeed.stage=7", "data.seq_len=9999", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2
    for text in ("optim.lr=-1.0: must be > 0", "deepspeed.stage=7", "data.seq_len=9999"):
        assert text in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_deepspeed_json(tmp_path):
    result = run_sft(["dry_run=true", "deepspeed=zero2", "trainer.precision=bf16"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ds_text = result.stdout.split("DeepSpeed config")[1]
    ds_json = json.loads(ds_text[ds_text.index("{"):ds_text.rindex("}") + 1])
    assert ds_json["zero_optimization"]["stage"] == 2 and ds_json["bf16"]["enabled"] is True
    assert ds_json["train_batch_size"] == 32


def test_dry_run_says_what_will_be_compiled(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "COLUMNS": "250", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks
    result = run_sft(["dry_run=true", "optim.name=cpu_adam", "deepspeed=zero3_offload"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if "compiled ops" in line]
    assert ("deepspeed_shm_comm (compiled on first use, once per node, 20-40 s); "
            "cpu_adam (compiled on first use, once per node, 20-40 s)") in row
