"""The optimizer a run trains with, chosen by cfg.optim.name: DeepSpeed's fused GPU Adam
(fused_adam), its CPU Adam for an optimizer offloaded to the CPU (cpu_adam), else torch's AdamW.
Every one decays the weights AdamW's way, biases and norms excepted. (launcher.ops builds the
DeepSpeed ops a name needs before the ranks load them.)"""

from typing import Any, Iterable, Tuple

import torch


def build_optimizer(o: Any, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The optimizer for cfg.optim (`o`: name, lr, betas, eps, weight_decay) over the model's parameters."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if o.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
