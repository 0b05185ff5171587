"""Mixture-of-experts models on real DeepSpeed ZeRO-3 ranks (CPU, gloo): the tiny Qwen3-MoE and a tiny
Mixtral train with the router's load-balancing loss, 2 ranks equal 1, a forced routing that leaves
one rank's experts idle completes, a USR2 resume equals an uninterrupted run, and the export
reloads equal to the gathered weights."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.bundled import resolve
from tests.conftest import SFT, run_sft
from tests.integration.test_loss import run_probe, write_probe_run
from tests.utils.stop import usr2_after
from tests.utils.wandb_file import find_runs, read_run

# fp32, every parameter gathered, logged each step; 2 ranks x micro 4 = a global batch of 8.
SHORT = [
    "recipe=tiny_moe_sft", "trainer.max_steps=6", "trainer.log_every=1", "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8", "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0",
    "eval.max_batches=1", "checkpoint.every_steps=2", "checkpoint.keep=3",
]
ONE_RANK = ["cluster.procs_per_node=1", "trainer.micro_batch_size=8"]  # the same global batch, the same rows
QUICK = ["checkpoint.export=false", "tracking=none", "checkpoint.every_steps=0"]


def rows(run_dir: Path, kind: str = "train") -> dict:
    """Metrics rows by step; a resumed run appends, so the last row of a step wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == kind:
            out[row["step"]] = row
    return out


