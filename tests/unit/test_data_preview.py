"""`data.preview=N`: N examples with trained tokens marked (plain markers off a TTY, colours on one) and the stats."""

import io
from types import SimpleNamespace

from rich.console import Console

from launcher.bundled import resolve
from launcher.data.preview import print_preview
from tests.conftest import compose_config, run_sft


def preview(tmp_path, terminal):
    cfg = compose_config(["data.preview=3", f"data.cache_dir={tmp_path / 'cache'}"])
    checked = SimpleNamespace(model=SimpleNamespace(path=resolve(cfg.model.path)))
    out = io.StringIO()
    print_preview(cfg, checked, console=Console(file=out, force_terminal=terminal, width=100))
    return out.getvalue()


def test_plain_preview_marks_trained_tokens(tmp_path):
    text = preview(tmp_path, terminal=False)
    assert text.count("example ") == 3 and "\x1b[" not in text
    # Only the answer and its end-of-turn token are trained, never the prompt or the header.
    assert "<|im_start|>assistant\n[[" in text and "<|im_end|>]]\n" in text
    assert "[[<|im_start|>" not in text and "user\n[[" not in text
    assert "rows_read: 2200" in text and "train_examples: 2000" in text and "train_packing_efficiency" in text


def test_terminal_preview_uses_colours(tmp_path):
    text = preview(tmp_path, terminal=True)
    assert "\x1b[" in text and "[[" not in text and "train_examples" in text


def test_sft_preview_prints_and_exits_without_training(tmp_path):
    result = run_sft(["data.preview=2", f"data.cache_dir={tmp_path / 'cache'}", f"runs_root={tmp_path / 'runs'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("example ") == 2 and "[[" in result.stdout and "rows_kept: 2200" in result.stdout
    assert not (tmp_path / "runs").exists()  # no run directory: nothing was launched
