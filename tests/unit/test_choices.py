"""One source for every choice: the schema's Choice types, enforced by Hydra, written out as plain strings."""

import json
import sys
from dataclasses import fields, is_dataclass

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from launcher.service import write_run_files
from launcher.data.pipeline import prepare_data
from launcher.errors import ConfigError, problem
from launcher.overrides import override_problems
from launcher.facts import find
from launcher.plan import deepspeed_config, make_plan
from launcher.resume import data_fingerprint, fingerprint
from launcher.schema import (
    MIN_SEQ_LEN, Choice, Config, OffloadDevice, Precision, TrackingMode, choice_fields, choice_type, plain,
)
from launcher.validate import check_config
from tests.conftest import compose_config

# Every Choice key of the schema, by its dotted name.
def _choice_keys(cls, prefix: str = "") -> dict:
    """Every Choice key of the schema, nested sections (eval.harness) included."""
    keys = {f"{prefix}{name}": choice for name, choice in choice_fields(cls).items()}
    for f in fields(cls):
        if is_dataclass(f.type):
            keys.update(_choice_keys(f.type, f"{prefix}{f.name}."))
    return keys


CHOICE_KEYS = _choice_keys(Config)


def composition_error(overrides):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    return f"{info.value}\n{info.value.__cause__}"


def test_the_schema_lists_every_choice_key():
    assert set(CHOICE_KEYS) == {
        "model.attn_implementation", "data.format", "data.train_on", "data.truncation", "data.on_bad_row",
        "optim.name", "optim.scheduler", "deepspeed.offload_optimizer", "deepspeed.offload_param",
        "trainer.precision", "trainer.loss", "checkpoint.export_dtype", "checkpoint.allow_changes", "cluster.backend",
        "tracking.backend", "tracking.mode", "sweep.direction", "sweep.rung_direction", "eval.harness.backend",
    }


@pytest.mark.parametrize("choice", sorted(set(CHOICE_KEYS.values()), key=lambda c: c.__name__))
def test_members_are_their_own_names_and_read_as_plain_strings(choice):
    # OmegaConf reads an override by member name and writes a member by name (enum_to_str): they must agree.
    for member in choice:
        assert member.name == member.value
        assert member == member.value and str(member) == f"{member}" == member.value
        assert json.dumps(member) == json.dumps(member.value)
        assert {member.value: 1}[member] == 1


@pytest.mark.parametrize(
    "override, valid",
    [
        ("trainer.precision=bf17", "[bf16, fp16, fp32]"),
        ("data.train_on=foo", "[assistant, last_assistant, all]"),
        ("data.format=jsonl", "[auto, messages, prompt_completion, alpaca, text]"),
        ("tracking.mode=onlin", "[offline, online, disabled]"),
        ("deepspeed.offload_optimizer=gpu", "[none, cpu, nvme]"),
        ("optim.scheduler=step", "[cosine, linear, constant]"),
        ("model.attn_implementation=flash_attention_3", "[auto, sdpa, eager, flex_attention, flash_attention_2]"),
        ("checkpoint.export_dtype=fp8", "[bf16, fp16, fp32]"),
        ("checkpoint.allow_changes=[data,world_size]", "[data, model_path, launcher]"),
        ("cluster.backend=k8s", "[local, slurm]"),
    ],
)
def test_composition_rejects_a_bad_choice_naming_the_key_and_the_valid_values(override, valid):
    key, value = override.split("=")
    text = composition_error([override])
    assert f"full_key: {key}" in text
    assert f"expected one of {valid}" in text
    assert value.strip("[]").split(",")[-1] in text


def test_a_good_choice_composes_as_its_member_and_null_stays_allowed_where_optional():
    cfg = compose_config(["trainer.precision=fp16", "checkpoint.export_dtype=null", "checkpoint.allow_changes=[data]"])
    assert cfg.trainer.precision is Precision.fp16 and cfg.trainer.precision == "fp16"
    assert cfg.checkpoint.export_dtype is None
    assert list(cfg.checkpoint.allow_changes) == ["data"]
    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.precision=null"])


