"""Peer: Hugging Face transformers.Trainer with the same DeepSpeed ZeRO-3 JSON, model and rows.

Run by bench_trainer under torchrun (2 CPU ranks). Prints one JSON line from rank 0:
{"trained_tokens_per_s": ..., "train_runtime": ..., "trained_tokens": ...}.
"""

import json
import os
import sys
import time

os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")  # what Trainer needs to drive DeepSpeed on CPU

import torch
from accelerate import PartialState
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.integrations import HfDeepSpeedConfig

from launcher import bundled
from launcher.data import prepare_data


def main(run_dir: str, max_steps: int) -> None:
    cfg = OmegaConf.load(f"{run_dir}/config.yaml")
    ds_config = json.loads(open(f"{run_dir}/ds_config.json").read())
    PartialState(backend="gloo")
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - partition at load, as our trainer does
    path = bundled.resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rank = int(os.environ.get("RANK", 0))
    data = prepare_data(cfg.data, tokenizer, local_rank=int(os.environ.get("LOCAL_RANK", 0)), log=lambda *a: None)
    train = data.train.remove_columns([c for c in data.train.column_names if c not in ("input_ids", "labels")])
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
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    start = time.perf_counter()
    output = trainer.train()
    elapsed = time.perf_counter() - start
    total = torch.tensor([counted["tokens"]], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    if rank == 0:
        print(json.dumps({"trained_tokens_per_s": total.item() / elapsed, "train_runtime": output.metrics["train_runtime"],
                          "trained_tokens": total.item()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
