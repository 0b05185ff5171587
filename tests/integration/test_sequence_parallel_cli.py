"""The `sft` command on sequence parallelism (trainer.sequence_parallel): a combination it cannot train
is refused before anything is written, and the long-context recipe's dry run shows its verdicts (the
same checks and plan in-process: tests/unit/test_plan_sp.py)."""

import time

import pytest

from tests.conftest import run_sft


@pytest.mark.parametrize("overrides, message", [
    # The bundled tiny Llama has 4 attention heads; a local CPU run has 2 ranks.
    (["cluster.procs_per_node=3", "trainer.sequence_parallel=3", "data.seq_len=129"],
     "trainer.sequence_parallel=3: must divide the model's 4 attention heads (num_attention_heads)"),
    (["trainer.sequence_parallel=2", "data.seq_len=127"],
     "data.seq_len=127: must be a multiple of trainer.sequence_parallel=2"),
    (["trainer.sequence_parallel=4"],
     "trainer.sequence_parallel=4: must divide the 2 ranks per node (cluster.procs_per_node, else cluster.gpus_per_node) "
     "so each group's all-to-all stays within a node; valid here: 1, 2"),
])
def test_a_refused_sequence_parallel_combination_exits_2_and_writes_nothing(overrides, message, tmp_path):
    result = run_sft(["recipe=tiny_sft", *overrides, f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_long_recipes_dry_run_fits_with_sequence_parallelism_and_not_without(tmp_path):
    env = {"COLUMNS": "250"}
    started = time.monotonic()
    with_sp = run_sft(["recipe=llama3_8b_long_sft", "dry_run=true", f"runs_root={tmp_path}/runs"], cwd=tmp_path, env=env)
    print(f"sft recipe=llama3_8b_long_sft dry_run=true: {time.monotonic() - started:.2f} s")
    assert with_sp.returncode == 0, with_sp.stderr[-2000:]
    out = with_sp.stdout
    for text in ("8 = 1 node(s) x 8 rank(s); sequence parallel 8 -> 1 data-parallel",
                 "8 = micro 1 x data-parallel ranks 1 x accum 8", "131072", "fits (", "all_to_all_single",
                 "in all-to-alls within the node", '"sequence_parallel_size": 8'):
        assert text in out, text
    assert "DOES NOT FIT" not in out and "the run does not fit" not in with_sp.stderr

    without = run_sft(["recipe=llama3_8b_long_sft", "dry_run=true", "trainer.sequence_parallel=1", f"runs_root={tmp_path}/runs"],
                      cwd=tmp_path, env=env)
    assert without.returncode == 0, without.stderr[-2000:]
    assert "DOES NOT FIT" in without.stdout
    assert "the run does not fit" in without.stderr and "trainer.sequence_parallel=2 (predicted " in without.stderr
    assert not (tmp_path / "runs").exists()
