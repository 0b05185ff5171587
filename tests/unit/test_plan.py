"""The plan before launch: parameter counts by arithmetic, the fit verdict and its advice, the stop
window (what the `sft` command prints of it: tests/integration/test_plan_cli.py)."""

import json

import pytest

from launcher.model_info import count_params_on_meta, read_config_json
from launcher.facts import find
from launcher.plan import make_plan
from launcher.plan.shape import ModelShape
from launcher.plan.stop_window import estimate as stop_window
from launcher.validate import check_config
from tests.conftest import compose_config


@pytest.mark.parametrize("recipe", ["llama3_8b_sft", "llama3_8b_long_sft", "llama3_70b_sft", "qwen2_5_7b_sft"])
def test_recipe_parameter_counts_equal_the_meta_device_count(recipe):
    hints = dict(compose_config([f"recipe={recipe}"]).model.config_hints)
    assert ModelShape.from_config(hints).params == count_params_on_meta(hints, trust_remote_code=False)


def test_bundled_and_other_llama_family_counts_equal_the_meta_device_count():
    from launcher import bundled

    tiny = read_config_json(bundled.resolve("bundled://tiny-llama"))  # tied embeddings
    qwen3 = {"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 96, "vocab_size": 1000, "tie_word_embeddings": True}
    mistral = {"model_type": "mistral", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 3,
               "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 500}
    for config in (tiny, qwen3, mistral):
        assert ModelShape.from_config(config).params == count_params_on_meta(config, trust_remote_code=False), config["model_type"]


def test_another_architecture_is_counted_on_the_meta_device_and_gets_no_memory_verdict(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 300, "n_positions": 128}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    cfg = compose_config([f"model.path={tmp_path}", "cluster.gpu_mem_gib=80"])
    facts = check_config(cfg, dry_run=True).model
    plan = make_plan(cfg, facts, None, find(cfg))
    assert facts.shape is None and plan.params == count_params_on_meta(gpt2, trust_remote_code=False)
    assert plan.memory["fits"] is None and "activations" not in plan.memory["parts_gib"]


def test_the_refusal_names_the_change_that_would_make_it_fit():
    # Llama 3.1 8B on one 80 GB GPU with 16k tokens and no checkpointing: activations overflow.
    cfg = compose_config(["recipe=llama3_8b_sft", "cluster.gpu=h100", "data.seq_len=16384", "trainer.micro_batch_size=1",
                          "trainer.activation_checkpointing=false"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    mem = plan.memory
    assert mem["fits"] is False and mem["peak_gib"] > mem["gpu_mem_gib"]
    assert mem["advice"][0].startswith("trainer.activation_checkpointing=true (predicted ")
    assert not any(a.startswith("cluster.nodes=") for a in mem["advice"])  # more nodes do not shrink activations


def test_advice_follows_the_setup():
    def advice(overrides):
        cfg = compose_config(["recipe=llama3_70b_sft", "cluster.gpu=a100_40g", *overrides])
        return make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg)).memory["advice"]

    # ZeRO-2 on 8 nodes keeps the whole 70B model on every GPU: ZeRO-3 is the fix.
    assert [a.split(" (")[0] for a in advice(["deepspeed=zero2"])] == ["deepspeed=zero3"]
    # One node of 40 GB GPUs: either offload fits, and so do 8 nodes (18 bytes x 70.5B / 64 GPUs), the fewest.
    assert [a.split(" (")[0] for a in advice(["cluster.nodes=1"])] == [
        "deepspeed.offload_optimizer=cpu optim.name=cpu_adam", "deepspeed=zero3_offload optim.name=cpu_adam", "cluster.nodes=8"]
    # A global batch that 16 GPUs cannot divide is never advised.
    assert not any(a.startswith("cluster.nodes") for a in advice(["cluster.nodes=1", "trainer.global_batch_size=24"]))


def test_param_offload_alone_keeps_gradients_and_optimizer_states_on_the_gpu():
    def states(offload_param):
        cfg = compose_config(["recipe=llama3_8b_sft", "deepspeed.offload_param=" + offload_param])
        return make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg)).memory["parts_gib"]["model states"]

    on_gpu, offloaded = states("none"), states("cpu")
    assert set(on_gpu) - set(offloaded) == {"params (16-bit shard)"}
    assert sum(on_gpu.values()) - sum(offloaded.values()) == pytest.approx(on_gpu["params (16-bit shard)"])


def test_stop_window_needs_and_verdicts():
    # 70.55B parameters x 12 bytes over 8 nodes: 105.8 GB per node.
    window = stop_window(70_553_706_496, nodes=8, stage=3, precision="bf16", signal_delay_s=300, step_s=20.0,
                         write_gb_s=None, write_source="x")
    assert window.per_node_gb == pytest.approx(105.83, abs=0.01) and window.fits is None
    assert window.needs_gb_s == pytest.approx(105.83 / (300 - 20 - 15), abs=0.001)
    slow = stop_window(70_553_706_496, 8, 3, "bf16", 300, 20.0, 0.2, "checkpoint.write_gb_s")
    fast = stop_window(70_553_706_496, 8, 3, "bf16", 300, 20.0, 2.0, "checkpoint.write_gb_s")
    assert (slow.fits, fast.fits) == (False, True) and fast.save_s == pytest.approx(52.9, abs=0.1)
    assert stop_window(8e9, 1, 3, "bf16", 10, 20.0, 2.0, "x").needs_gb_s is None  # the step alone outlasts the window
    # W&B's finish comes before the requeue: a finish timeout longer than the margin shortens the window.
    waits = stop_window(70_553_706_496, 8, 3, "bf16", 300, 20.0, None, "x", finish_s=60.0)
    assert waits.needs_gb_s == pytest.approx(105.83 / (300 - 20 - 60 - 5), abs=0.001)
    # Below stage 3 node 0 also writes the whole 16-bit model: 2 bytes per parameter more.
    assert stop_window(8e9, 2, 2, "bf16", 300, 0.0, None, "x").per_node_gb == pytest.approx(8 * 12 / 2 + 16)


def test_the_70b_recipe_leaves_a_margin_at_a_parallel_file_systems_speed():
    cfg = compose_config(["recipe=llama3_70b_sft", "cluster.gpu=h100", "checkpoint.write_gb_s=1.0"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    assert plan.stop_window["fits"] is True and plan.stop_window["save_s"] < 0.6 * plan.stop_window["window_s"]


@pytest.mark.parametrize("gres, expected", [
    ("gpu:h100:8(S:0-1)|96", "h100"), ("gpu:H200:8|128", "h200"), ("gpu:a100-80gb:4|64", "a100_80g"),
    ("gpu:a100:8|64", None), ("gpu:8|64", None), ("(null)|2", None),
])
def test_a_partitions_gres_type_names_the_gpu_the_plan_predicts_for(gres, expected):
    from launcher.backends.slurm_partitions import gpu_type

    assert gpu_type(gres) == expected


def test_attention_and_mlp_biases_and_head_dims_are_counted_as_transformers_builds_them():
    # qwen2 always has q/k/v biases, mistral none, llama follows both flags; qwen3's head_dim defaults to 128.
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        for attention_bias in (True, False):
            for mlp_bias in (True, False):
                config = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                          "attention_bias": attention_bias, "mlp_bias": mlp_bias}
                assert ModelShape.from_config(config).params == count_params_on_meta(config, trust_remote_code=False), config
