"""Sequence parallelism on 2 CPU ranks, side by side in one run: one long packed row per rank
(sequence_parallel=1, 2 data-parallel ranks) against each row split over both ranks
(sequence_parallel=2, accumulation 2: the same global batch of rows and tokens per step).

Reported: peak memory per rank (the largest rank's peak resident memory, start-up included, as
the trainer logs it) and trained tokens/s, each token counted once. The model is the bundled
tiny Llama with its position limit raised so a row can be long.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.bench_trainer import BIN, ENV

TOKENS = 8192  # one row; about as long as 2 CPU ranks train in seconds per step
STEPS = 3
COMMON = ["recipe=tiny_sft", "tracking=none", "eval.every_steps=0", "eval.generate_samples=0", "eval.max_batches=1",
          "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=1", "trainer.micro_batch_size=1",
          "trainer.global_batch_size=2", f"trainer.max_steps={STEPS}", "trainer.log_every=1", f"data.seq_len={TOKENS}",
          "cluster.procs_per_node=2"]


def long_model(tmp: Path) -> Path:
    """The bundled tiny Llama with max_position_embeddings raised to TOKENS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from launcher import bundled

    out = tmp / "tiny-long"
    shutil.copytree(bundled.resolve("bundled://tiny-llama"), out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = TOKENS
    (out / "config.json").write_text(json.dumps(config))
    return out


def run(tmp: Path, model: Path, name: str, *overrides: str) -> dict:
    run_dir = tmp / name
    subprocess.run([BIN / "sft", *COMMON, f"model.path={model}", *overrides, f"run_dir={run_dir}"], check=True, env=ENV,
                   cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["kind"] == "train" and r["step"] > 1]  # the first step traces and warms up
    return {
        "peak_gib": max(r["peak_mem_gib_max"] for r in rows if r["kind"] == "train"),
        "tokens_per_s": sum(r["trained_tokens"] for r in steady) / sum(r["trained_tokens"] / r["trained_tokens_per_s"] for r in steady),
        "loss": steady[-1]["loss"],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = long_model(tmp)
        sp1 = run(tmp, model, "sp1")
        sp2 = run(tmp, model, "sp2", "trainer.sequence_parallel=2")
    table = Table(title=f"one {TOKENS}-token packed row per data-parallel rank, 2 CPU ranks, sdpa, fp32")
    for column in ("layout", "peak memory per rank (GiB)", "trained tokens/s", f"loss at step {STEPS}"):
        table.add_column(column)
    for name, r in (("sequence_parallel=1 (2 data-parallel)", sp1), ("sequence_parallel=2 (1 data-parallel)", sp2)):
        table.add_row(name, f"{r['peak_gib']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['loss']:.5f}")
    table.add_row("SP=2 / SP=1", f"{sp2['peak_gib'] / sp1['peak_gib']:.2f}x", f"{sp2['tokens_per_s'] / sp1['tokens_per_s']:.2f}x", "")
    Console().print(table)


if __name__ == "__main__":
    main()
