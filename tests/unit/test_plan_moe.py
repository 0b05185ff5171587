"""The plan for mixture-of-experts models: parameter counts against the meta device at real sizes,
active parameters, the MoE block ZeRO-3 gathers whole, activations against torch's profiler, compute
at active and traffic at total parameters, the dry run's rows, and the refusal of an untested family."""

import io
import json

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM

from launcher import moe
from launcher.data import collate
from launcher.errors import ConfigError
from launcher.facts import find
from launcher.loss import install_loss_head, token_loss_sum
from launcher.model_info import count_params_on_meta
from launcher.plan import make_plan
from launcher.plan.memory import GIB, Workload, activation_bytes, backward_transients
from launcher.plan.shape import MOE_FAMILIES, ModelShape, is_moe_config
from launcher.plan_report import plan_table
from launcher.validate import check_config
from tests.conftest import compose_config
from tests.utils.memory_profile import profiled_step

RECIPE = "qwen3_30b_a3b_sft"
QWEN3_30B_A3B = OmegaConf.to_container(compose_config([f"recipe={RECIPE}"]).model.config_hints)
# The published config.json of each family's reference model (the fields the arithmetic reads).
REAL = {
    "qwen3_moe": QWEN3_30B_A3B,  # Qwen/Qwen3-30B-A3B, the recipe's hints
    "mixtral": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,  # Mixtral-8x7B
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
                "num_experts_per_tok": 2, "tie_word_embeddings": False},
    "olmoe": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,  # OLMoE-1B-7B
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304, "num_experts": 64,
              "num_experts_per_tok": 8, "tie_word_embeddings": False},
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,  # Qwen1.5-MoE-A2.7B
                  "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4,
                  "decoder_sparse_step": 1, "tie_word_embeddings": False},
}
# (total, active per token) as the model cards round them: 30.5B/3.3B, 46.7B/12.9B, 6.9B/1.3B, 14.3B/2.7B.
EXACT = {"qwen3_moe": (30_532_122_624, 3_353_032_704), "mixtral": (46_702_792_704, 12_879_925_248),
         "olmoe": (6_919_161_856, 1_282_017_280), "qwen2_moe": (14_315_784_192, 2_689_173_504)}


def build(config: dict, attn: str = "sdpa", meta: bool = False):
    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config, attn_implementation=attn)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    return AutoModelForCausalLM.from_config(hf_config)


@pytest.fixture(scope="module")
def built():
    """Each family's real-size model, built once on the meta device (nothing allocated)."""
    return {family: build(config, meta=True) for family, config in REAL.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_real_size_counts_equal_the_meta_device_build(built, family):
    model, shape = built[family], ModelShape.from_config(REAL[family])
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert (shape.params, shape.expert_params) == (total, experts)
    # A token runs k of the E routed experts and everything else.
    assert shape.active_params == total - experts * (shape.experts - shape.top_k) // shape.experts
    assert (shape.params, shape.active_params) == EXACT[family]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_largest_gathered_layer_is_a_whole_moe_block(built, family):
    model, shape = built[family], ModelShape.from_config(REAL[family])
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    block = sum(p.numel() for p in blocks[0].parameters())  # experts, router (and shared expert): one ZeRO-3 leaf
    assert (shape.moe_layers, shape.moe_block_params) == (len(blocks), block)
    assert shape.largest_expert_tensor == blocks[0].experts.gate_up_proj.numel()
    # At real sizes every block outweighs the embedding, which a dense model's largest layer is.
    assert shape.largest_layer_params == block > model.model.embed_tokens.weight.numel() == shape.embedding_params


def small(model_type: str, **fields) -> dict:
    return {"model_type": model_type, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, **fields}


QWEN_MOE = dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2)


@pytest.mark.parametrize("config", [
    small("qwen3_moe", **QWEN_MOE, mlp_only_layers=[0, 3], attention_bias=True, tie_word_embeddings=True),
    small("qwen3_moe", **QWEN_MOE, decoder_sparse_step=2),  # layers 1 and 3 sparse
    small("qwen3_moe", **QWEN_MOE, head_dim=32),  # qwen3_moe's head_dim defaults to hidden / heads, unlike qwen3's
    small("qwen3_moe", moe_intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),  # as transformers 5 saves it
    small("qwen2_moe", **QWEN_MOE, shared_expert_intermediate_size=40, qkv_bias=False, mlp_only_layers=[1]),
    small("qwen2_moe", **QWEN_MOE, shared_expert_intermediate_size=0),  # the shared expert's gate stays
    small("qwen2_moe", **dict(QWEN_MOE, num_experts=0), shared_expert_intermediate_size=40),  # no expert: dense
    small("olmoe", num_experts=6, num_experts_per_tok=2, attention_bias=True, num_key_value_heads=1),  # k_norm: kv heads only
    small("mixtral", num_local_experts=6, num_experts_per_tok=2, attention_bias=True, head_dim=8),  # no bias whatever it says
], ids=lambda c: c["model_type"])
def test_dense_layers_biases_norms_and_head_dims_are_counted_as_transformers_builds_them(config):
    shape = ModelShape.from_config(config)
    assert shape.params == count_params_on_meta(config, trust_remote_code=False)
    model = build(config, meta=True)
    assert shape.moe_layers == sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)