def train(tmp: Path, overrides, name: str) -> Path:
    run_dir = tmp / name
    result = run_sft([*overrides, f"run_dir={run_dir}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_losses(a: Path, b: Path, steps: int) -> None:
    got, want = rows(a), rows(b)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        for key in ("loss", "aux_loss", "expert_tokens_min", "expert_tokens_max"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return train(tmp_path_factory.mktemp("moe"), SHORT, "two-ranks")


def test_the_tiny_moe_trains_with_its_aux_loss_and_expert_load_logged(two_ranks):
    got = rows(two_ranks)
    assert sorted(got) == list(range(1, 7)) and got[6]["loss"] < got[1]["loss"]
    for row in got.values():
        # Perfect balance gives top_k (2); a collapse onto 2 of 8 experts, 8.
        assert 1.9 < row["aux_loss"] < 8 and 0 <= row["expert_tokens_min"] <= row["expert_tokens_max"]
        # Per step and MoE layer: every trained token's 2 selections land on one of 8 experts.
        assert row["expert_tokens_max"] >= 2 * row["trained_tokens"] / 8
    log = (two_ranks / "logs" / "rank-0.log").read_text()
    assert "mixture of experts: 4 MoE layers, 8 experts, 2 per token; 1438208 parameters, 553472 active per token; " \
           "router_aux_loss_coef 0.01" in log
    # W&B (offline, read back from its file): the aux loss and the expert load beside the loss, at each step.
    (run,) = [read_run(f) for f in find_runs(two_ranks)]
    logged = {r["trainer/global_step"]: r for r in run["history"] if "train/aux_loss" in r}
    assert sorted(logged) == list(range(1, 7))
    assert logged[3]["train/aux_loss"] == pytest.approx(got[3]["aux_loss"]) and "train/expert_tokens_max" in logged[3]


def test_two_ranks_equal_one_rank_whether_they_split_the_rows_or_each_row(tmp_path, two_ranks):
    """Data parallel (2 ranks, 4 rows each) and sequence parallel (2 ranks sharing 8 rows, half of
    each row's tokens each): the routing statistics pool every rank's tokens, as 1 rank's are."""
    one = train(tmp_path, [*SHORT, *ONE_RANK, *QUICK, "trainer.max_steps=3"], "one-rank")
    ulysses = train(tmp_path, [*SHORT, *QUICK, "trainer.max_steps=3", "trainer.micro_batch_size=8",
                               "trainer.sequence_parallel=2"], "sequence-parallel")
    want = rows(one)
    for got in (rows(two_ranks), rows(ulysses)):
        for step in (1, 2, 3):
            for key in ("loss", "aux_loss", "expert_tokens_min", "expert_tokens_max", "trained_tokens"):
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)


def test_the_export_reloads_equal_to_the_gathered_weights_in_the_hub_layout(two_ranks):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    export = two_ranks / "export"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(two_ranks / "checkpoints"), tag="step-000006")
    assert gathered["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 96, 128)  # fused in training
    # On disk, one tensor per expert and projection: the layout of the Hub's Qwen3-MoE checkpoints (vLLM reads it).
    keys = set(load_file(export / "model.safetensors"))
    assert {f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    exported = AutoModelForCausalLM.from_pretrained(export).state_dict()
    for name, tensor in gathered.items():
        assert (exported[name] - tensor).abs().max().item() == 0, name
    assert set(gathered) | {"lm_head.weight"} == set(exported)  # tied: the head is the embedding


def test_usr2_then_resume_equals_an_uninterrupted_run(tmp_path, two_ranks):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([SFT, *SHORT, "tracking=none", f"run_dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    out = usr2_after(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 3)
    assert proc.returncode == 75, out[-3000:]
    stopped_at = max(rows(run_dir))
    assert 3 <= stopped_at < 6
    result = run_sft([*SHORT, "tracking=none", f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at} in" in (run_dir / "logs" / "rank-0.log").read_text()  # resumed where it stopped
    got, want = rows(run_dir), rows(two_ranks)
    assert sorted(got) == list(range(1, 7))
    for step in want:  # bitwise, step by step
        assert (got[step]["loss"], got[step]["aux_loss"]) == (want[step]["loss"], want[step]["aux_loss"]), step


def tiny_model(path: Path, family: str) -> Path:
    """A model of the tiny MoE's size (8 experts, 2 per token) in another family, with the bundled tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, OlmoeConfig

    tok = AutoTokenizer.from_pretrained(resolve("bundled://tiny-moe"))
    size = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=True,
                router_aux_loss_coef=0.02, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    config = MixtralConfig(**size, num_local_experts=8) if family == "mixtral" else OlmoeConfig(**size, num_experts=8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_two_rank_checkpoint_resumes_on_one_rank_through_the_universal_form(tmp_path, two_ranks):
    """The fused 3-D expert parameters and their Adam states, partitioned over 2 ranks, load on 1 rank
    (micro 8: the same rows per micro-step, so the aux loss is grouped as before)."""
    source = tmp_path / "step-000004"
    shutil.copytree(two_ranks / "checkpoints" / "step-000004", source)
    run_dir = train(tmp_path, [*SHORT, *ONE_RANK, *QUICK, f"resume={source}"], "one-rank")
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"{source} was written by 2 ranks; this run has 1: loading its universal form" in log
    got, want = rows(run_dir), rows(two_ranks)
    assert sorted(got) == [5, 6]
    for step in got:
        for key in ("loss", "aux_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("mixtral") / "model", "mixtral")


def test_a_tiny_mixtral_on_two_ranks_equals_one_rank(tmp_path, tiny_mixtral):
    common = [*SHORT, *QUICK, "trainer.max_steps=3", f"model.path={tiny_mixtral}"]
    two = train(tmp_path, common, "two")
    one = train(tmp_path, [*common, *ONE_RANK], "one")
    assert_same_losses(one, two, 3)
    assert rows(two)[3]["loss"] < rows(two)[1]["loss"] and rows(two)[1]["aux_loss"] > 1.9
    assert "8 experts, 2 per token" in (two / "logs" / "rank-0.log").read_text()


def test_a_rank_whose_tokens_all_go_to_the_same_experts_does_not_hang_the_step(tmp_path):
    """Rank 1's routers send every token to experts 0 and 1 on the eager expert path, where only the
    experts a token reaches run: ZeRO-3 gathers the whole block (a leaf module), so both ranks finish
    two steps. OLMoE: the family DeepSpeed's own default leaf list leaves out, so the launcher's
    marking is what is tested (without it the second step fails). The wait below (4 minutes) is
    far below the process-group timeout (30 minutes)."""
    run_dir = tmp_path / "forced"
    model = tiny_model(tmp_path / "olmoe", "olmoe")
    write_probe_run(run_dir, [*SHORT, "tracking=none", "trainer.dist_timeout_min=30", f"model.path={model}"])
    run_probe(Path(__file__).with_name("moe_router_probe.py"), run_dir, ranks=2, timeout=240)
    rank0, rank1 = (json.loads((run_dir / f"routed-{r}.json").read_text()) for r in (0, 1))
    assert rank1["chosen"][:2] == [max(rank1["chosen"])] * 2 and rank1["chosen"][2:] == [0] * 6  # experts 2-7 idle on rank 1
    assert min(rank0["chosen"]) > 0  # rank 0 routes as the model does
    # Every rank's selections are counted: the busiest expert carries at least rank 1's share.
    assert rank0["row"]["expert_tokens_max"] == rank1["row"]["expert_tokens_max"] > 0
