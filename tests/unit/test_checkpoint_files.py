"""Checkpoint directories on disk: published by rename, pruned by step, one lineage per run dir,
and a resume refused when the settings that map steps to rows changed."""

import json

import pytest

from launcher import checkpoint
from launcher.errors import ConfigError
from launcher.resume import check_resume, refused_changes, set_aside_newer
from tests.conftest import compose_config

FINGERPRINT = {"world_size": 2, "micro_batch_size": 4, "global_batch_size": 16, "seq_len": 512, "packing": True,
               "data": "d1", "model_path": "bundled://tiny-llama", "seed": 42, "launcher": "0.1.0+abc"}


def fake_checkpoint(run_dir, step, fingerprint=FINGERPRINT, complete=True):
    path = checkpoint.step_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / "state.pt").write_text(f"state of step {step}")
    if complete:
        (path / checkpoint.MARKER).write_text(json.dumps({"step": step, "world_size": 2, "fingerprint": fingerprint}))
    return path


def test_publish_replaces_an_earlier_save_of_the_same_step_without_merging(tmp_path):
    old = fake_checkpoint(tmp_path, 5)
    (old / "only-in-the-old-save.pt").write_text("x")
    staging = tmp_path / "checkpoints" / checkpoint.PARTIAL / "step-000005"
    staging.mkdir(parents=True)
    (staging / "state.pt").write_text("new")
    (staging / checkpoint.MARKER).write_text(json.dumps({"step": 5}))
    checkpoint.publish(staging, old)
    assert sorted(p.name for p in old.iterdir()) == [checkpoint.MARKER, "state.pt"]
    assert (old / "state.pt").read_text() == "new"
    assert not (tmp_path / "checkpoints" / checkpoint.PARTIAL).exists()  # no save in progress: no .partial


def test_only_complete_step_dirs_count_and_pruning_orders_by_step_number(tmp_path):
    for step in (8, 9, 10, 1000000):  # step-1000000 sorts before step-999999 by name
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 1000001, complete=False)
    (tmp_path / "checkpoints" / checkpoint.PARTIAL / "step-1000002").mkdir(parents=True)
    assert checkpoint.latest_complete(tmp_path).name == "step-1000000"
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000010", "step-1000000"]
    checkpoint.discard_partial(tmp_path)
    assert not (tmp_path / "checkpoints" / checkpoint.PARTIAL).exists()


def test_changed_settings_are_named_except_those_the_launcher_adapts_or_the_user_allows():
    now = {**FINGERPRINT, "world_size": 1, "micro_batch_size": 2, "global_batch_size": 32, "data": "d2", "seed": 1}
    assert refused_changes(FINGERPRINT, now, []) == ["global_batch_size", "data", "seed"]
    assert refused_changes(FINGERPRINT, now, ["data"]) == ["global_batch_size", "seed"]


def test_a_resume_with_another_global_batch_is_refused_naming_old_and_new(tmp_path):
    fake_checkpoint(tmp_path, 10)
    cfg = compose_config(["recipe=tiny_sft"])
    with pytest.raises(ConfigError) as error:
        check_resume(cfg, tmp_path, {**FINGERPRINT, "global_batch_size": 32, "launcher": "0.1.0+def"})
    text = str(error.value)
    assert "global_batch_size: 16 in the checkpoint, 32 now" in text
    assert "launcher: '0.1.0+abc' in the checkpoint, '0.1.0+def' now" in text
    assert "checkpoint.allow_changes=[launcher]" in text  # the global batch cannot be allowed
    cfg.checkpoint.allow_changes = ["launcher"]
    with pytest.raises(ConfigError, match="global_batch_size"):
        check_resume(cfg, tmp_path, {**FINGERPRINT, "global_batch_size": 32, "launcher": "0.1.0+def"})
    assert check_resume(cfg, tmp_path, {**FINGERPRINT, "launcher": "0.1.0+def", "world_size": 4}).name == "step-000010"


def test_starting_over_in_a_run_dir_with_checkpoints_is_refused_with_the_choices(tmp_path):
    fake_checkpoint(tmp_path, 10)
    cfg = compose_config(["recipe=tiny_sft", "resume=never"])
    with pytest.raises(ConfigError) as error:
        check_resume(cfg, tmp_path, FINGERPRINT)
    assert "already holds checkpoints (newest: step-000010); resume=auto continues that run" in str(error.value)
    assert check_resume(cfg, tmp_path / "new", FINGERPRINT) is None


def test_resuming_an_earlier_step_sets_the_newer_checkpoints_aside(tmp_path):
    early = fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8)
    fake_checkpoint(tmp_path, 12)
    cfg = compose_config(["recipe=tiny_sft", f"resume={early}"])
    assert check_resume(cfg, tmp_path, FINGERPRINT) == early.resolve()
    aside = set_aside_newer(tmp_path, early.resolve())
    assert sorted(p.name for p in aside.iterdir()) == ["step-000008", "step-000012"]
    assert aside.name.startswith("checkpoints-set-aside-")
    assert checkpoint.latest_complete(tmp_path) == early


def test_another_runs_checkpoint_is_not_continued_in_a_run_dir_with_its_own(tmp_path):
    other = fake_checkpoint(tmp_path / "other", 4)
    fake_checkpoint(tmp_path / "mine", 8)
    cfg = compose_config(["recipe=tiny_sft", f"resume={other}"])
    with pytest.raises(ConfigError, match="would mix the two"):
        check_resume(cfg, tmp_path / "mine", FINGERPRINT)


class _Stage0Engine:
    """What export_model reads of a DeepSpeed engine without ZeRO-3: the module and its stage."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self) -> int:
        return 0


def test_an_export_that_dies_half_way_leaves_no_export_and_the_next_one_replaces_the_last(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.export import export_model

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))

    class DiskFull:
        def save_pretrained(self, path):
            assert (path / "model.safetensors").is_file()  # half-way: the weights are written, the tokenizer not
            raise OSError(28, "No space left on device")

    class Tokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{}")

    with pytest.raises(OSError, match="No space left"):
        export_model(_Stage0Engine(model), DiskFull(), tmp_path / "export", torch.float32, rank=0)
    assert list(tmp_path.iterdir()) == []  # no export/ that would read as a finished run, no leftovers
    export_model(_Stage0Engine(model), Tokenizer(), tmp_path / "export", torch.float32, rank=0)
    (tmp_path / "export" / "from-an-earlier-segment").write_text("x")
    export_model(_Stage0Engine(model), Tokenizer(), tmp_path / "export", torch.float32, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert not (tmp_path / "export" / "from-an-earlier-segment").exists()


def test_each_checkpoint_file_is_flushed_by_the_rank_that_wrote_it():
    names = {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt": 12,
             "zero_pp_rank_0_mp_rank_00_model_states.pt": 0, "rng_rank00010.pt": 10, "mp_rank_00_model_states.pt": 0,
             "COMPLETE": 0}
    assert {name: checkpoint.writer_rank(name) for name in names} == names
