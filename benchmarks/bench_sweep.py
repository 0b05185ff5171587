"""A search against the full grid of the same trials, on the local Slurm cluster, side by side.

For each sampler seed: `sft -m hydra/sweeper=search` over optim.lr on tiny_sft (8 trials, rungs
8/24/72, 2 at a time), then the same 8 points run to the end (the same seeded sampler draws the
same points; one rung at the end prunes nothing). Reported: training steps spent, wall time from
submit to the controller's end, and the best final eval loss of each, with their ratios.
A trial that fails is a finding, not a traceback: the table keeps the rows it has, each failed
trial is printed with its logs' last error, the run directories are kept, and the exit code is 1.
"""

import json
import os
import re
import shutil
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


def last_error(run_dir: Path) -> str:
    """The last error line any rank of a trial logged (a traceback's last line, or an ERROR record)."""
    found = ""
    for log in sorted((run_dir / "logs").glob("rank-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " ERROR " in line or re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
                found = f"{log.name}: {line.strip()}"
    return found or "no error in its logs"


def run_search(tmp: Path, env: dict, seed: int, rungs: str) -> dict:
    """The search's totals, and `failed`: a line per trial that did not complete or was not pruned, and why."""
    start = time.monotonic()
    out = subprocess.run([BIN / "sft", *SEARCH, f"sweep.sampler_seed={seed}", f"sweep.rungs={rungs}",
                          f"runs_root={tmp}/runs-{seed}-{len(rungs)}"], cwd=tmp, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"notes": [], "failed": [f"sft exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"]}
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
    failed = [f"search controller job {job} ended {state[0]}: "
              f"{json.loads((sweep_dir / 'search_end.json').read_text()).get('message', '')}"] if state[0] != "COMPLETED" else []
    steps, notes = 0, []
    for trial in board["trials"]:
        run_dir = Path(trial["run_dir"])
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        steps += max((r["step"] for r in rows if r["kind"] == "train"), default=0)
        notes += [f"trial {trial['trial']} was started again after: {reason}" for reason in trial.get("start_failures", [])]
        if trial["state"] not in ("completed", "pruned"):
            failed.append(f"trial {trial['trial']} {trial['state']}: {last_error(run_dir)} ({run_dir})")
    done = [t["value"] for t in board["trials"] if t["state"] == "completed" and t["value"] is not None]
    return {"steps": steps, "wall_s": wall, "best": min(done) if done else None, "completed": len(done),
            "lrs": sorted(round(t["params"]["optim.lr"], 8) for t in board["trials"]), "failed": failed, "notes": notes}


def pair(search: dict, grid: dict, key: str, form: str, ratio: str) -> tuple:
    """'search / grid' and their ratio, or '-' where either has no value."""
    a, b = search.get(key), grid.get(key)
    if a is None or b is None:
        return f"{a if a is not None else '-'} / {b if b is not None else '-'}", "-"
    return f"{a:{form}} / {b:{form}}", f"{a / b:{ratio}}x"


def main() -> int:
    env = {**os.environ, **start_cluster()}
    table = Table(title=f"search (ASHA, rungs 8/24/{MAX_STEPS}) against the full grid of the same {TRIALS} trials")
    for column in ("sampler seed", "steps search / grid", "ratio", "wall s search / grid", "ratio",
                   "best eval loss search / grid", "ratio"):
        table.add_column(column)
    failures, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for seed in SEEDS:
            search = run_search(Path(tmp), env, seed, f"[8,24,{MAX_STEPS}]")
            grid = run_search(Path(tmp), env, seed, f"[{MAX_STEPS}]")
            failures += [f"seed {seed}, {name}: {line}" for name, result in (("search", search), ("grid", grid))
                         for line in result["failed"]]
            if "lrs" in search and "lrs" in grid and search["lrs"] != grid["lrs"]:
                failures.append(f"seed {seed}: the search and the grid drew different points: {search['lrs']} / {grid['lrs']}")
            table.add_row(str(seed), *pair(search, grid, "steps", "d", ".2f"), *pair(search, grid, "wall_s", ".0f", ".2f"),
                          *pair(search, grid, "best", ".4f", ".3f"))
            notes += [f"seed {seed}, {name}: {line}" for name, result in (("search", search), ("grid", grid))
                      for line in result["notes"]]
            if failures:  # kept for reading: a failed trial is a finding
                kept = Path(tempfile.mkdtemp(prefix="bench-sweep-failed-"))
                shutil.copytree(tmp, kept, dirs_exist_ok=True)
                failures.append(f"run directories kept in {kept}")
                break
    Console().print(table)
    for line in notes:
        print(f"note: {line}")
    for line in failures:
        print(f"failed: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
