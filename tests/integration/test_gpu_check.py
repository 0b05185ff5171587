"""tests/gpu/gpu_check.py at CPU size (--tiny): the same code the GPU check runs, end to end on a real
single-rank DeepSpeed ZeRO-3 engine (gloo), through launcher.data.collate and launcher.loss."""

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_tiny_gpu_check_trains_every_kernel_to_the_same_first_loss(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the check makes its own world of one
    result = subprocess.run([sys.executable, "-m", "tests.gpu.gpu_check", "--tiny"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == summary
    assert summary["pass"] is True and "PASS" in result.stdout
    impls = summary["impls"]
    assert {"eager", "sdpa"} <= impls.keys()
    for name in ("eager", "sdpa"):
        r = impls[name]
        assert "error" not in r, r
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["all_losses"]), r
        assert r["tokens_per_s"] > 0 and r["timed_steps"] >= 1
        assert r["mfu"] is None  # no known peak on a CPU
        # Packed examples match each alone; the control where they see each other does not.
        assert r["isolation"]["rel_diff"] < 1e-5 and r["isolation"]["leak_rel_diff"] > 1e-2, r["isolation"]
    first = [impls[name]["losses"][0] for name in ("eager", "sdpa")]
    assert abs(first[0] - first[1]) <= 1e-5 * abs(first[0])
    # Random init: the loss starts near ln(vocabulary) (uniform predictions).
    assert abs(first[0] - math.log(summary["model"]["vocab_size"])) < 0.5
    assert summary["params"] > 0 and summary["precision"] == "fp32"
