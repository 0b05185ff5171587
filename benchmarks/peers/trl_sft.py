"""Peer: TRL's SFTTrainer, padding-free, with the same DeepSpeed ZeRO-3 JSON, model and packed rows as a run.

Run by bench_trl under torchrun (2 CPU ranks) on a run dir of ours: its config.yaml names the model and
data, its ds_config.json is handed to SFTConfig as it is. The rows are the ones the run trained (our
packed rows, seq_len tokens each, several examples apiece); each row's example lengths go in TRL's
`seq_lengths` column, so padding_free=True flattens a micro-batch into one row whose position_ids restart
at every example, as TRL's own packing does. A MoE model trains with its router aux loss as TRL gives it
(output_router_logits on, coef x load_balancing_loss_func over every token of the micro-batch).

Prints one JSON line from rank 0:
{"trained_tokens_per_s": ..., "seconds": ..., "trained_tokens": ..., "steps": ...}: trained tokens are
those with a loss label (every rank's), the time runs from the first step's batch to the last step's
end (DeepSpeed's start-up excluded), as our trainer's log window does.
"""

import json
import os
import sys

os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")  # what Trainer needs to drive DeepSpeed on CPU

import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from benchmarks.peers.run_inputs import Clock, read_run


def example_lengths(position_ids):
    """A packed row's example lengths, from its position_ids restarting at 0 per example."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


class CountingSFTTrainer(SFTTrainer):
    """Counts this rank's trained tokens (labels the model scores) in the micro-batches it trains on."""

    trained = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained += int((inputs["labels"][:, 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


def main(run_dir: str, max_steps: int) -> None:
    run = read_run(run_dir)
    cfg, ds_config, path, tokenizer = run.cfg, run.ds_config, run.model_path, run.tokenizer
    train = run.data.train.map(lambda r: {"seq_lengths": example_lengths(r["position_ids"])}, keep_in_memory=True)
    train = train.select_columns(["input_ids", "labels", "seq_lengths"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    coef = cfg.model.get("router_aux_loss_coef")
    if hasattr(model.config.get_text_config(), "router_aux_loss_coef"):
        model.config.get_text_config().output_router_logits = True  # as a user trains a MoE: with its aux loss
    args = SFTConfig(
        output_dir=f"{run_dir}/trl_sft", padding_free=True, max_length=None,  # rows already seq_len: no truncation
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"], max_steps=max_steps,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=cfg.optim.warmup_steps, router_aux_loss_coef=coef, deepspeed=ds_config, bf16=False, fp16=False,
        gradient_checkpointing=bool(cfg.trainer.activation_checkpointing), report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=10**6, seed=cfg.seed, dataloader_num_workers=0,
        accelerator_config={"use_configured_state": True},
    )
    clock = Clock()
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    seconds = clock.seconds
    total = torch.tensor([trainer.trained], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"trained_tokens_per_s": total.item() / seconds, "seconds": seconds, "trained_tokens": total.item(),
                          "steps": trainer.state.global_step, "aux_loss": trainer.aux_loss_enabled}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
