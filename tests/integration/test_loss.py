"""The chunked loss equals the full-vocabulary loss on a real 2-rank ZeRO-3 engine: the loss and every
parameter's gradient (fp32, rel 1e-6), with the output weight partitioned and tied to the embedding."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launcher.backends.local import rank_env
from launcher.rendezvous import new_attempt_id
from launcher.service import write_run_files
from launcher.facts import find
from launcher.plan import deepspeed_config, make_plan
from launcher.resume import fingerprint
from launcher.validate import check_config
from tests.conftest import REPO, compose_config


def first_step_gradients(run_dir: Path, loss: str, chunk_tokens: int) -> dict:
    return probe_gradients(run_dir, ["trainer.micro_batch_size=16", "trainer.global_batch_size=32",
                                     f"trainer.loss={loss}", f"trainer.loss_chunk_tokens={chunk_tokens}"])


def probe_gradients(run_dir: Path, settings, ranks: int = 2) -> dict:
    """The first step's loss and every parameter's full gradient (launcher/loss_probe.py on each rank)."""
    write_probe_run(run_dir, ["recipe=tiny_sft", "tracking=none", f"cluster.procs_per_node={ranks}", *settings])
    run_probe(Path(__file__).with_name("loss_probe.py"), run_dir, ranks)
    return torch.load(run_dir / "grads.pt")


def write_probe_run(run_dir: Path, overrides) -> None:
    """The run directory `sft` would write for these overrides (config, plan, DeepSpeed JSON), nothing started."""
    overrides = [*overrides, f"run_dir={run_dir}"]
    cfg = compose_config(overrides)
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    write_run_files(run_dir, OmegaConf.to_container(cfg, resolve=True), overrides, checked, plan,
                    deepspeed_config(cfg, plan), fingerprint(cfg, plan))


def run_probe(script: Path, run_dir: Path, ranks: int, timeout: float = 300) -> None:
    """`script run_dir` on each rank, as the local backend starts ranks; every rank must exit 0 within timeout."""
    attempt = new_attempt_id()
    procs = [subprocess.Popen([sys.executable, str(script), str(run_dir)],
                              env={**rank_env(r, ranks, attempt, ranks), "PYTHONPATH": str(REPO)}) for r in range(ranks)]
    try:
        assert [p.wait(timeout=timeout) for p in procs] == [0] * ranks
    finally:
        for p in procs:
            p.kill()


def test_chunked_loss_and_gradients_equal_the_full_loss_on_zero3(tmp_path):
    full = first_step_gradients(tmp_path / "full", "full", 1024)
    # 16 rows of 128 tokens per rank, about 900 trained: chunks of 100 split them ~9 ways.
    chunked = first_step_gradients(tmp_path / "chunked", "chunked", 100)
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert full["grads"].keys() == chunked["grads"].keys() and "lm_head.weight" not in full["grads"]  # tied
    for name, want in full["grads"].items():
        got = chunked["grads"][name]
        assert got.shape == want.shape and want.abs().max() > 0, name
        assert ((got - want).norm() / want.norm()).item() < 1e-6, name