def test_any_family_with_experts_is_recognised_as_a_mixture_of_experts():
    assert all(is_moe_config(config) for config in REAL.values())
    assert is_moe_config({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8})
    assert is_moe_config({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16}})  # nested
    assert is_moe_config({"model_type": "llama4", "text_config": {"num_local_experts": 16}})
    assert is_moe_config({"model_type": "ernie4_5_moe", "moe_num_experts": [64, 64]})  # one count per modality
    assert is_moe_config({"model_type": "custom", "num_experts_per_tok": 2})
    assert not is_moe_config(small("llama"))
    assert not is_moe_config(small("qwen2_moe", num_experts=0, num_experts_per_tok=4))  # no expert: dense


def profiled_moe_step(config: dict, batch: int, seq_len: int, checkpointing: bool, loss: str, chunk: int):
    """(bytes held when backward starts, peak bytes) of the trainer's micro-step on CPU in fp32: its loss
    plus the load-balancing loss from the routers' captured logits (launcher.moe), as the trainer takes it."""
    torch.manual_seed(0)
    model = build(config).float().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    routers = moe.find_routers(model, coef=0.01)
    head = install_loss_head(model, loss, chunk)
    ids = torch.randint(0, config["vocab_size"], (batch, seq_len))
    rows = [{"input_ids": r, "labels": r, "position_ids": list(range(seq_len))} for r in ids.tolist()]
    batch_ = collate(rows, pad_id=0)

    def forward():
        with moe.capturing(routers):
            summed = token_loss_sum(model, head, batch_)
        aux, _ = moe.load_balancing(routers, routers.take(), batch_["loss_index"])
        return summed + routers.coef * aux

    forward().backward()  # gradients exist from here on, as they do in training
    return profiled_step(forward, lambda objective: objective.backward())


MEASURED = {  # one of each MoE layout: per-head q/k norms, a shared expert beside a dense layer, no biases
    "qwen3_moe": small("qwen3_moe", hidden_size=128, moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                       num_hidden_layers=2, head_dim=32, vocab_size=2000, norm_topk_prob=True),
    "qwen2_moe": small("qwen2_moe", hidden_size=128, intermediate_size=344, moe_intermediate_size=96, num_experts=8,
                       num_experts_per_tok=2, shared_expert_intermediate_size=192, num_hidden_layers=2, mlp_only_layers=[1],
                       vocab_size=2000),
    "mixtral": small("mixtral", hidden_size=128, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                     num_hidden_layers=2, vocab_size=2000),
    # Many narrow experts: the load-balancing loss's fp32 probabilities (4E per token and layer) outweigh
    # the checkpointed layer inputs (4h).
    "many experts": small("qwen3_moe", moe_intermediate_size=16, num_experts=64, num_experts_per_tok=1,
                          num_hidden_layers=2, vocab_size=2000),
}


@pytest.mark.parametrize("family, checkpointing", [(family, checkpointing) for family in MEASURED for checkpointing in (False, True)
                                                    if family != "many experts" or checkpointing])
def test_moe_activations_match_a_measured_peak_within_10_percent(family, checkpointing):
    batch, seq_len, chunk = 4, 256, 256
    config = MEASURED[family]
    at_backward, peak = profiled_moe_step(config, batch, seq_len, checkpointing, "chunked", chunk)
    shape = ModelShape.from_config(config)
    work = Workload(batch, seq_len, "fp32", checkpointing, "sdpa", packing=False, loss="chunked", loss_chunk_tokens=chunk)
    parts = activation_bytes(shape, work)
    assert any(name.startswith("router probabilities for the load-balancing loss") for name in parts)
    saved = sum(parts.values()) + 4 * shape.hidden * work.tokens  # the chunked loss holds its input
    assert saved / at_backward == pytest.approx(1, abs=0.1)
    assert (sum(parts.values()) + max(backward_transients(shape, work).values())) / peak == pytest.approx(1, abs=0.1)


def planned(overrides=()):
    cfg = compose_config([f"recipe={RECIPE}", *overrides])
    return make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))


