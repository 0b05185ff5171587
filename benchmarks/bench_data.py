"""Data pipeline benchmarks: packing efficiency vs padding, preprocessing throughput, cached-load time,
and the login-side check of every row against a bare load of the same file.

    python -m benchmarks.bench_data            # from the repo root; about a minute on 2 cores

Packing efficiency is the fraction of non-pad tokens in the rows the model sees. Packed rows
come from prepare_data (best-fit decreasing); the padded baselines use the same examples in the
same run: padded to the longest of each micro-batch of 8 (in a seeded random order, as the
padding mode's collate does), and padded to seq_len.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from launcher.bundled import resolve  # noqa: E402
from launcher.data import prepare_data  # noqa: E402

SEQ_LENS = (512, 2048)
SYNTHETIC_ROWS = 20_000
MICRO_BATCH = 8
WORDS = ("reverse the letters write backwards add sum of and what is plus convert to how many are in "
         "km m cm mm kg g mg l ml a b c d e f 1 2 3 4 5 6 7 8 9 0 answer with result only").split()


def synthetic_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Chat rows with long-tailed lengths (log-normal word counts, a few turns very long)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt, answer = (max(1, int(x)) for x in rng.lognormal([np.log(40), np.log(25)], 1.1))
            messages = [{"role": "user", "content": " ".join(rng.choice(WORDS, prompt))},
                        {"role": "assistant", "content": " ".join(rng.choice(WORDS, answer))}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def prepare(tok, train, root, seq_len, packing, num_proc=1):
    cfg = dict(train_files=str(train), format="auto", seq_len=seq_len, packing=packing, train_on="assistant",
               truncation="truncate", on_bad_row="error", num_proc=num_proc)
    start = time.perf_counter()
    data = prepare_data(cfg, tok, cache_root=str(root), log=lambda m: None)
    return data, time.perf_counter() - start


def padded_fill(lengths: np.ndarray, seq_len: int) -> tuple:
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = [lengths[order[i:i + MICRO_BATCH]] for i in range(0, len(order), MICRO_BATCH)]
    per_batch = lengths.sum() / sum(len(b) * b.max() for b in batches)
    return per_batch, lengths.sum() / (len(lengths) * seq_len)


def main() -> None:
    disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        synthetic = synthetic_rows(work / "synthetic.jsonl", SYNTHETIC_ROWS)
        data_sets = {"bundled tiny-tasks": resolve("bundled://tiny-tasks/train.jsonl"), "synthetic long tail": synthetic}

        print("packing efficiency (non-pad fraction of the tokens the model sees)")
        print(f"{'data':<20} {'seq_len':>7} {'examples':>8} {'packed rows':>11} {'packed':>7} "
              f"{'padded/batch':>12} {'padded/seq_len':>14}")
        for name, path in data_sets.items():
            for seq_len in SEQ_LENS:
                packed, _ = prepare(tok, path, work / "cache", seq_len, True)
                unpacked, _ = prepare(tok, path, work / "cache", seq_len, False)
                lengths = np.asarray([len(ids) for ids in unpacked.train["input_ids"]])
                per_batch, to_seq_len = padded_fill(lengths, seq_len)
                s = packed.stats
                print(f"{name:<20} {seq_len:>7} {s['train_examples']:>8} {s['train_sequences']:>11} "
                      f"{s['train_packing_efficiency']:>7.3f} {per_batch:>12.3f} {to_seq_len:>14.3f}")

        print(f"\npreprocessing throughput (synthetic, {SYNTHETIC_ROWS} rows, seq_len 2048, packed; "
              "read + tokenise + mask + pack + write)")
        print(f"{'num_proc':>8} {'seconds':>8} {'examples/s':>11} {'tokens/s':>10} {'cached load s':>14}")
        for num_proc in (1, 2):
            root = work / f"tp{num_proc}"
            data, built = prepare(tok, synthetic, root, 2048, True, num_proc)
            _, cached = prepare(tok, synthetic, root, 2048, True, num_proc)
            s = data.stats
            print(f"{num_proc:>8} {built:>8.2f} {s['rows_read'] / built:>11,.0f} {s['train_tokens'] / built:>10,.0f} "
                  f"{cached:>14.3f}")

        # What every `sft` pays on the login node to find bad rows before the queue, against the
        # peer's bare read of the same file (datasets' JSON loader, as TRL and Axolotl load data).
        from datasets import load_dataset

        from launcher.data.check import check_files

        start = time.perf_counter()
        problems, usable = check_files("data.train_files", [str(synthetic)], "auto", "error")
        ours = time.perf_counter() - start
        start = time.perf_counter()
        load_dataset("json", data_files=str(synthetic), split="train", cache_dir=str(work / "peer"))
        peer = time.perf_counter() - start
        assert not problems and usable == SYNTHETIC_ROWS
        print(f"\nlogin-side check of every row ({SYNTHETIC_ROWS} rows): {ours:.2f} s; datasets' JSON load of the "
              f"same file: {peer:.2f} s; ratio {ours / peer:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
