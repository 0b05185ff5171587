"""Sequence parallelism (DeepSpeed Ulysses) on real DeepSpeed ranks (CPU, gloo all-to-all): two
ranks sharing every row train what one rank holding whole rows trains, gradient for gradient."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_sft
from tests.integration.test_loss import probe_gradients

# Four packed rows of 128 tokens per micro-batch, one data-parallel rank in both layouts: the same
# global batch, once whole on one rank, once split into two shards of 64 tokens.
SAME_BATCH = ["trainer.micro_batch_size=4", "trainer.global_batch_size=4", "trainer.loss_chunk_tokens=50"]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_two_shards_give_the_loss_and_every_gradient_of_whole_rows(tmp_path, packing):
    settings = [*SAME_BATCH, f"data.packing={packing}"]
    whole = probe_gradients(tmp_path / "sp1", settings, ranks=1)
    sharded = probe_gradients(tmp_path / "sp2", [*settings, "trainer.sequence_parallel=2"], ranks=2)
    assert whole["rows"][0] == 4 and sharded["rows"][0] == 4
    assert sharded["rows"][1] == -(-whole["rows"][1] // 2)  # each rank held half of every row (padded to even)
    if packing:
        assert whole["examples"] > 8  # several examples per row: a mask leaking across them would show
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert whole["grads"].keys() == sharded["grads"].keys()
    for name, want in whole["grads"].items():
        got = sharded["grads"][name]
        assert got.shape == want.shape and want.abs().max() > 0, name
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name


def train_losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


SHORT = [*SAME_BATCH, "recipe=tiny_sft", "trainer.max_steps=3", "trainer.log_every=1", "optim.warmup_steps=1",
         "eval.every_steps=0", "eval.generate_samples=4", "eval.max_batches=2", "checkpoint.every_steps=0",
         "checkpoint.export=false", "tracking=none"]


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    runs = {}
    for name, extra in {"sp1": ["cluster.procs_per_node=1"],
                        "sp2": ["cluster.procs_per_node=2", "trainer.sequence_parallel=2",
                                "+deepspeed.extra.comms_logger={enabled: true, prof_all: true}"]}.items():
        result = run_sft([*SHORT, *extra, f"run_dir={tmp / name}"], cwd=tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp / name
    return runs


def test_training_steps_give_the_same_losses_and_count_each_token_once(sp_run):
    whole, sharded = train_losses(sp_run["sp1"]), train_losses(sp_run["sp2"])
    assert sorted(whole) == sorted(sharded) == [1, 2, 3]
    for step in whole:
        assert sharded[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5), step
        assert sharded[step]["trained_tokens"] == whole[step]["trained_tokens"], step
        # Tokens fed per step: the global batch's, once (two shards of each row, not two rows), so
        # tokens/s and MFU count each token once.
        assert sharded[step]["tokens"] == whole[step]["tokens"] == 4 * 128, step
