"""The `sft` command names every bad choice before Hydra and writes nothing."""

from tests.conftest import run_sft


def test_the_cli_names_every_bad_choice_before_hydra_and_writes_nothing(tmp_path):
    result = run_sft(["trainer.precision=bf17", "data.train_on=foo", "dry_run=true", f"runs_root={tmp_path}/runs"],
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "trainer.precision='bf17': must be one of bf16, fp16, fp32" in result.stderr
    assert "data.train_on='foo': must be one of assistant, last_assistant, all" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
