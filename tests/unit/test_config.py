"""The config tree, schema and cross-field checks: recipes compose, bad input is named (the `sft` command on
them: tests/integration/test_config_cli.py)."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from launcher.errors import ConfigError
from launcher.overrides import override_problems
from launcher.facts import find
from launcher.plan import batch_math, make_plan
from launcher.validate import check_config
from tests.conftest import RECIPES, compose_config


def test_recipes_exist():
    assert {"tiny_sft", "llama3_8b_sft", "qwen2_5_7b_sft", "llama3_70b_sft"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_opens_with_the_command_that_runs_it(recipe):
    from tests.conftest import REPO

    text = (REPO / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"sft recipe={recipe}" in text.split("defaults:")[0]


def test_recipe_selects_its_groups():
    cfg = compose_config(["recipe=llama3_70b_sft"])
    assert cfg.model.path == "meta-llama/Llama-3.1-70B-Instruct"
    assert cfg.cluster.backend == "slurm" and cfg.cluster.nodes == 8
    assert cfg.deepspeed.stage == 3 and cfg.trainer.precision == "bf16"


def test_schema_rejects_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigCompositionException, match="optim.lr=fast") as info:
        compose_config(["optim.lr=fast"])
    assert "'fast' of type 'str' could not be converted to Float\n    full_key: optim.lr" in str(info.value.__cause__)
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["optim.lrr=1e-4"])
    assert "Key 'lrr' not in 'OptimConfig'" in str(info.value.__cause__)


def test_adding_keys_is_allowed_only_in_free_form_dicts():
    assert override_problems(["+deepspeed.extra.zero_optimization.round_robin_gradients=true", "++cluster.sbatch_extra.gres=gpu:8"]) == []
    assert "did you mean optim.lr?" in override_problems(["+optim.lrr=1"])[0]
    assert "did you mean trainer.max_steps," in override_problems(["trainer.max_step=1"])[0]
    assert override_problems(["model=llama3_8b", "recipe=tiny_sft", "hydra/launcher=basic", "~tracking.entity"]) == []


def problems_of(overrides):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.global_batch_size=33"], "trainer.global_batch_size=33: must be a positive multiple of micro_batch_size x data-parallel ranks = 8 x 2 = 16 (e.g. 32)"),
        (["trainer.global_batch_size=64", "trainer.grad_accum_steps=3"], "trainer.global_batch_size=64: must equal micro_batch_size x data-parallel ranks x grad_accum_steps = 8 x 2 x 3 = 48"),
        (["data.seq_len=4096"], "data.seq_len=4096: must be <= the model's max_position_embeddings (1024)"),
        (["deepspeed.stage=4"], "deepspeed.stage=4: must be a ZeRO stage 0, 1, 2 or 3"),
        (["deepspeed=zero2", "deepspeed.offload_param=cpu"], "deepspeed.offload_param='cpu': needs deepspeed.stage=3 (is 2); use none"),
        (["deepspeed.stage=0", "deepspeed.offload_optimizer=cpu"], "deepspeed.offload_optimizer='cpu': needs deepspeed.stage >= 1"),
        (["deepspeed.offload_param=nvme"], "deepspeed.nvme_path=None: must name a local NVMe directory"),
        (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
        (["optim.warmup_steps=301"], "optim.warmup_steps=301: must be <= total steps (300)"),
        (["trainer.max_steps=null", "optim.warmup_steps=100"], "optim.warmup_steps=100: must be <= total steps (63)"),
        (["model.path=/nonexistent/model"], "model.path='/nonexistent/model': no such directory"),
        (["data.train_files=/nonexistent/*.jsonl"], "data.train_files='/nonexistent/*.jsonl': matches no file"),
        (["cluster.nodes=2"], "cluster.nodes=2: must be 1 with cluster=local; use cluster=slurm"),
        (["cluster.master_port=29"], "cluster.master_port=29: must be in 1024..65472 (the first of 64 ports tried in turn), or null for a port the OS gives"),
        (["cluster.master_port=65500"], "cluster.master_port=65500: must be in 1024..65472"),
        (["resume=/no/such/ckpt"], "resume='/no/such/ckpt': must be auto, never or a complete checkpoint directory (with its COMPLETE marker)"),
        (["deepspeed=zero3_offload"], "optim.name='adamw': must be cpu_adam with deepspeed.offload_optimizer=cpu"),
    ],
)
def test_bad_input_is_named(overrides, message):
    assert message in problems_of(overrides)


def test_online_tracking_without_a_key_fails_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    assert "tracking.mode='online': no W&B API key found" in problems_of(["tracking.mode=online"])
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    check_config(compose_config(["tracking.mode=online"]))


@pytest.mark.parametrize(
    "mb, accum, gb, world, expected",
    [(8, None, 32, 2, (2, 32)), (8, 3, None, 2, (3, 48)), (1, None, None, 8, (1, 8)), (2, 4, 64, 8, (4, 64))],
)
def test_batch_math(mb, accum, gb, world, expected):
    trainer = OmegaConf.create({"micro_batch_size": mb, "grad_accum_steps": accum, "global_batch_size": gb, "sequence_parallel": 1})
    assert batch_math(trainer, world)[:2] == expected
    assert batch_math(trainer, world)[2] == []


def test_tiny_plan_counts_the_bundled_data():
    cfg = compose_config([])
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    assert checked.train_examples >= 2000 and plan.steps_per_epoch == -(-checked.train_examples // 32)
    assert plan.total_steps == 300 and plan.params == checked.model.params
