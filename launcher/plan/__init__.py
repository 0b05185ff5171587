"""The plan: numbers derived from a validated config before anything runs, by arithmetic alone.

`core` (world size, batch math over data-parallel ranks, the DeepSpeed JSON), `shape` (a model's
shapes and parameter count from config.json; a mixture of experts' total and active parameters), `memory` (peak memory per GPU, by part), `comm` (bytes
moved and step time), `ulysses` (sequence parallelism: the group sizes a run can use and the bytes
its all-to-alls move), `stop_window` (checkpoint size and whether a save fits before Slurm kills the job).
What the plan needs from outside the config (the partition's GPU, this machine's GPUs, measured
write speed) is handed to it as `Found` (launcher.facts reads it); nothing here reads a file or a device.
"""

from launcher.plan.core import (Found, Plan, accelerator, batch_math, data_parallel_ranks, deep_merge, deepspeed_config,
                                default_procs_per_node, fit_to_world, make_plan)

__all__ = ["Found", "Plan", "accelerator", "batch_math", "data_parallel_ranks", "deep_merge", "deepspeed_config",
           "default_procs_per_node", "fit_to_world", "make_plan"]
