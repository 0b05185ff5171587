"""Peer: Hugging Face transformers.Trainer with the same DeepSpeed ZeRO-3 JSON, model and rows.

Run by bench_trainer under torchrun (2 CPU ranks). Prints one JSON line from rank 0:
{"trained_tokens_per_s": ..., "train_runtime": ..., "trained_tokens": ...}; tokens/s over the steps
alone (DeepSpeed's start-up excluded, as our log window excludes ours), train_runtime with it.
"""

import json
import os
import sys

os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")  # what Trainer needs to drive DeepSpeed on CPU

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from benchmarks.peers.run_inputs import Clock, read_run


def main(run_dir: str, max_steps: int) -> None:
    run = read_run(run_dir)
    cfg, ds_config, path, tokenizer = run.cfg, run.ds_config, run.model_path, run.tokenizer
    rank = int(os.environ.get("RANK", 0))
    train = run.data.train.remove_columns([c for c in run.data.train.column_names if c not in ("input_ids", "labels")])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    counted = {"tokens": 0}  # trained (label != -100) tokens this rank really consumed

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counted["tokens"] += int((labels[:, 1:] != -100).sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=f"{run_dir}/hf_trainer", per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"], max_steps=max_steps,
        learning_rate=cfg.optim.lr, lr_scheduler_type="cosine", warmup_steps=cfg.optim.warmup_steps,
        deepspeed=ds_config, report_to=[], save_strategy="no", logging_steps=10**6, seed=cfg.seed,
        dataloader_num_workers=0, accelerator_config={"use_configured_state": True}, remove_unused_columns=False,
    )
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock])
    output = trainer.train()
    elapsed = clock.seconds
    total = torch.tensor([counted["tokens"]], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    if rank == 0:
        print(json.dumps({"trained_tokens_per_s": total.item() / elapsed, "train_runtime": output.metrics["train_runtime"],
                          "trained_tokens": total.item()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
