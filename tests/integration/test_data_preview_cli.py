"""`sft data.preview=N` prints N examples and the stats, and exits without training."""

from tests.conftest import run_sft


def test_sft_preview_prints_and_exits_without_training(tmp_path):
    result = run_sft(["data.preview=2", f"data.cache_dir={tmp_path / 'cache'}", f"runs_root={tmp_path / 'runs'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("example ") == 2 and "[[" in result.stdout and "rows_kept: 2200" in result.stdout
    assert not (tmp_path / "runs").exists()  # no run directory: nothing was launched
