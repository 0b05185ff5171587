"""The GPU check (tests/gpu/gpu_check.py) at full size on this machine's GPU: a ~1B Llama trained with
DeepSpeed ZeRO-3 by every attention kernel to the same first loss, packed examples kept apart (PASS).
Skipped without a CUDA GPU; < 8 min on an H200. tests/integration/test_gpu_check.py runs it at CPU size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_every_kernel_trains_to_the_same_first_loss_and_keeps_packed_examples_apart(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the check makes its own world of one
    result = subprocess.run([sys.executable, "-m", "tests.gpu.gpu_check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pass"] is True and "PASS" in result.stdout
    assert summary["device_type"] == "cuda" and summary["precision"] == "bf16"
    assert summary["impls"] and all("error" not in r for r in summary["impls"].values()), summary["impls"]
