"""The run directory's files, and that no secret reaches any of them."""

import json
import sys

import yaml
from omegaconf import OmegaConf

from launcher.service import write_run_files
from launcher.facts import find
from launcher.plan import deepspeed_config, make_plan
from launcher.resume import fingerprint
from launcher.rundir import new_run_dir
from launcher.secret_mask import is_secret_name, mask_secrets, secret_values
from launcher.validate import check_config
from tests.conftest import compose_config


def test_saved_files_hold_no_secret(tmp_path, monkeypatch):
    overrides = ["tracking.api_key=abc123", "optim.lr=1e-3"]
    monkeypatch.setenv("HF_TOKEN", "xyz")
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setattr(sys, "argv", ["sft", *overrides])
    cfg = compose_config(overrides)
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_run_files(tmp_path, resolved, overrides, checked, plan, deepspeed_config(cfg, plan), fingerprint(cfg, plan))

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.yaml", "ds_config.json", "overrides.yaml", "plan.json", "submission.json"]
    for path in tmp_path.iterdir():
        text = path.read_text()
        assert "abc123" not in text and "xyz" not in text, path.name
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["tracking"]["api_key"] == "***" and config["optim"]["lr"] == 1e-3
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == ["tracking.api_key=***", "optim.lr=1e-3"]
    submission = json.loads((tmp_path / "submission.json").read_text())
    assert submission["env"]["HF_TOKEN"] == "***" and submission["env"]["HF_HOME"] == "/cache/hf"
    assert submission["argv"] == ["sft", "tracking.api_key=***", "optim.lr=1e-3"]
    assert submission["versions"]["deepspeed"] and submission["git"].keys() == {"sha", "dirty"}
    saved_plan = json.loads((tmp_path / "plan.json").read_text())
    assert saved_plan["global_batch_size"] == 32 and saved_plan["train_files"][0].endswith("train.jsonl")


def test_mask_scrubs_secret_values_anywhere():
    masked = mask_secrets({"cmd": "login --key s3cret!", "PASSWORD": "p", "nested": [{"auth_token": None}]}, {"s3cret!"})
    assert masked == {"cmd": "login --key ***", "PASSWORD": "***", "nested": [{"auth_token": None}]}


def test_secrets_inside_shell_lines_and_overrides_are_masked():
    config = {"cluster": {"setup": ["export HF_TOKEN=hf_abc123 && module load cuda", "export PATH=/opt/bin:$PATH"]}}
    secrets = secret_values(config, environ={})
    assert secrets == {"hf_abc123"}
    masked = mask_secrets({"config": config, "argv": ["sft", "cluster.setup=[export HF_TOKEN=hf_abc123]"]}, secrets)
    assert "hf_abc123" not in str(masked) and "module load cuda" in str(masked) and "PATH=/opt/bin" in str(masked)


def test_secret_names_are_whole_words():
    assert all(is_secret_name(n) for n in ("HF_TOKEN", "api_key", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "db.password", "apikey"))
    assert not any(is_secret_name(n) for n in ("max_new_tokens", "keep", "tokens_per_s", "monkey", "keyboard_layout", "num_key_value_heads"))


def test_run_dirs_in_the_same_second_do_not_collide(tmp_path):
    first, second = new_run_dir(str(tmp_path), "x"), new_run_dir(str(tmp_path), "x")
    assert first != second and first.is_dir() and second.is_dir()


def test_a_run_submitted_again_keeps_its_earlier_jobs(tmp_path):
    from launcher.backends.slurm import record_jobs

    overrides = ["optim.lr=1e-3"]
    cfg = compose_config(overrides)
    checked = check_config(cfg)
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_run_files(tmp_path, resolved, overrides, checked, plan, deepspeed_config(cfg, plan), fingerprint(cfg, plan))
    record_jobs(tmp_path, [{"job_id": "41"}])
    write_run_files(tmp_path, resolved, overrides, checked, plan, deepspeed_config(cfg, plan), fingerprint(cfg, plan))
    record_jobs(tmp_path, [{"job_id": "42"}])
    assert [j["job_id"] for j in json.loads((tmp_path / "submission.json").read_text())["jobs"]] == ["41", "42"]
