"""Checkpoint save cost: the launcher's atomic save against DeepSpeed's bare save, side by side.

    python -m benchmarks.bench_checkpoint      # from the repo root; about a minute on 2 cores

Two CPU ranks hold one ZeRO-3 engine (a 25M-parameter Llama with AdamW: ~290 MB of state). Each
round saves it both ways, alternating: `engine.save_checkpoint` into a plain directory (the peer:
what the launcher did before), and `launcher.checkpoint.save` (staging directory, fsync of every
file, durable marker, rename). The ratio is the price of a checkpoint that appears only complete.
"""

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 3


def rank_main(out: Path) -> None:
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from launcher import bundled, checkpoint, rendezvous

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rendezvous.init_distributed(out, rank, world, "gloo", datetime.timedelta(minutes=10))
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - partitions the model as it is built
    config = AutoConfig.from_pretrained(bundled.resolve("bundled://tiny-llama"))
    config.update(dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, head_dim=64))
    model = AutoModelForCausalLM.from_config(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=ds_config)
    ids = torch.randint(0, config.vocab_size, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # Adam moments exist: the save holds the full optimizer state
    times = {"bare": [], "atomic": []}
    for i in range(ROUNDS):
        torch.distributed.barrier()
        start = time.perf_counter()
        engine.save_checkpoint(str(out / "bare"), tag=f"step-{i}", client_state={"global_step": i}, save_latest=False)
        torch.distributed.barrier()
        times["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoint.save(engine, out / "run", i, rank, world, {"global_step": i}, {})
        times["atomic"].append(time.perf_counter() - start)
    if rank == 0:
        size = sum(p.stat().st_size for p in checkpoint.step_dir(out / "run", 0).rglob("*") if p.is_file())
        (out / "times.json").write_text(json.dumps({**times, "bytes": size}))
    engine.destroy()
    torch.distributed.destroy_process_group()


def main() -> None:
    from launcher.backends.local import rank_env
    from launcher.rendezvous import new_attempt_id

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        attempt = new_attempt_id()
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_checkpoint", "--rank", str(out)],
                                  env=rank_env(r, 2, attempt, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for r in range(2)]
        if [p.wait() for p in procs] != [0, 0]:
            sys.exit("a rank failed")
        result = json.loads((out / "times.json").read_text())
    bare, atomic = statistics.median(result["bare"]), statistics.median(result["atomic"])
    print(f"checkpoint of {result['bytes'] / 2**20:.0f} MiB, 2 ranks, median of {ROUNDS} rounds")
    print(f"  DeepSpeed save_checkpoint (peer):             {bare:.2f} s")
    print(f"  launcher.checkpoint.save (atomic, fsynced):   {atomic:.2f} s   ratio {atomic / bare:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(Path(sys.argv[2]))
    else:
        main()
