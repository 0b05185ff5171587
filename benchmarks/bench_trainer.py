"""Trainer benchmarks, measured side by side in one run on 2 CPU ranks:
- trained tokens/s against transformers.Trainer with the same DeepSpeed ZeRO-3 JSON,
  model and rows: both padding, and our packing against Trainer's padding;
- start-up: command to first optimizer step, against torchrun of a minimal DeepSpeed script;
- checkpoint save and resume time of the tiny model.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
STEPS = 40
COMMON = ["recipe=tiny_sft", "tracking=none", "eval.every_steps=0", "eval.generate_samples=0", "eval.max_batches=1",
          "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=2", "trainer.micro_batch_size=8",
          "trainer.global_batch_size=32"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def sft(run_dir: Path, *overrides: str) -> float:
    start = time.time()
    subprocess.run([BIN / "sft", *COMMON, *overrides, f"run_dir={run_dir}"], check=True, env=ENV, cwd=run_dir.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def log_time(run_dir: Path, pattern: str) -> float:
    """Wall-clock of the first rank-0 log line matching pattern."""
    for line in (run_dir / "logs" / "rank-0.log").read_text().splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise LookupError(pattern)


def log_seconds(run_dir: Path, pattern: str) -> float:
    text = (run_dir / "logs" / "rank-0.log").read_text()
    return float(re.findall(pattern, text)[-1])


def torchrun(script: str, *args: str) -> dict:
    out = subprocess.run([BIN / "torchrun", "--nproc_per_node=2", "--master_port=29531", str(REPO / "benchmarks" / "peers" / script), *args],
                         check=True, env={**ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    rows = []

    padded = tmp / "padded"
    sft(padded, f"trainer.max_steps={STEPS}", f"trainer.log_every={STEPS}", "data.packing=false")
    ours_padded = metrics(padded)[0]["trained_tokens_per_s"]
    packed = tmp / "packed"
    sft(packed, f"trainer.max_steps={STEPS}", f"trainer.log_every={STEPS}", "data.packing=true")
    ours_packed = metrics(packed)[0]["trained_tokens_per_s"]
    peer = torchrun("hf_trainer.py", str(padded), str(STEPS))["trained_tokens_per_s"]
    rows.append(("trained tokens/s, both padding", f"{ours_padded:,.0f}", f"{peer:,.0f}", ours_padded / peer, ">= 1.0"))
    rows.append(("trained tokens/s, our packing vs Trainer padding", f"{ours_packed:,.0f}", f"{peer:,.0f}", ours_packed / peer, ">= 1.5"))

    startup = tmp / "startup"
    started = sft(startup, "trainer.max_steps=2", "trainer.log_every=1")
    ours_start = log_time(startup, r"train step 1 ") - started
    t0 = time.time()
    peer_start = torchrun("minimal_deepspeed.py", str(startup))["first_step_at"] - t0
    rows.append(("seconds to the first optimizer step", f"{ours_start:.1f}", f"{peer_start:.1f}", ours_start / peer_start, "lower is better"))

    save_s = log_seconds(packed, r"saved in ([\d.]+) s")
    sft(packed, f"trainer.max_steps={STEPS + 1}", f"trainer.log_every={STEPS}", "data.packing=true")
    resume_s = log_seconds(packed, r"resumed from .* in ([\d.]+) s")
    rows.append(("checkpoint save / resume (s), tiny model", f"{save_s:.2f} / {resume_s:.2f}", "", None, ""))

    table = Table(title=f"Trainer benchmarks ({STEPS} steps, 2 CPU ranks, ZeRO-3; peer = transformers.Trainer / torchrun)")
    for col in ("measure", "ours", "peer", "ratio", "goal"):
        table.add_column(col)
    for name, ours, theirs, ratio, goal in rows:
        table.add_row(name, ours, theirs, "" if ratio is None else f"{ratio:.2f}", goal)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
