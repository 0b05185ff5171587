"""The training loss: summed next-token cross-entropy over trained tokens, without full-vocabulary logits.

A causal LM's forward ends in `lm_head(hidden_states)`: (tokens x vocabulary) logits, then an fp32
copy for the loss, and more copies in backward (4 GiB per fp32 copy for Llama 3 at 8k tokens).
`LossHead` stands in for `lm_head`. Generation and plain calls get logits as before; when the trainer
has set the targets, it returns the summed loss instead, computed one way of three:

- chunked: the output projection and the loss one chunk of trained tokens at a time, each chunk
  recomputed in backward (torch.utils.checkpoint), so one chunk's logits exist at a time (a
  micro-batch of one chunk or less is not recomputed: its logits are freed by the head's
  backward, the first step of backward, all the same);
- liger: Liger's fused linear cross-entropy (Triton, GPU only; `pip install liger-kernel`);
- full: no head; the model's own logits for every position, upcast to fp32 (the reference the
  others are tested against, and the one loss right for models that transform their logits
  after lm_head: softcapping, scaling).

The head holds lm_head's own Parameter objects, so tied embeddings stay tied, DeepSpeed ZeRO-3
gathers the weight for the head's forward and backward as it did for lm_head, and state-dict keys
(lm_head.weight) are unchanged.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.data.masking import IGNORE

# Models whose forward transforms the logits after lm_head (softcapping, scaling): a loss computed
# inside the head would skip that transform, so only the full loss is right for them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                    "output_multiplier", "lm_head_multiplier")


class LossHead(nn.Module):
    def __init__(self, lm_head: nn.Linear, mode: str, chunk_tokens: int):
        super().__init__()
        self.weight = lm_head.weight
        self.bias = lm_head.bias
        self.in_features, self.out_features = getattr(lm_head, "in_features", None), getattr(lm_head, "out_features", None)
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        self.targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (flat positions, their labels)
        self.last_loss: Optional[torch.Tensor] = None  # what forward returned: the model must pass it on as is
        self.verified = False  # whether the model was seen to pass it on unchanged

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return F.linear(hidden, self.weight, self.bias)
        self.last_loss = self._loss(hidden, *self.targets)
        return self.last_loss

    def _loss(self, hidden: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # index counts every position of hidden (a row's last predicts nothing and is never in it).
        trained = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # only those reach the projection
        if self.mode == "liger" and trained.size(0):  # Liger divides by the token count
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(self.weight, trained, labels, self.bias)
        if trained.size(0) <= self.chunk_tokens:
            # One chunk: its logits live only until the head's backward, the first of backward's
            # steps, so recomputing them would save nothing. Empty or not, the weight gets a
            # gradient (ZeRO-3 reduces it collectively) and the loss a graph.
            return _chunk_loss(trained, self.weight, self.bias, labels)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, trained.size(0), self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            total = total + checkpoint(_chunk_loss, trained[part], self.weight, self.bias, labels[part], use_reentrant=False)
        return total


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum")


def install_loss_head(model: nn.Module, mode: str, chunk_tokens: int) -> Optional[LossHead]:
    """Replace the model's output projection with a LossHead (chunked, liger); full leaves the model as it is."""
    if mode == "full":
        return None
    text = model.config.get_text_config()  # multimodal models keep these in their text config
    for key in LOGIT_TRANSFORMS:
        if getattr(text, key, None) not in (None, 1.0):
            raise ValueError(f"trainer.loss={mode}: {type(model).__name__} transforms its logits after lm_head "
                             f"({key}={getattr(text, key)}), which a loss inside the head would skip; use trainer.loss=full")
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"trainer.loss={mode}: {type(model).__name__}'s output embeddings are "
                         f"{type(lm_head).__name__}, not a linear layer the loss can stand in for; use trainer.loss=full")
    head = LossHead(lm_head, mode, chunk_tokens)
    model.set_output_embeddings(head)
    return head


def token_loss_sum(model: nn.Module, head: Optional[LossHead], batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens (fp32); use_cache=False keeps packed
    examples apart. The batch comes from launcher.data.collate, its targets computed on the CPU."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if head is None:  # full: the model's own logits, every position, in fp32
        logits = model(**inputs, use_cache=False).logits.float()
        logits = logits.reshape(-1, logits.size(-1))
        every = torch.full((logits.size(0),), IGNORE, dtype=torch.long, device=logits.device)
        every[batch["loss_index"]] = batch["loss_labels"]
        return F.cross_entropy(logits, every, ignore_index=IGNORE, reduction="sum")
    head.targets = (batch["loss_index"], batch["loss_labels"])
    try:
        summed = model(**inputs, use_cache=False).logits
    finally:
        head.targets = None
    loss, head.last_loss = head.last_loss, None
    if not head.verified:  # once (it reads a value back): scaled, capped or transformed after lm_head, it is no loss
        if summed.dim() != 0 or not torch.equal(summed.detach(), loss.detach()):
            name = type(getattr(model, "module", model)).__name__
            raise RuntimeError(f"{name} changes what lm_head returns before its output; use trainer.loss=full")
        head.verified = True
    return summed


MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
