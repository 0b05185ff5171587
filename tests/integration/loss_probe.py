"""Run on each rank by test_loss and test_sequence_parallel: set the trainer up, take the first step's batches through the
trainer's loss and backward, and save the loss and every parameter's full gradient (rank 0)."""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from launcher.loss import token_loss_sum
from tests.integration.probe_setup import exit_now, trainer_with_engine

run_dir = Path(sys.argv[1])
trainer = trainer_with_engine(run_dir)
world = trainer.env.world_size
assert trainer.accum == 1  # one backward is the whole step: DeepSpeed reduces the gradients at its end
(batch,) = trainer._step_batches(0)
global_trained = trainer._sum_over_ranks(torch.tensor([batch["trained"]], dtype=torch.float64)).item()
summed = token_loss_sum(trainer.engine, trainer.loss_head, batch)
trainer.engine.backward(summed * (world / global_trained))
grads = {name: safe_get_full_grad(p).detach().clone() for name, p in trainer.engine.module.named_parameters()}
loss_sum = trainer._sum_over_ranks(summed.detach().double().view(1)).item()
# Packed examples per row (position ids restarting), as this rank saw them.
examples = (batch["position_ids"] == 0).sum().item() + (batch["position_ids"][:, 0] != 0).sum().item()
if trainer.env.rank == 0:
    torch.save({"loss": loss_sum / global_trained, "grads": grads, "examples": examples,
                "rows": batch["input_ids"].shape}, run_dir / "grads.pt")
exit_now(trainer)
