"""Run on each rank by test_zero3: set the trainer up, record every parameter's local shard size."""

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from launcher.trainer import RankEnv, SFTTrainer

run_dir = Path(sys.argv[1])
env = RankEnv.from_environ()
trainer = SFTTrainer(OmegaConf.load(run_dir / "config.yaml"), run_dir, json.loads((run_dir / "ds_config.json").read_text()), env)
trainer._setup_distributed()
trainer._setup_tokenizer()
trainer._setup_data()
trainer._setup_model()
trainer._setup_optimizer_and_engine()
shards = {name: [p.ds_tensor.numel(), p.ds_numel, p.numel()] for name, p in trainer.engine.module.named_parameters()}
(run_dir / f"shards-rank{env.rank}.json").write_text(json.dumps(shards))
trainer.cleanup()
