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
    trainer._setup_distributed()
    trainer._setup_tokenizer()
    trainer._setup_data()
    trainer._setup_model()
    trainer._setup_optimizer_and_engine()
    return trainer


def exit_now(trainer: SFTTrainer) -> None:
    """Clean up, then leave without interpreter teardown: a probe rank once aborted there (SIGABRT,
    "terminate called without an active exception") after its work was done and written."""
    trainer.cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
