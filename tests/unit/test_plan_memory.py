"""The plan's memory prediction against its peers: DeepSpeed's own estimators for model states, and
torch's profiler for the activations and the loss's logits of a real forward and backward on CPU."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.facts import find
from launcher.plan import make_plan
from launcher.plan.memory import Workload, activation_bytes, backward_transients
from launcher.plan.shape import ModelShape
from launcher.data import collate
from launcher.loss import install_loss_head, token_loss_sum
from launcher.validate import check_config
from tests.conftest import compose_config
from tests.utils.memory_profile import profiled_step

GIB = 2**30


def planned(overrides):
    cfg = compose_config(["recipe=llama3_8b_sft", *overrides])
    return make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))


@pytest.mark.parametrize("nodes, deepspeed, offload_optimizer, offload_params", [
    (1, "zero3", False, False), (4, "zero3", False, False), (2, "zero3_offload", True, False),
    (2, "zero3_offload", True, True),
])
def test_zero3_model_states_equal_deepspeeds_estimator(nodes, deepspeed, offload_optimizer, offload_params):
    overrides = [f"cluster.nodes={nodes}", f"deepspeed={deepspeed}", "optim.name=cpu_adam" if offload_optimizer else "optim.name=adamw"]
    if deepspeed == "zero3_offload":
        overrides.append(f"deepspeed.offload_param={'cpu' if offload_params else 'none'}")
    plan = planned(overrides)
    shape = ModelShape.from_config(compose_config(["recipe=llama3_8b_sft"]).model.config_hints)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        plan.params, shape.largest_layer_params, num_gpus_per_node=8, num_nodes=nodes,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True)
    states = plan.memory["parts_gib"]["model states"]
    assert sum(states.values()) * GIB == pytest.approx(gpu, rel=1e-9)
    if offload_optimizer:
        assert plan.memory["cpu_per_node_gib"] * GIB == pytest.approx(cpu, rel=1e-9)


@pytest.mark.parametrize("nodes", [1, 2])
def test_zero2_model_states_equal_deepspeeds_estimator(nodes):
    plan = planned([f"cluster.nodes={nodes}", "deepspeed=zero2"])
    _, gpu = estimate_zero2_model_states_mem_needs(plan.params, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False)
    assert sum(plan.memory["parts_gib"]["model states"].values()) * GIB == pytest.approx(gpu, rel=1e-9)


def profiled_peak(config: dict, batch: int, seq_len: int, checkpointing: bool, attn: str, loss: str) -> tuple[float, float]:
    """(bytes held when backward starts, peak bytes during forward and backward) above what the model
    and its gradients hold, from torch's profiler, for the trainer's own loss on CPU in fp32."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=attn)).float().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = install_loss_head(model, loss, CHUNK)
    ids = torch.randint(0, config["vocab_size"], (batch, seq_len))
    rows = [{"input_ids": r, "labels": r, "position_ids": list(range(seq_len))} for r in ids.tolist()]
    batch_ = collate(rows, pad_id=0)

    token_loss_sum(model, head, batch_).backward()  # gradients exist from here on, as they do in training
    return profiled_step(lambda: token_loss_sum(model, head, batch_), lambda summed: summed.backward())


CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              vocab_size=2000, max_position_embeddings=1024, tie_word_embeddings=False)
CHUNK = 256


@pytest.mark.parametrize("checkpointing, attn, loss", [
    (False, "sdpa", "full"), (True, "sdpa", "full"), (False, "eager", "full"), (True, "eager", "full"),
    (False, "sdpa", "chunked"), (True, "sdpa", "chunked"),
])
def test_activations_and_logits_match_a_measured_peak_within_15_percent(checkpointing, attn, loss):
    batch, seq_len = 4, 256
    at_backward, peak = profiled_peak(CONFIG, batch, seq_len, checkpointing, attn, loss)
    shape = ModelShape.from_config({**CONFIG, "model_type": "llama"})
    work = Workload(batch, seq_len, "fp32", checkpointing, attn, packing=False, loss=loss, loss_chunk_tokens=CHUNK)
    saved = sum(activation_bytes(shape, work).values())
    # When backward starts the full loss still holds its fp32 log-softmax output; the chunked one
    # holds only its input (recomputed in backward).
    held_by_loss = 4 * shape.vocab * work.tokens if loss == "full" else 4 * shape.hidden * work.tokens
    assert (saved + held_by_loss) / at_backward == pytest.approx(1, abs=0.15)
    assert (saved + max(backward_transients(shape, work).values())) / peak == pytest.approx(1, abs=0.15)


def test_the_chunked_loss_holds_a_fraction_of_the_full_losss_logits():
    """Peak of a step where the vocabulary's logits dominate: chunked holds a fraction of the full loss's."""
    config = {**CONFIG, "num_hidden_layers": 1, "vocab_size": 32000}
    _, full = profiled_peak(config, 2, 512, False, "sdpa", "full")
    _, chunked = profiled_peak(config, 2, 512, False, "sdpa", "chunked")
    shape = ModelShape.from_config({**config, "model_type": "llama"})
    predicted = [sum(activation_bytes(shape, w).values()) + max(backward_transients(shape, w).values())
                 for w in (Workload(2, 512, "fp32", False, "sdpa", False, loss, CHUNK) for loss in ("full", "chunked"))]
    assert chunked < full / 2
    assert predicted[0] / full == pytest.approx(1, abs=0.15) and predicted[1] / chunked == pytest.approx(1, abs=0.15)
