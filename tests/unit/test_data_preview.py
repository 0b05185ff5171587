"""`data.preview=N`: N examples with trained tokens marked (plain markers off a TTY, colours on one) and the stats."""

import io
from types import SimpleNamespace

from rich.console import Console

from launcher.bundled import resolve
from launcher.data.preview import print_preview
from tests.conftest import compose_config


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
