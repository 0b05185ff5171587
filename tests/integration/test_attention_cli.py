"""The `sft` command refuses an attention kernel that cannot train here before anything is written."""

from tests.conftest import run_sft


def test_the_cli_refuses_flex_attention_on_cpu_before_anything_is_written(tmp_path):
    result = run_sft(["recipe=tiny_sft", "model.attn_implementation=flex_attention", f"run_dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2
    assert "model.attn_implementation='flex_attention': torch has no CPU backward for flex_attention" in result.stderr
    assert "use sdpa or eager" in result.stderr
    assert not (tmp_path / "run").exists()
