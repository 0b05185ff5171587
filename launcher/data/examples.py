"""Raw rows -> training examples, as a batched `datasets.map` function (runs in num_proc workers).

Each output row has input_ids, labels (masked per data.train_on), a status ("" when kept, else
the reason it is not), a detail for error messages, a truncated flag, the normalised messages,
its length and its number of trained tokens.
"""

import json
from typing import Any, Dict, List

from tokenizers import Tokenizer

from launcher.data.errors import BadRow
from launcher.data.formats import JSONL_COLUMN, normalise, parse_row
from launcher.data.masking import IGNORE, span_labels
from launcher.data.templates import Renderer

LENGTH_STATUSES = ("too_long", "untrained_after_truncation")  # counted as dropped_for_length
BLANK = "blank_line"  # empty JSONL lines: not rows at all


def example_features():
    from datasets import Features, List as ListOf, Value

    return Features({
        "input_ids": ListOf(Value("int32")), "labels": ListOf(Value("int32")), "status": Value("string"),
        "detail": Value("string"), "truncated": Value("bool"), "messages": Value("string"),
        "length": Value("int32"), "trained": Value("int32"),
    })


class ExampleBuilder:
    """Callable for `Dataset.map(batched=True)`; picklable so datasets can ship it to workers."""

    def __init__(self, tokenizer, template: str, fmt: str, train_on: str, seq_len: int, truncation: str):
        self.tokenizer, self.fmt, self.train_on = tokenizer, fmt, train_on
        self.seq_len, self.truncation = seq_len, truncation
        self.renderer = Renderer(template, tokenizer.special_tokens_map) if template else None
        # The Rust tokenizer itself, as tokenizer(text, add_special_tokens=False) uses it, without
        # any truncation or padding that its tokenizer.json may switch on.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        n = len(next(iter(batch.values())))
        out = {"input_ids": [[]] * n, "labels": [[]] * n, "status": [""] * n, "detail": [""] * n,
               "truncated": [False] * n, "messages": [""] * n, "length": [0] * n, "trained": [0] * n}
        pending = []  # (row index, kind, value, text, trained spans) of rows that render
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            if isinstance(row.get(JSONL_COLUMN), str) and not row[JSONL_COLUMN].lstrip("\ufeff").strip():
                out["status"][i] = BLANK
                continue
            try:
                kind, value = normalise(parse_row(row), self.fmt)
                pending.append((i, kind, value, *self._render(kind, value)))
            except BadRow as bad:
                out["status"][i], out["detail"][i] = bad.reason, bad.detail
        if not pending:
            return out
        # One batched call on the Rust tokenizer (it spreads the batch over threads).
        encodings = self.backend.encode_batch([p[3] for p in pending], add_special_tokens=False)
        for (i, kind, value, _, spans), enc in zip(pending, encodings):
            ids = enc.ids
            labels, trained = span_labels(ids, enc.offsets, spans)
            if kind == "text" and self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)  # documents end with EOS, which is learned
                labels.append(self.tokenizer.eos_token_id)
                trained += 1
            self._fill(out, i, ids, labels, trained, kind, value)
        return out

    def _render(self, kind: str, value: Any):
        if kind == "text":
            return value, [(0, len(value))]
        text, spans = self.renderer.render(value)
        if self.train_on == "all":
            return text, [(0, len(text))]
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        if not any(e > s for s, e in spans):
            raise BadRow("no_trained_tokens", "the template rendered no assistant text to train on")
        return text, spans

    def _fill(self, out, slot: int, ids: List[int], labels: List[int], trained: int, kind: str, value: Any) -> None:
        status, detail, truncated = "", "", False
        if not trained:
            status, detail = "no_trained_tokens", "no token is left to train on"
        elif len(ids) > self.seq_len:
            if self.truncation == "drop":
                status, detail = "too_long", f"{len(ids)} tokens > data.seq_len={self.seq_len}"
            else:
                ids, labels, truncated = ids[: self.seq_len], labels[: self.seq_len], True
                trained = len(labels) - labels.count(IGNORE)
                if not trained:
                    status = "untrained_after_truncation"
                    detail = f"no trained token in the first data.seq_len={self.seq_len} tokens"
        if status:
            ids, labels, trained = [], [], 0
        out["input_ids"][slot], out["labels"][slot] = ids, labels
        out["status"][slot], out["detail"][slot], out["truncated"][slot] = status, detail, truncated
        out["messages"][slot] = json.dumps(value) if kind == "messages" and not status else ""
        out["length"][slot], out["trained"][slot] = len(ids), trained
