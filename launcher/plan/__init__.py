"""The plan: numbers derived from a validated config before anything runs.

`core` (world size, batch math, the DeepSpeed JSON), `shape` (a model's shapes and parameter
count from config.json), `memory` (peak memory per GPU, by part), `comm` (bytes moved and step
time), `stop_window` (checkpoint size and whether a save fits before Slurm kills the job).
"""

from launcher.plan.core import Plan, accelerator, batch_math, deep_merge, deepspeed_config, default_procs_per_node, make_plan

__all__ = ["Plan", "accelerator", "batch_math", "deep_merge", "deepspeed_config", "default_procs_per_node", "make_plan"]
