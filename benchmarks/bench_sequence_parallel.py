"""Sequence parallelism on 2 CPU ranks, side by side in one run: one long row per rank per step
(sequence_parallel=1, 2 data-parallel ranks, global batch 2) against each row split over both
ranks (sequence_parallel=2, global batch 1): one micro-batch per rank per step in both, so
gradient accumulation does not enter the comparison (the tests prove the losses equal).

Reported: rank 0's peak resident memory during training (as the trainer logs it, start-up
excluded), the part of it above what the rank held when training started (the steps' own:
activations, gradients in flight, the exchange), the plan's activations, and trained tokens/s,
each token counted once. The model: the bundled
tokenizer with a 25M-parameter Llama whose positions reach the row's length. Rows are packed
one long example per row: packed rows would give sdpa a whole-row mask, the same size in both
layouts (the plan counts it), which would hide what sharding the tokens saves.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.bench_trainer import BIN, ENV

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS = 8192  # one row; about as long as 2 CPU ranks train in seconds per step
STEPS = 3
COMMON = ["recipe=tiny_sft", "tracking=none", "eval.every_steps=0", "eval.generate_samples=0", "eval.max_batches=1",
          "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=1", "trainer.micro_batch_size=1",
          "trainer.global_batch_size=2", f"trainer.max_steps={STEPS}", "trainer.log_every=1", f"data.seq_len={TOKENS}",
          "data.packing=false", "cluster.procs_per_node=2"]


def long_model(tmp: Path) -> Path:
    """The bundled tokenizer with a wider Llama (25M parameters) whose positions reach TOKENS: its
    activations at a long row, not the process's libraries, are what the peak shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher import bundled

    tiny = bundled.resolve("bundled://tiny-llama")
    config = AutoConfig.from_pretrained(tiny)
    config.update(dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, max_position_embeddings=TOKENS))
    torch.manual_seed(0)
    out = tmp / "long-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def long_examples(tmp: Path) -> Path:
    """One long document per row (the bundled tasks are short): letters to reverse, each example
    about TOKENS tokens, truncated to the row."""
    import random

    rng = random.Random(0)
    path = tmp / "long.jsonl"
    with path.open("w") as f:
        for _ in range(2 * STEPS + 2):
            letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(TOKENS // 4)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": "Reverse the letters: " + " ".join(letters)},
                {"role": "assistant", "content": " ".join(reversed(letters))}]}) + "\n")
    return path


def run(tmp: Path, model: Path, data: Path, name: str, *overrides: str) -> dict:
    run_dir = tmp / name
    subprocess.run([BIN / "sft", *COMMON, f"model.path={model}", f"data.train_files={data}", "data.eval_files=null",
                    *overrides, f"run_dir={run_dir}"], check=True, env=ENV, cwd=tmp,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan = json.loads((run_dir / "plan.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["kind"] == "train" and r["step"] > 1]  # the first step traces and warms up
    held = float(re.findall(r"memory held before training: ([0-9.]+) GiB", (run_dir / "logs" / "rank-0.log").read_text())[-1])
    peak = max(r["peak_mem_gib"] for r in rows if r["kind"] == "train")  # rank 0's, since training started
    return {
        "peak_gib": peak,
        "step_gib": peak - held,
        "tokens_per_s": sum(r["trained_tokens"] for r in steady) / sum(r["trained_tokens"] / r["trained_tokens_per_s"] for r in steady),
        "planned_activations_gib": sum(plan["memory"]["parts_gib"]["activations"].values()),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, data = long_model(tmp), long_examples(tmp)
        sp1 = run(tmp, model, data, "sp1")
        sp2 = run(tmp, model, data, "sp2", "trainer.sequence_parallel=2", "trainer.global_batch_size=1")
    table = Table(title=f"one {TOKENS}-token row per data-parallel rank, 2 CPU ranks, sdpa, fp32, 25M-parameter Llama")
    for column in ("layout", "peak per rank (GiB)", "the steps' own (GiB)", "plan: activations (GiB)", "trained tokens/s"):
        table.add_column(column)
    for name, r in (("SP=1 (2 data-parallel)", sp1), ("SP=2 (1 data-parallel)", sp2)):
        table.add_row(name, f"{r['peak_gib']:.2f}", f"{r['step_gib']:.2f}", f"{r['planned_activations_gib']:.2f}",
                      f"{r['tokens_per_s']:.0f}")
    ratio = lambda key: f"{sp2[key] / sp1[key]:.2f}x"  # noqa: E731
    table.add_row("SP=2 / SP=1", ratio("peak_gib"), ratio("step_gib"), ratio("planned_activations_gib"), ratio("tokens_per_s"))
    Console().print(table)


if __name__ == "__main__":
    main()
