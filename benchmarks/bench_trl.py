"""Trained tokens/s against TRL's SFTTrainer (padding_free=True), side by side in one run on 2 CPU ranks,
for the bundled tiny dense model and the bundled tiny MoE: the same packed rows, DeepSpeed ZeRO-3 JSON,
micro batch, accumulation, learning rate and steps (benchmarks/peers/trl_sft.py reads them from our run dir).
The MoE trains with its router's load-balancing loss on both sides (the README says what each computes).
"""

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.bench_trainer import metrics, sft, torchrun

STEPS = 40
GOAL = 1.2
MODELS = [  # (run dir, row label, overrides of recipe=tiny_sft)
    ("dense", "tiny dense (bundled://tiny-llama)", []),
    ("moe", "tiny MoE (bundled://tiny-moe)", ["model=tiny_moe"]),
]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    table = Table(title=f"Trained tokens/s against TRL SFTTrainer, padding_free=True ({STEPS} steps, same packed rows, "
                        "2 CPU ranks, ZeRO-3)")
    for col in ("model", "ours", "TRL", "ratio", "goal", "trained tokens ours / TRL"):
        table.add_column(col)
    for name, label, overrides in MODELS:
        run = tmp / name
        sft(run, *overrides, f"trainer.max_steps={STEPS}", f"trainer.log_every={STEPS}", "data.packing=true")
        ours = next(row for row in metrics(run) if row["kind"] == "train")  # one row: every step
        peer = torchrun("trl_sft.py", str(run), str(STEPS))
        ratio = ours["trained_tokens_per_s"] / peer["trained_tokens_per_s"]
        table.add_row(label, f"{ours['trained_tokens_per_s']:,.0f}", f"{peer['trained_tokens_per_s']:,.0f}", f"{ratio:.2f}",
                      f">= {GOAL}", f"{ours['trained_tokens']:,} / {peer['trained_tokens']:,.0f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
