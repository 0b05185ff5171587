"""What a peer takes from one of our run directories: the config, the DeepSpeed JSON, the model path,
its tokenizer and the tokenised rows our run trained; and the clock both Trainer-based peers time with."""

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from accelerate import PartialState
from omegaconf import OmegaConf
from transformers import AutoTokenizer, TrainerCallback
from transformers.integrations import HfDeepSpeedConfig

from launcher import bundled
from launcher.data import prepare_data


@dataclass
class RunInputs:
    cfg: Any
    ds_config: dict
    model_path: str
    tokenizer: Any
    data: Any
    hf_ds_config: Any  # held while the model loads: ZeRO-3 partitions it at load, as our trainer does


def read_run(run_dir: str) -> RunInputs:
    cfg = OmegaConf.load(f"{run_dir}/config.yaml")
    ds_config = json.loads(open(f"{run_dir}/ds_config.json").read())
    PartialState(backend="gloo")
    keep = HfDeepSpeedConfig(ds_config)
    path = bundled.resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = prepare_data(cfg.data, tokenizer, local_rank=int(os.environ.get("LOCAL_RANK", 0)), log=lambda *a: None)
    return RunInputs(cfg, ds_config, path, tokenizer, data, keep)


class Clock(TrainerCallback):
    """From the start of training (DeepSpeed initialised) to the end of the last optimizer step: what
    our trainer's log window times (its start-up is not in it either)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start
