"""The plan's speed: `sft recipe=... dry_run=true` against DeepSpeed's own memory estimator, side by side.

    python -m benchmarks.bench_plan      # from the repo root; about 30 s

The peer answers one question (model-state memory for ZeRO-3) from the command line, the way its
documentation shows: `python -c "from deepspeed.runtime.zero.stage3 import
estimate_zero3_model_states_mem_needs_all_cold; ..."`. Ours composes the recipe, validates it and
predicts memory by part, fit, communication, step time and the stop window. Each is run ROUNDS
times, alternating; the median wall time of each is reported, with the ratio.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROUNDS = 5
REPO = Path(__file__).resolve().parents[1]
SFT = Path(sys.executable).with_name("sft")
PEER = ("from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold as e; "
        "e(total_params=8030261248, largest_layer_params=525336576, num_gpus_per_node=8, num_nodes=1)")


def seconds(cmd: list, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ("llama3_8b_sft", "llama3_70b_sft", "tiny_sft"):
            ours, peer = [], []
            for _ in range(ROUNDS):
                ours.append(seconds([str(SFT), f"recipe={recipe}", "dry_run=true", "cluster.gpu=h100"], Path(tmp)))
                peer.append(seconds([sys.executable, "-c", PEER], Path(tmp)))
            rows.append((recipe, statistics.median(ours), statistics.median(peer)))
    table = Table(title=f"Dry-run plan, median of {ROUNDS} (peer: DeepSpeed's ZeRO-3 estimator from the command line)")
    for column in ("recipe", "sft dry_run=true (s)", "DeepSpeed estimator (s)", "ratio"):
        table.add_column(column)
    for recipe, ours, peer in rows:
        table.add_row(recipe, f"{ours:.2f}", f"{peer:.2f}", f"{ours / peer:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
