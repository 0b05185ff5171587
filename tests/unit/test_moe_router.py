"""launcher.moe on each supported family, in process (no DeepSpeed ranks): the routers are found and
hooked, the load-balancing loss equals transformers' own over the same tokens, and only the trained
positions count."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from launcher import moe

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2, router_aux_loss_coef=0.02)
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                        decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                        shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=6),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=16, num_experts=6),
}


def build(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).train()


def hf_aux(model, ids, mask=None) -> torch.Tensor:
    """transformers' own load-balancing loss of a forward (output_router_logits=True)."""
    model.config.output_router_logits = True
    try:
        return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    finally:
        model.config.output_router_logits = False


def ours(model, routers, ids, index):
    with moe.capturing(routers):
        model(input_ids=ids)
    return moe.load_balancing(routers, routers.take(), index)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_aux_loss_equals_transformers_own_over_the_same_tokens(family):
    model = build(family)
    routers = moe.find_routers(model, None)
    assert (routers.experts, routers.top_k, routers.layers, routers.coef) == (6, 2, 2, 0.02)
    assert all(getattr(block, "_z3_leaf", False) for block in routers.blocks)  # ZeRO-3 gathers each block whole
    ids = torch.randint(0, 97, (3, 10))
    aux, counts = ours(model, routers, ids, torch.arange(30))
    assert aux.item() == pytest.approx(hf_aux(model, ids).item(), rel=1e-5)
    assert counts.shape == (2, 6) and counts.sum().item() == 2 * 30 * 2  # layers x tokens x top-k selections
    # Only the given positions: transformers' attention_mask over exactly those (padding left out).
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    aux, counts = ours(model, routers, ids, mask.flatten().nonzero().squeeze(1))
    assert aux.item() == pytest.approx(hf_aux(model, ids, mask).item(), rel=1e-5)
    assert counts.sum().item() == 2 * mask.sum().item() * 2
    # The gradient reaches the routers (the aux loss trains them) and nothing is captured outside a training forward.
    aux.backward()
    assert all(block.gate.weight.grad.abs().sum() > 0 for block in routers.blocks)
    with torch.no_grad(), moe.capturing(routers):
        model(input_ids=ids)
    assert routers.captured == []


def test_every_family_the_plan_knows_has_its_blocks_named_here():
    from launcher.plan.shape import MOE_FAMILIES

    assert sorted(moe.BLOCKS) == sorted(MOE_FAMILIES) == sorted(CONFIGS)


def test_the_coefficient_override_wins_and_a_dense_model_has_no_routers():
    assert moe.find_routers(build("qwen3_moe"), 0.5).coef == 0.5
    assert moe.find_routers(build("mixtral"), 0.0).coef == 0.0
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=16))
    assert moe.find_routers(dense, None) is None


def test_active_parameters_leave_out_the_experts_a_token_is_not_routed_to():
    model = build("qwen3_moe")
    routers = moe.find_routers(model, None)
    total = sum(p.numel() for p in model.parameters())
    experts = 2 * 6 * (2 * 16 * 32 + 32 * 16)  # layers x experts x (gate_up + down)
    assert routers.expert_params() == experts
    assert routers.active_params(total) == total - experts * 4 // 6


def test_a_forward_that_skips_a_router_is_an_error_not_a_wrong_loss():
    model = build("olmoe")
    routers = moe.find_routers(model, None)
    with moe.capturing(routers):
        model.model.layers[0](model.model.embed_tokens(torch.randint(0, 97, (1, 5))),
                              position_embeddings=model.model.rotary_emb(torch.zeros(1, 5, 32), torch.arange(5)[None]))
    with pytest.raises(RuntimeError, match="captured 1 routers' outputs in a forward, expected 2"):
        routers.take()


def test_the_trainers_backward_objective_gives_the_mean_loss_plus_coef_times_the_mean_micro_step_aux():
    """What SFTTrainer.micro_batch_loss hands to backward, scaled as DeepSpeed scales it (1/world for the
    average over ranks, 1/accumulation in engine.backward), has the gradient of: the mean loss over
    the global batch's trained tokens + coef x the mean over micro-steps of each one's aux loss."""
    from types import SimpleNamespace

    from launcher.trainer import SFTTrainer

    model = build("qwen3_moe")
    routers = moe.find_routers(model, 0.5)  # a large weight: a wrong scale shows
    trainer = SFTTrainer.__new__(SFTTrainer)  # the method's inputs only: one rank, 2 accumulation steps
    trainer.env, trainer.ds_config = SimpleNamespace(world_size=1), {"gradient_accumulation_steps": 2}
    trainer.engine, trainer.loss_head, trainer.routers = model, None, routers
    torch.manual_seed(1)
    batches = []
    for trained in (torch.tensor([1, 2, 5, 8]), torch.tensor([0, 3, 4, 6, 7, 9, 11])):
        ids = torch.randint(0, 97, (1, 12))
        batches.append({"input_ids": ids, "position_ids": torch.arange(12)[None], "loss_index": trained,
                        "loss_labels": torch.randint(0, 97, (len(trained),)), "trained": len(trained)})
    total = sum(b["trained"] for b in batches)
    model.zero_grad()
    for batch in batches:
        _, objective, _ = trainer.micro_batch_loss(batch, total)
        (objective / 2).backward()  # DeepSpeed: / accumulation steps (world 1)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lm, aux = 0, 0
    for batch in batches:
        with moe.capturing(routers):
            logits = model(input_ids=batch["input_ids"]).logits[0]
        lm = lm + torch.nn.functional.cross_entropy(logits[batch["loss_index"]], batch["loss_labels"], reduction="sum")
        aux = aux + moe.load_balancing(routers, routers.take(), batch["loss_index"])[0]
    (lm / total + 0.5 * aux / 2).backward()
    for p, g in zip(model.parameters(), got):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-8)
