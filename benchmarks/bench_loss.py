"""The training loss's memory: peak memory of one training step (forward + backward) on CPU, with the
`full` loss of launcher/loss.py (every position's fp32 logits) against its `chunked` loss (the
projection and loss one chunk of trained tokens at a time, recomputed in backward), side by side.

    python -m benchmarks.bench_loss      # from the repo root; 1-2 minutes on 2 cores

The model is a Llama with Llama 3's 128,256-token vocabulary and a tiny body (hidden 64, 2 layers,
fp32, untied lm_head), so the output projection and the loss dominate the step, as they do for
small models and long rows. The batch is one packed row of 4,096 tokens (4 examples of 1,024,
every token trained: labels = input ids), collated by launcher.data.collate; the head is installed
by launcher.loss.install_loss_head and the loss is launcher.loss.token_loss_sum, as in the trainer.

Each variant runs in a fresh process: build the model and batch, a warm-up step on the row's first
1,024 tokens (it makes the .grad buffers and initialises the kernels; a full-size one would only
double the run time), zero the gradients in place, then measure one step on the whole row.

Peak step memory is the torch profiler's memory accounting (profile_memory=True): every tensor
allocation and free during the step, in time order; the peak of their running sum is the most
tensor memory the step held on top of the weights, gradients and batch, i.e. the activations plus
the loss's transient logits. It counts tensors, not the process: the resident set grows by that
plus malloc's overhead (checked when this was written: VmHWM growth over the step, with the
high-water mark reset through /proc/self/clear_refs, came out 30-120 MiB above it for full and
chunked-1024, and 120-400 MiB above it for chunked-256, run to run).

Both variants must agree with full: the summed loss to a relative 1e-6, the lm_head weight's
gradient to a relative 1e-5 (norm of the difference over the norm); otherwise the exit code is 1.
"""

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

VOCAB, TOKENS, EXAMPLES = 128_256, 4096, 4
VARIANTS = (("full", 0), ("chunked", 1024), ("chunked", 256))  # (trainer.loss, trainer.loss_chunk_tokens)
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def child(mode: str, chunk: int, out: Path) -> None:
    """One variant in this process: warm-up step, then the measured step; results to out.json / out.pt."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.data import collate
    from launcher.loss import install_loss_head, token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TOKENS,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    head = install_loss_head(model, mode, chunk or 1024)
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    positions = list(range(TOKENS // EXAMPLES)) * EXAMPLES
    batch = collate([{"input_ids": ids, "labels": ids, "position_ids": positions}], pad_id=0, one_row=False)
    warm = TOKENS // EXAMPLES
    warm_batch = collate([{"input_ids": ids[:warm], "labels": ids[:warm], "position_ids": positions[:warm]}], pad_id=0)

    token_loss_sum(model, head, warm_batch).backward()  # warm-up
    model.zero_grad(set_to_none=False)
    gc.collect()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = token_loss_sum(model, head, batch)
        loss.backward()
    seconds = time.perf_counter() - start
    held = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()  # > 0 allocated, < 0 freed
        peak = max(peak, held)
    torch.save(model.get_output_embeddings().weight.grad, out.with_suffix(".pt"))
    out.with_suffix(".json").write_text(json.dumps(
        {"loss": loss.item(), "trained": batch["trained"], "peak": peak, "seconds": seconds}))


def main() -> None:
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, chunk in VARIANTS:
            out = Path(tmp) / f"{mode}-{chunk}"
            # stderr kept back (the profiler logs its start and stop there), shown if the child fails
            run = subprocess.run([sys.executable, "-m", "benchmarks.bench_loss", "--child", mode, str(chunk), str(out)],
                                 stderr=subprocess.PIPE, text=True)
            if run.returncode:
                sys.exit(f"{mode} {chunk} failed:\n{run.stderr}")
            result = json.loads(out.with_suffix(".json").read_text())
            result["grad"] = torch.load(out.with_suffix(".pt"))
            results[(mode, chunk)] = result

    full = results[("full", 0)]
    mib = 2**20
    logits = TOKENS * VOCAB * 4
    table = Table(title=f"One training step (forward + backward), CPU, fp32: Llama, vocabulary {VOCAB:,}, hidden 64, "
                        f"2 layers; one packed row of {TOKENS:,} tokens ({full['trained']:,} trained)")
    for column in ("loss path", "peak step memory (MiB)", "ratio to full", "step (s)",
                   "loss rel. diff", "lm_head grad rel. diff"):
        table.add_column(column, justify="left" if column == "loss path" else "right")
    failed = []
    for (mode, chunk), r in results.items():
        loss_diff = abs(r["loss"] - full["loss"]) / abs(full["loss"])
        grad_diff = ((r["grad"] - full["grad"]).norm() / full["grad"].norm()).item()
        if not (loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL):
            failed.append(f"{mode} {chunk}: loss rel. diff {loss_diff:.1e}, grad rel. diff {grad_diff:.1e}")
        name = "full (every position's fp32 logits)" if mode == "full" else f"chunked, {chunk:,} tokens per chunk"
        table.add_row(name, f"{r['peak'] / mib:,.0f}", f"{r['peak'] / full['peak']:.2f}x",
                      f"{r['seconds']:.1f}", f"{loss_diff:.1e}", f"{grad_diff:.1e}")
    Console(width=150).print(table)
    print(f"one fp32 copy of the full logits: {TOKENS:,} x {VOCAB:,} x 4 B = {logits / mib:,.0f} MiB "
          f"({logits / 2**30:.2f} GiB); of one 1,024-token chunk: {1024 * VOCAB * 4 / mib:,.0f} MiB")
    print(f"summed loss (full): {full['loss']:.4f} over {full['trained']:,} trained tokens; agreement required: "
          f"loss rel. {LOSS_RTOL:.0e}, lm_head grad rel. {GRAD_RTOL:.0e} (norm of difference / norm)")
    if failed:
        sys.exit("loss paths disagree with full: " + "; ".join(failed))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
