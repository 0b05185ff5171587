"""Run on each rank by test_zero3: set the trainer up, record every parameter's local shard size."""

import json
import sys
from pathlib import Path

from tests.integration.probe_setup import exit_now, trainer_with_engine

run_dir = Path(sys.argv[1])
trainer = trainer_with_engine(run_dir)
shards = {name: [p.ds_tensor.numel(), p.ds_numel, p.numel()] for name, p in trainer.engine.module.named_parameters()}
(run_dir / f"shards-rank{trainer.env.rank}.json").write_text(json.dumps(shards))
exit_now(trainer)
