"""Run on each of 2 ranks by test_sequence_parallel: one forward and backward of a Llama through
Ulysses (sequence_parallel=2) with the trainer's loss, under torch's profiler; writes this rank's
(held when backward starts, peak) of each of 5 steps to memory-rank-N.json."""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from launcher import rendezvous, sequence_parallel
from launcher.data import collate
from launcher.loss import install_loss_head, token_loss_sum
from tests.utils.memory_profile import profiled_step

out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
rendezvous.init_distributed(out, rank, 2, "gloo", datetime.timedelta(minutes=5), None)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**spec["config"], attn_implementation="sdpa")).float().train()
if spec["checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
sequence_parallel.register(model, "sdpa", 2, spec["batch"])
head = install_loss_head(model, "chunked", spec["chunk"])
ids = torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq_len"]))
rows = [{"input_ids": r, "labels": r, "position_ids": list(range(spec["seq_len"]))} for r in ids.tolist()]
batch = sequence_parallel.shard(collate(rows, pad_id=0), sequence_parallel.layout_for(rank, 2, 2))
token_loss_sum(model, head, batch).backward()  # gradients exist from here on, as they do in training
# Several steps: a tensor gloo's worker thread frees last (it races the main thread for the last
# reference to each exchange) is freed where the profiler does not record, so it looks held until
# the end of the step: a few MB more at random per step. The test takes the least of the steps.
steps = [profiled_step(lambda: token_loss_sum(model, head, batch), lambda summed: summed.backward()) for _ in range(5)]
(out / f"memory-rank-{rank}.json").write_text(json.dumps({"held": [h for h, _ in steps], "peak": [p for _, p in steps],
                                                          "tokens": batch["input_ids"].numel()}))
dist.destroy_process_group()
