"""Shared fixtures: composing configs the way `sft` does, and running the real CLI."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


def _own_caches() -> Path:
    """Every cache the project fills or reads, empty for this session (ranks and Slurm jobs inherit it).

    A green suite must mean a green suite on a new machine: no bundled model, tokenised data,
    compiled DeepSpeed op or Hugging Face / W&B state left by an earlier run may help. Set
    SFT_TEST_CACHES=DIR to reuse DIR across sessions while iterating (never in CI).
    """
    reuse = os.environ.get("SFT_TEST_CACHES")
    root = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="sft-test-caches-"))
    dirs = {
        "SFT_CACHE_DIR": "sft-launcher", "HF_HOME": "huggingface", "TORCH_EXTENSIONS_DIR": "torch_extensions",
        "XDG_CACHE_HOME": "xdg", "TRITON_CACHE_DIR": "triton", "MPLCONFIGDIR": "matplotlib",
        "WANDB_CACHE_DIR": "wandb-cache", "WANDB_CONFIG_DIR": "wandb-config", "WANDB_DATA_DIR": "wandb-data",
    }
    for var, name in dirs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(root / name)
    os.environ.pop("HF_DATASETS_CACHE", None)  # under HF_HOME
    return root


CACHES = _own_caches()


TIERS = ("unit", "integration", "cluster", "gpu")  # tests/<tier>/; markers registered in pyproject.toml


def pytest_collection_modifyitems(config, items):
    """Each test is marked with its tier, the folder under tests/ it lives in (`-m unit` is `make test-fast`)."""
    root = Path(__file__).resolve().parent
    for item in items:
        path = item.path.resolve()
        if root in path.parents and path.relative_to(root).parts[0] in TIERS:
            item.add_marker(path.relative_to(root).parts[0])


_warm_up = None  # the background build of the session's caches (tests/utils/warm_caches.py)


def pytest_collection_finish(session):
    """A session that starts ranks (integration, cluster) builds its empty caches in the background
    meanwhile: the bundled model and data, DeepSpeed's compiled ops (~25 s of both cores). The first
    tests to run are light (sbatch round trips, dry runs); the first run that needs a cache waits
    for it as it would wait for another rank building it."""
    global _warm_up
    if session.config.option.collectonly or not any(
            item.get_closest_marker("integration") or item.get_closest_marker("cluster") for item in session.items):
        return
    with open(CACHES / "warm_caches.log", "w") as log:
        _warm_up = subprocess.Popen([sys.executable, "-m", "tests.utils.warm_caches"], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})


def pytest_sessionfinish(session, exitstatus):
    if _warm_up is not None and _warm_up.poll() is None:  # a short session: its compiler goes with it
        os.killpg(_warm_up.pid, signal.SIGKILL)
        _warm_up.wait()
    if not os.environ.get("SFT_TEST_CACHES"):
        shutil.rmtree(CACHES, ignore_errors=True)


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