def test_model_states_and_traffic_count_every_expert_and_compute_the_active_ones():
    plan, shape = planned(), ModelShape.from_config(QWEN3_30B_A3B)
    assert (plan.params, plan.active_params) == EXACT["qwen3_moe"]
    states, buffers = plan.memory["parts_gib"]["model states"], plan.memory["parts_gib"]["ZeRO buffers"]
    assert states["params (16-bit shard)"] * GIB == pytest.approx(2 * plan.params / plan.world_size)
    assert states["largest layer (gathered)"] * GIB == pytest.approx(2 * 2 * shape.moe_block_params)  # with its gradient
    # A prefetch that reaches a block takes an expert tensor whole, past DeepSpeed's 50M-element bucket.
    assert buffers["prefetch bucket"] * GIB == pytest.approx(2 * (50_000_000 + shape.largest_expert_tensor))
    comm = plan.comm
    assert comm["message_bytes"]["reduce_scatter_tensor"] == plan.grad_accum_steps * 2 * plan.params  # every gradient
    per_token = 8 / 6 * (6 * plan.active_params + 6 * shape.layers * shape.q_dim * plan.seq_len)  # with recomputation
    assert comm["compute_s"] == pytest.approx(per_token * plan.tokens_per_step / plan.world_size / 989e12)
    assert comm["comm_s"] > comm["compute_s"]  # all 30.5B move for 3.35B computed


def test_a_node_too_few_is_refused_with_the_changes_that_fit():
    mem = planned(["cluster.nodes=1", "trainer.micro_batch_size=2"]).memory
    assert mem["fits"] is False
    fixes = [a.split(" (")[0] for a in mem["advice"]]
    assert "trainer.micro_batch_size=1" in fixes and "cluster.nodes=2" in fixes
    assert planned().memory["fits"] is True  # the recipe as it is


def rendered(plan) -> str:
    out = io.StringIO()
    Console(file=out, width=400).print(plan_table(plan))
    return out.getvalue()


def test_the_dry_run_prints_total_and_active_parameters_and_the_gathered_block():
    plan = planned()
    text = rendered(plan)
    assert "30.53B (3.35B active per token: 8 of 128 experts)" in text
    assert "the routed experts hold 28.99B parameters: 95% of the model" in text
    assert "a MoE block, 604.24M parameters (its 128 experts and router)" in text
    assert "larger than the embedding (311.16M)" in text
    assert f"fits ({plan.memory['peak_gib']:.2f} GiB of 71.64 GiB usable)" in text


def write_model(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


UNTESTED = {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "q_lora_rank": 16,
            "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1}


def test_an_untested_moe_family_is_refused_unless_allowed(tmp_path):
    path = write_model(tmp_path, UNTESTED)
    with pytest.raises(ConfigError) as error:
        check_config(compose_config([f"model.path={path}"]), dry_run=True)
    (refusal,) = [p for p in error.value.problems if p.startswith("model.path=")]
    assert "'deepseek_v3'" in refusal and "qwen3_moe, mixtral, olmoe, qwen2_moe" in refusal
    assert "model.allow_untested=true" in refusal

    cfg = compose_config([f"model.path={path}", "model.allow_untested=true", "cluster.gpu_mem_gib=80"])
    facts = check_config(cfg, dry_run=True).model
    assert facts.moe and facts.shape is None and facts.active_params is None
    plan = make_plan(cfg, facts, None, find(cfg))
    assert plan.params == count_params_on_meta(UNTESTED, trust_remote_code=False) and plan.memory["fits"] is None
    assert "a mixture of experts of model_type deepseek_v3" in rendered(plan)


def test_a_tested_family_and_a_dense_model_need_no_override(tmp_path):
    for name, config in (("olmoe", small("olmoe", num_experts=4, num_experts_per_tok=2)), ("gpt2", {"model_type": "gpt2"})):
        (tmp_path / name).mkdir()
        check_config(compose_config([f"model.path={write_model(tmp_path / name, config)}"]), dry_run=True)


def test_the_router_aux_loss_coef_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"model.router_aux_loss_coef=-0.1: must be >= 0"):
        check_config(compose_config([f"recipe={RECIPE}", "model.router_aux_loss_coef=-0.1"]), dry_run=True)
    check_config(compose_config([f"recipe={RECIPE}", "model.router_aux_loss_coef=0"]), dry_run=True)  # 0: no aux loss


def test_the_tiled_mlp_is_refused_for_a_mixture_of_experts():
    with pytest.raises(ConfigError, match=r"trainer.tiled_mlp=True: is not supported for a mixture of experts \(qwen3_moe\)"):
        check_config(compose_config([f"recipe={RECIPE}", "trainer.tiled_mlp=true"]), dry_run=True)
