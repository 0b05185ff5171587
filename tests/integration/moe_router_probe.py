"""Run on each rank by test_moe: two optimizer steps of the tiny MoE on the eager expert path (a module
call per expert a token reaches, so ZeRO-3's module trace depends on the routing), with every token of
rank 1 routed to experts 0 and 1 by a forced router; each rank writes what its routers chose."""

import json
import sys
from pathlib import Path

import torch

from launcher.log_window import LogWindow
from tests.integration.probe_setup import exit_now, trainer_with_engine

run_dir = Path(sys.argv[1])
trainer = trainer_with_engine(run_dir)
model = trainer.engine.module
model.set_experts_implementation("eager")
assert model.config._experts_implementation == "eager"
routers = trainer.routers
chosen = torch.zeros(routers.experts, dtype=torch.long)


def force(_module, _inputs, output):
    logits, weights, indices = output
    forced = torch.arange(routers.top_k).expand_as(indices)
    return logits, torch.full_like(weights, 1 / routers.top_k), forced


def count(_module, _inputs, output):
    if torch.is_grad_enabled():
        chosen.add_(torch.bincount(output[2].flatten(), minlength=routers.experts))


for block in routers.blocks:
    if trainer.env.rank == 1:
        block.gate.register_forward_hook(force, prepend=True)  # before the trainer's capture: the aux loss sees it
    block.gate.register_forward_hook(count)
window = LogWindow(trainer.device, trainer.env.world_size)
for step in range(2):
    batches = trainer._step_batches(step)
    trained = trainer._sum_over_ranks(torch.tensor([sum(b["trained"] for b in batches)], dtype=torch.float64)).item()
    window.begin_step()
    trainer._train_step(batches, trained, window)
    window.end_step(trained, 0.0)
row = window.row(trainer.n_params, None)
(run_dir / f"routed-{trainer.env.rank}.json").write_text(json.dumps({"chosen": chosen.tolist(), "row": row}))
exit_now(trainer)
