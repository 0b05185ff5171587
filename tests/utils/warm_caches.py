"""Fill the session's own empty caches (tests/conftest.py) as first runs would: the bundled models and
task data, and the DeepSpeed ops a run compiles on this machine. tests/conftest.py starts it in the
background when the session will start ranks, so the builds overlap the first tests rather than
holding up the first runs. It takes the locks the ranks take (launcher.atomic.build_once,
launcher.ops.build): a run that starts meanwhile waits for what is being built, then loads it."""

import os

from launcher import bundled, ops
from launcher.devices import local_gpu_count

if __name__ == "__main__":
    bundled.resolve("bundled://tiny-llama")  # what the first runs need, first
    bundled.resolve("bundled://tiny-tasks/train.jsonl")
    if not local_gpu_count():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as launcher.backends.local.rank_env sets it for ranks
    from deepspeed.accelerator import get_accelerator

    ops.build(ops.needed("adamw", get_accelerator().device_name()), print)
    bundled.resolve("bundled://tiny-moe")