def test_override_check_reads_sweeps_lists_and_leaves_the_rest_to_hydra():
    assert override_problems(["tracking.mode=onlin"]) == ["tracking.mode='onlin': must be one of offline, online, disabled"]
    assert override_problems(["trainer.precision=bf16,fp8"]) == ["trainer.precision='fp8': must be one of bf16, fp16, fp32"]
    assert override_problems(["checkpoint.allow_changes=[data,world_size]"]) == [
        "checkpoint.allow_changes='world_size': must be one of data, model_path, launcher"]
    assert override_problems(["trainer.precision=true"]) == ["trainer.precision=True: must be one of bf16, fp16, fp32"]
    good = ["trainer.precision=fp16", "trainer.precision=bf16,fp32", "checkpoint.export_dtype=null",
            "checkpoint.allow_changes=[data,launcher]", "tracking=none", "trainer.precision=${oc.env:PRECISION}",
            "optim.lr=1e-3", "+deepspeed.extra.bf16.enabled=true"]
    assert override_problems(good) == []


def test_cross_field_checks_still_name_a_choice_by_its_value():
    cfg = compose_config(["deepspeed=zero2", "deepspeed.offload_param=cpu", f"data.seq_len={MIN_SEQ_LEN - 1}"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = "\n".join(info.value.problems)
    assert "deepspeed.offload_param='cpu': needs deepspeed.stage=3 (is 2); use none" in text
    assert f"data.seq_len={MIN_SEQ_LEN - 1}: must be >= {MIN_SEQ_LEN}" in text
    assert "<" not in text  # no <OffloadDevice.cpu: 'cpu'>
    assert problem("k", OffloadDevice.cpu, "x") == "k='cpu': x"


def test_run_files_hold_plain_strings(tmp_path, monkeypatch):
    overrides = ["trainer.precision=fp16", "checkpoint.export_dtype=bf16", "checkpoint.allow_changes=[data]",
                 "deepspeed.stage=3", "deepspeed.offload_optimizer=cpu", "optim.name=cpu_adam"]
    monkeypatch.setattr(sys, "argv", ["sft", *overrides])
    cfg = compose_config(overrides)
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)  # as launcher.service.prepare makes it: Choice members
    assert isinstance(resolved["trainer"]["precision"], Choice)
    write_run_files(tmp_path, resolved, overrides, checked, plan, deepspeed_config(cfg, plan), fingerprint(cfg, plan))

    text = (tmp_path / "config.yaml").read_text()
    assert "precision: fp16" in text and "!!python" not in text
    config = yaml.safe_load(text)
    assert config == OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in CHOICE_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        items = value if isinstance(value, list) else [value]
        assert all(type(item) is str for item in items if item is not None), key
    assert config["checkpoint"]["allow_changes"] == ["data"] and config["checkpoint"]["export_dtype"] == "bf16"
    # The ranks read config.yaml back (launcher.rank); the schema takes it again unchanged.
    again = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(tmp_path / "config.yaml"))
    assert again.trainer.precision is Precision.fp16
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["fp16"]["enabled"] is True
    assert json.loads((tmp_path / "plan.json").read_text())["precision"] == "fp16"
    assert json.loads((tmp_path / "submission.json").read_text())["backend"] == "local"


def test_the_data_fingerprint_is_the_same_from_the_schema_and_from_config_yaml():
    # The login side fingerprints the composed config (Choice members); a checkpoint's fingerprint
    # must not depend on that, or every resume would look like a data change.
    cfg = compose_config(["data.train_on=last_assistant"])
    untyped = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True))
    assert data_fingerprint(cfg.data) == data_fingerprint(untyped)


def test_plain_turns_members_into_strings_everywhere():
    value = {"a": [TrackingMode.offline, (Precision.bf16,)], "b": {"c": OffloadDevice.none}, "d": 1}
    assert plain(value) == {"a": ["offline", ["bf16"]], "b": {"c": "none"}, "d": 1}
    assert type(plain(value)["a"][0]) is str
    assert choice_type(OmegaConf) is None


def test_the_pipeline_checks_a_plain_dict_against_the_same_choices(tmp_path):
    cfg = dict(train_files=str(tmp_path / "x.jsonl"), eval_files=None, eval_fraction=0.0, format="jsonl", template=None,
               seq_len=MIN_SEQ_LEN - 1, packing=True, train_on="assistant", truncation="cut", on_bad_row="error")
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg, tokenizer=None, cache_root=str(tmp_path), log=lambda m: None)
    assert info.value.problems == [
        "data.format='jsonl': must be one of auto, messages, prompt_completion, alpaca, text",
        "data.truncation='cut': must be one of truncate, drop",
        f"data.seq_len={MIN_SEQ_LEN - 1}: must be an integer >= {MIN_SEQ_LEN}",
    ]
