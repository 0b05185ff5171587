"""Shared fixtures: composing configs the way `sft` does, and running the real CLI."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_dir

from launcher.cli import CONF_DIR
from launcher.schema import register_configs

REPO = Path(__file__).resolve().parent.parent
SFT = str(Path(sys.executable).with_name("sft"))
SFT_JOBS = str(Path(sys.executable).with_name("sft-jobs"))
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))

# Offline everywhere: nothing in the suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def compose_config(overrides: List[str] = ()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_sft(args: List[str], cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TMPDIR": str(cwd), **(env or {})},
    )


@pytest.fixture
def compose_cfg():
    return compose_config
