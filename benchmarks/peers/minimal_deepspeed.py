"""Peer: the smallest hand-written DeepSpeed ZeRO-3 script, run under torchrun; prints the wall
clock of its first optimizer step so bench_trainer can measure start-up."""

import json
import sys
import time

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

run_dir = sys.argv[1]
ds_config = json.loads(open(f"{run_dir}/ds_config.json").read())
deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig(ds_config)  # noqa: F841
from launcher import bundled  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(bundled.resolve("bundled://tiny-llama"), dtype=torch.float32)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds_config)
ids = torch.randint(0, 400, (ds_config["train_micro_batch_size_per_gpu"], 128))
for _ in range(ds_config["gradient_accumulation_steps"]):
    loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
if torch.distributed.get_rank() == 0:
    print(json.dumps({"first_step_at": time.time()}), flush=True)
engine.destroy()
torch.distributed.destroy_process_group()
