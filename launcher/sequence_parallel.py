"""Sequence parallelism: DeepSpeed's Ulysses (Arctic Long Sequence Training) bound to the trainer.

Ranks form groups of N consecutive ranks (so a group sits within a node, where the all-to-all is
fast). The group shares each micro-batch: every rank holds 1/N of each row's tokens through every
layer, and inside attention DeepSpeed's all-to-all swaps the sequence shards for head shards (each
rank attends over the whole row with H/N heads) and back. Data parallelism is world / N: a group
takes the rows data-parallel rank rank // N would.

What binds it here, beyond DeepSpeed's own `UlyssesSPAttentionHF.register_with_transformers`:
- the targets: each token's next-token label is computed on the whole row, then sliced with the
  tokens (a shard's last token predicts the next shard's first);
- packing: Ulysses drops the attention mask and passes the gathered position ids on. flash-attn
  gets the whole row's sequence boundaries (cu_seq_lens) as before; sdpa would attend causally
  across packed examples, so its kernel is wrapped (before Ulysses wraps it) to build the
  block-diagonal causal mask from the gathered position ids where a row holds several examples;
- the loss: each rank sums its shard's losses; the trainer divides by the global batch's trained
  tokens, so every token counts once;
- the tiled MLP (DeepSpeed's TiledMLP): each decoder layer's MLP runs over slices of the sequence,
  recomputed in backward, so its intermediate activations exist for one slice at a time.
"""

import math
import types
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from launcher.data.collate import loss_targets, next_token_targets

# Tensors sliced with the sequence; the rest of a batch (sequence boundaries) describes the whole row.
SEQUENCE_KEYS = ("input_ids", "position_ids", "labels")


@dataclass(frozen=True)
class Layout:
    """Where a rank sits: its sequence-parallel group and its data-parallel rank."""

    size: int  # ranks per group (trainer.sequence_parallel)
    rank: int  # this rank's shard of each row
    data_parallel_size: int
    data_parallel_rank: int


def shard(batch: Dict[str, Any], layout: Layout) -> Dict[str, Any]:
    """This rank's 1/N of every row of a collated micro-batch, with its targets (computed on the
    whole row) and its trained-token count. Padded rows lose their attention_mask: their padding
    is at the end, where causal attention never looks back at it. Rows are counted by shard 0."""
    width = batch["input_ids"].size(1)
    if width % layout.size:
        raise ValueError(f"a row of {width} tokens does not split into {layout.size} equal shards")
    part = width // layout.size
    cols = slice(layout.rank * part, (layout.rank + 1) * part)
    targets = next_token_targets(batch["labels"], batch["position_ids"])[:, cols]
    out = {k: v for k, v in batch.items() if k not in (*SEQUENCE_KEYS, "attention_mask", "loss_index", "loss_labels", "trained")}
    out.update({k: batch[k][:, cols] for k in SEQUENCE_KEYS})
    out.update(loss_targets(targets))
    if "rows" in batch:
        out["rows"] = batch["rows"] if layout.rank == 0 else 0
    return out


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, tokens, tokens) booleans, True where a query may attend: causal and within its
    packed example (an example starts where its position id is 0)."""
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    example = starts.cumsum(-1)
    mask = example[:, :, None] == example[:, None, :]
    return mask.tril_()[:, None]  # in place: one (tokens x tokens) tensor per row at its peak


def packed_sdpa(core):
    """sdpa that keeps packed examples apart when Ulysses dropped the mask: it gets the whole row's
    position ids (gathered) and builds the block-diagonal causal mask where a row holds several
    examples (one example per row keeps sdpa's causal kernel, no mask)."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        position_ids = kwargs.get("position_ids")
        if attention_mask is None and position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
            attention_mask = block_causal_mask(position_ids)
        return core(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


_registered: Dict[str, Any] = {}  # Ulysses replaces transformers' kernel once per process


def register(model, attn: str, size: int, micro_batch: int):
    """Route the model's attention through Ulysses; the mpu DeepSpeed's engine takes (None when size is 1)."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "mpu" in _registered:
        if _registered["key"] != (attn, size, micro_batch):
            raise RuntimeError(f"sequence parallelism is registered for {_registered['key']} in this process, not {(attn, size, micro_batch)}")
        return _registered["mpu"]
    core = ALL_ATTENTION_FUNCTIONS[attn]
    if attn == "sdpa":
        ALL_ATTENTION_FUNCTIONS[attn] = packed_sdpa(core)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=size,
        micro_batch_size=micro_batch, seq_length_is_variable=True)
    _registered.update(mpu=mpu, key=(attn, size, micro_batch), core=core, ulysses=ALL_ATTENTION_FUNCTIONS[attn], attn=attn)
    return mpu


class whole_rows:
    """Inside: attention sees the rank's own whole rows again (greedy generation, where each rank
    decodes its own prompts); outside: through Ulysses."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        if _registered:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            ALL_ATTENTION_FUNCTIONS[_registered["attn"]] = _registered["core"]
            # Ulysses sets each attention's KV group count for its head shard when it replicates KV
            # heads (N > KV heads); whole rows have every head again (Ulysses sets it back per call).
            text = self.model.config.get_text_config()
            groups = text.num_attention_heads // (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
            for module in self.model.modules():
                if hasattr(module, "num_key_value_groups"):
                    module.num_key_value_groups = groups
        return self

    def __exit__(self, *exc):
        if _registered:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            ALL_ATTENTION_FUNCTIONS[_registered["attn"]] = _registered["ulysses"]


def tile_mlps(model) -> int:
    """Each decoder layer's MLP through DeepSpeed's TiledMLP (slices of ceil(tokens / hidden) of the
    sequence, recomputed in backward); returns how many MLPs were tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiled = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or not any(p.requires_grad for p in module.parameters()):
            continue
        plain = module.forward

        def forward(self, x, plain=plain):
            tokens, hidden = x.shape[-2], x.shape[-1]
            shards = torch.tensor(max(1, math.ceil(tokens / hidden)), device=x.device)
            # Under ZeRO-3 every rank needs the same count: it gathers the MLP's weights once per
            # slice, collectively. Below ZeRO-3 nothing is gathered, and ranks may call the MLP
            # different numbers of times (generation without synced_gpus): no collective then.
            if dist.is_initialized() and any(hasattr(p, "ds_id") for p in self.parameters()):
                dist.all_reduce(shards, op=dist.ReduceOp.MAX)
            return TiledMLP.apply(lambda _, part: plain(part), self, x, int(shards.item()), list(self.parameters()))

        module.forward = types.MethodType(forward, module)
        tiled += 1
    return tiled


def layout_for(rank: int, world_size: int, size: Optional[int]) -> Layout:
    """Groups of `size` consecutive ranks, as DeepSpeed's Ulysses groups them."""
    size = size or 1
    if world_size % size:
        raise ValueError(f"trainer.sequence_parallel={size} does not divide the {world_size} ranks")
    return Layout(size=size, rank=rank % size, data_parallel_size=world_size // size, data_parallel_rank=rank // size)
