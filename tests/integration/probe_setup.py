"""For the probes the integration tests start on each rank: the trainer of a written run directory,
set up through its DeepSpeed engine (no data order, no tracking)."""

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from launcher.trainer import RankEnv, SFTTrainer


def trainer_with_engine(run_dir: Path) -> SFTTrainer:
    env = RankEnv.from_environ()
    trainer = SFTTrainer(OmegaConf.load(run_dir / "config.yaml"), run_dir, json.loads((run_dir / "ds_config.json").read_text()), env)
    # SFTTrainer.setup's steps up to the engine, without resume and tracking.
    trainer._setup_distributed()
    trainer.model_path, trainer.tokenizer = trainer._load_tokenizer()
    trainer.pad_id = trainer.tokenizer.pad_token_id
    trainer.data, trainer.steps_per_epoch, trainer.total_steps = trainer._load_data(trainer.tokenizer)
    trainer._hf_ds_config = trainer._partition_at_load()
    trainer.attn, trainer.one_row, trainer.row_tokens = trainer._attention_layout()
    trainer.model, trainer.loss_head, trainer.n_params = trainer._load_model(trainer.model_path, trainer.attn)
    trainer.engine, trainer.optimizer, trainer.scheduler = trainer._build_engine(trainer.model, trainer.total_steps)
    return trainer


def exit_now(trainer: SFTTrainer) -> None:
    """Clean up, then leave without interpreter teardown: a probe rank once aborted there (SIGABRT,
    "terminate called without an active exception") after its work was done and written."""
    trainer.cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
