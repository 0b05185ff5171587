"""A search against the full grid of the same trials, on the local Slurm cluster, side by side.

For each sampler seed: `sft -m hydra/sweeper=search` over optim.lr on tiny_sft (8 trials, rungs
8/24/72, 2 at a time), then the same 8 points run to the end (the same seeded sampler draws the
same points; one rung at the end prunes nothing). Reported: training steps spent, wall time from
submit to the controller's end, and the best final eval loss of each, with their ratios.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
MAX_STEPS, TRIALS = 72, 8
SEARCH = ["-m", "hydra/sweeper=search", "recipe=tiny_sft", "cluster=slurm", "cluster.gpus_per_node=0",
          "cluster.procs_per_node=1", "cluster.cpus_per_task=1", "cluster.time_min=10", "cluster.partition=debug",
          "trainer.micro_batch_size=8", "trainer.global_batch_size=8", f"trainer.max_steps={MAX_STEPS}",
          "trainer.log_every=4", "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0",
          "checkpoint.every_steps=0", "checkpoint.export=false", "tracking=none",
          "optim.lr=tag(log,interval(1e-4,3e-2))", f"sweep.trials={TRIALS}", "sweep.parallel=2", "sweep.poll_s=1"]
SEEDS = (42, 7)


def start_cluster() -> dict:
    out = subprocess.run([REPO / "slurm" / "start-cluster.sh"], check=True, capture_output=True, text=True).stdout
    return dict(re.findall(r"^export (\w+)=(\S+)$", out, flags=re.M))


def run_search(tmp: Path, env: dict, seed: int, rungs: str) -> dict:
    start = time.monotonic()
    out = subprocess.run([BIN / "sft", *SEARCH, f"sweep.sampler_seed={seed}", f"sweep.rungs={rungs}",
                          f"runs_root={tmp}/runs-{seed}-{len(rungs)}"], cwd=tmp, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    job = out.stdout.split("submitted search controller job ")[1].split()[0]
    sweep_dir = Path(out.stdout.split("sweep directory: ")[1].split()[0])
    while True:
        state = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], env=env, capture_output=True,
                               text=True).stdout.split()
        if state and state[0] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(1)
    wall = time.monotonic() - start
    board = json.loads(subprocess.run([BIN / "sft-jobs", "sweep", str(sweep_dir), "--json"], env=env, capture_output=True,
                                      text=True, check=True).stdout)
    steps = 0
    for trial in board["trials"]:
        rows = [json.loads(line) for line in (Path(trial["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        steps += max(r["step"] for r in rows if r["kind"] == "train")
    done = [t for t in board["trials"] if t["state"] == "completed"]
    return {"steps": steps, "wall_s": wall, "best": min(t["value"] for t in done), "completed": len(done),
            "lrs": sorted(round(t["params"]["optim.lr"], 8) for t in board["trials"])}


def main() -> None:
    env = {**os.environ, **start_cluster()}
    table = Table(title=f"search (ASHA, rungs 8/24/{MAX_STEPS}) against the full grid of the same {TRIALS} trials")
    for column in ("sampler seed", "steps search / grid", "ratio", "wall s search / grid", "ratio",
                   "best eval loss search / grid", "ratio"):
        table.add_column(column)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for seed in SEEDS:
            search = run_search(Path(tmp), env, seed, f"[8,24,{MAX_STEPS}]")
            grid = run_search(Path(tmp), env, seed, f"[{MAX_STEPS}]")
            assert search["lrs"] == grid["lrs"], (search["lrs"], grid["lrs"])
            table.add_row(str(seed), f"{search['steps']} / {grid['steps']}", f"{search['steps'] / grid['steps']:.2f}x",
                          f"{search['wall_s']:.0f} / {grid['wall_s']:.0f}", f"{search['wall_s'] / grid['wall_s']:.2f}x",
                          f"{search['best']:.4f} / {grid['best']:.4f}", f"{search['best'] / grid['best']:.3f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
