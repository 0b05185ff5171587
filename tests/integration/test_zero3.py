"""ZeRO-3 really partitions: each rank holds 1/world of every parameter, nothing whole."""

import json
import math
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from launcher.backends.local import rank_env
from launcher.rendezvous import new_attempt_id
from launcher.service import write_run_files
from launcher.facts import find
from launcher.plan import deepspeed_config, make_plan
from launcher.resume import fingerprint
from launcher.validate import check_config
from tests.conftest import REPO, compose_config


def test_every_parameter_is_sharded_across_ranks(tmp_path):
    overrides = ["recipe=tiny_sft", "tracking=none", f"run_dir={tmp_path}"]
    cfg = compose_config(overrides)
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    write_run_files(tmp_path, OmegaConf.to_container(cfg, resolve=True), overrides, checked, plan, deepspeed_config(cfg, plan), fingerprint(cfg, plan))
    attempt = new_attempt_id()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("zero3_probe.py")), str(tmp_path)],
                              env={**rank_env(r, 2, attempt, 2), "PYTHONPATH": str(REPO)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    shards = [json.loads((tmp_path / f"shards-rank{r}.json").read_text()) for r in range(2)]
    assert shards[0].keys() == shards[1].keys() and len(shards[0]) > 10
    for name, (local, full, visible) in shards[0].items():
        assert visible == 0, name  # released after the forward: nothing kept whole (persistence threshold 0)
        assert local == math.ceil(full / 2), name
        assert shards[1][name][0] == local, name
    total = sum(full for _, full, _ in shards[0].values())
    assert total == checked.model.params
