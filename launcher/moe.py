"""Mixture-of-experts models in training: ZeRO-3 leaf blocks, the router's load-balancing loss, expert load.

transformers 5 builds every supported family (launcher.plan.shape.MOE_FAMILIES) alike: each MoE
layer's `mlp` is a SparseMoeBlock holding a TopKRouter (`gate`, returning raw logits, top-k weights
and top-k expert indices per token) and the layer's experts as fused 3-D parameters.

- **ZeRO-3:** the block is marked a leaf module, so ZeRO-3 gathers all of its experts when the block
  starts, whichever experts the tokens reach. The eager expert path calls modules only for the
  experts hit; ZeRO-3 traces module order per step, so a step routed differently would fail or
  hang the collective.
- **The load-balancing loss**, as transformers' `load_balancing_loss_func` defines it (Switch
  Transformer): with f_e the fraction of top-k selections that went to expert e and P_e the mean
  router probability of e, both over every MoE layer's tokens, aux = E x sum_e f_e x P_e. Here
  the tokens are the trained positions (those with a loss: no padding, no prompt-only rows of a
  packed row), of every rank's micro-batch at this accumulation step: the selection counts are
  summed over ranks (one all-reduce of E x layers + 1 numbers), so 2 ranks compute what 1 rank does
  on the same rows. Each rank's share (its P_e over the global count) sums to the global value.
  It is a batch statistic: over accumulation steps it is averaged, not pooled (the counts of
  micro-batch 2 are unknown when micro-batch 1's backward runs).
- **The model's own aux loss is off** (`output_router_logits=False`): it pools every position of a
  rank's micro-batch (prompts, and padding and other examples' tokens in packed rows, which get
  no attention mask), is added only when labels are given (the launcher's loss passes none) and
  would run a second time. Logits are taken from the routers by forward hooks instead, only in
  the training forward (not in a checkpointed layer's recompute, nor in eval or generation).
"""

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

# model_type -> the class names of its MoE block and router, as transformers names them.
BLOCKS = {
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter"),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter"),
    "mixtral": ("MixtralSparseMoeBlock", "MixtralTopKRouter"),
    "olmoe": ("OlmoeSparseMoeBlock", "OlmoeTopKRouter"),
}


@dataclass
class Routers:
    """The routers of a model and what their forward hooks captured in the current training forward."""

    experts: int
    top_k: int
    coef: float  # router_aux_loss_coef: the objective is loss + coef x aux
    blocks: List[nn.Module]
    captured: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (logits, indices) per MoE layer
    capturing: bool = False

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def _capture(self, _module, _inputs, output) -> None:
        # A checkpointed layer's recompute runs in backward, outside capturing(); no_grad keeps eval and generation out.
        if self.capturing and torch.is_grad_enabled():
            logits, _weights, indices = output
            self.captured.append((logits, indices))

    def take(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        captured, self.captured = self.captured, []
        if len(captured) != self.layers:
            raise RuntimeError(f"captured {len(captured)} routers' outputs in a forward, expected {self.layers} (one per MoE layer)")
        return captured

    def expert_params(self) -> int:
        """Parameters of the routed experts (all layers), whole even when ZeRO-3 partitions them."""
        return sum(getattr(p, "ds_numel", p.numel()) for block in self.blocks for p in block.experts.parameters())

    def active_params(self, total: int) -> int:
        """Parameters a token runs through: all but the experts it is not routed to."""
        return total - self.expert_params() * (self.experts - self.top_k) // self.experts


def find_routers(model: nn.Module, coef: Optional[float]) -> Optional[Routers]:
    """The model's routers with capture hooks installed, and its MoE blocks marked ZeRO-3 leaves;
    None for a dense model. `coef` overrides the config's router_aux_loss_coef."""
    config = model.config.get_text_config()
    names = BLOCKS.get(config.model_type)
    if names is None:
        return None
    block_name, router_name = names
    blocks = [m for m in model.modules() if type(m).__name__ == block_name]
    if not blocks:  # a config with no MoE layer (num_experts=0, or every layer in mlp_only_layers)
        return None
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [type(blocks[0])])
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    routers = Routers(experts=int(experts), top_k=int(config.num_experts_per_tok),
                      coef=float(config.router_aux_loss_coef if coef is None else coef), blocks=blocks)
    for block in blocks:
        router = block.gate
        if type(router).__name__ != router_name:
            raise TypeError(f"{block_name}.gate is {type(router).__name__}, not the {router_name} this launcher was tested with")
        router.register_forward_hook(routers._capture)
    config.output_router_logits = False  # the model's own aux loss: see the module docstring
    return routers


@contextlib.contextmanager
def capturing(routers: Optional[Routers]):
    """The routers' outputs of the forward run inside are kept for the load-balancing loss."""
    if routers is None:
        yield
        return
    routers.captured.clear()
    routers.capturing = True
    try:
        yield
    finally:
        routers.capturing = False


def load_balancing(routers: Routers, captured, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the micro-step's aux loss (with its graph: ranks' shares sum to the value
    over every rank's trained positions), and the selections per (MoE layer, expert) over those
    positions, every rank's (detached, the same on every rank). `index`: the trained positions of
    the flattened (rows x tokens) micro-batch, as the loss uses them."""
    layers, experts = len(captured), routers.experts
    logits = torch.stack([lg.index_select(0, index) for lg, _ in captured]).float()  # (layers, trained, E)
    chosen = torch.stack([ix.index_select(0, index) for _, ix in captured])  # (layers, trained, k)
    counts = torch.zeros(layers, experts, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(1, chosen.reshape(layers, -1), torch.ones(chosen.reshape(layers, -1).shape, device=logits.device))
    totals = torch.cat([counts.flatten(), torch.tensor([float(index.numel())], device=logits.device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    counts, tokens = totals[:-1].view(layers, experts), totals[-1]
    rows = torch.clamp(tokens * layers, min=1)  # the load-balancing statistic pools every layer's tokens
    fraction = counts.sum(0) / rows  # f_e: top-k selections of expert e, over tokens (sums to k)
    probability = torch.softmax(logits, dim=-1).sum((0, 1)) / rows  # this rank's part of P_e
    return experts * (fraction * probability).sum(), counts
