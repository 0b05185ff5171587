"""`sft ... data.preview=N`: print N processed examples, trained tokens marked, and the data statistics."""

import sys
from typing import List, Tuple

from launcher.data.masking import IGNORE


def print_preview(cfg, checked, console=None) -> None:
    """Run the data pipeline (filling the cache a training run then reuses) and show what trains."""
    from rich.console import Console
    from transformers import AutoTokenizer

    console = console or Console()
    tokenizer = AutoTokenizer.from_pretrained(checked.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the trainer does
    data = _prepare(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    shown = 0
    for row in data.train:
        for ids, labels in segments(row, pad_id):
            if shown == cfg.data.preview:
                break
            shown += 1
            trained = sum(l != IGNORE for l in labels)
            console.rule(f"example {shown}: {len(ids)} tokens, {trained} trained", style="dim")
            show_example(console, tokenizer, ids, labels)
        if shown == cfg.data.preview:
            break
    console.rule("statistics", style="dim")
    for key, value in data.stats.items():
        console.print(f"{key}: {value}", highlight=False, soft_wrap=True)


def _prepare(cfg, tokenizer):
    from launcher.data.pipeline import prepare_data

    return prepare_data(cfg.data, tokenizer, log=lambda m: print(m, file=sys.stderr))


def segments(row: dict, pad_id: int) -> List[Tuple[list, list]]:
    """The examples inside a (packed) row: split where position_ids restart, padding left out."""
    ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        if all(t == pad_id for t in ids[a:b]) and all(l == IGNORE for l in labels[a:b]):
            continue
        out.append((ids[a:b], labels[a:b]))
    return out


def runs(ids: list, labels: list) -> List[Tuple[bool, list]]:
    """Consecutive tokens grouped by whether they are trained."""
    out: List[Tuple[bool, list]] = []
    for t, l in zip(ids, labels):
        flag = l != IGNORE
        if out and out[-1][0] == flag:
            out[-1][1].append(t)
        else:
            out.append((flag, [t]))
    return out


def show_example(console, tokenizer, ids: list, labels: list) -> None:
    """Trained text in green on a terminal, masked text dimmed; `[[trained]]` markers otherwise."""
    from rich.text import Text

    parts = [(flag, tokenizer.decode(run, skip_special_tokens=False)) for flag, run in runs(ids, labels)]
    if console.is_terminal:
        text = Text()
        for flag, s in parts:
            text.append(s, style="bold green" if flag else "dim")
        console.print(text, soft_wrap=True)
    else:
        console.print(Text("".join(f"[[{s}]]" if flag else s for flag, s in parts)), soft_wrap=True)
