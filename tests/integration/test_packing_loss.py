"""Packed rows give every example the loss it has alone (fp32, tiny model): no cross-talk between examples.

Isolation comes from position_ids restarting per example with attention_mask None and
use_cache=False (transformers 5 then builds block-diagonal causal attention for sdpa and eager).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.bundled import resolve
from launcher.data import collate, prepare_data
from launcher.data.masking import IGNORE
from launcher.data.preview import segments

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = resolve("bundled://tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    root = tmp_path_factory.mktemp("data")
    data = {}
    for train_on in ("assistant", "all"):
        cfg = dict(train_files="bundled://tiny-tasks/eval.jsonl", format="auto", seq_len=128, packing=True,
                   train_on=train_on, truncation="truncate", on_bad_row="error")
        data[train_on] = prepare_data(cfg, tok, 0, cache_root=str(root), log=lambda m: None)
    return path, tok, data


def example_losses(model, batch):
    """Sum of token losses and trained-token count per example (split where position_ids restart)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch.get("attention_mask"), use_cache=False).logits
    out = []
    for r in range(len(batch["input_ids"])):
        token_loss = torch.nn.functional.cross_entropy(
            logits[r, :-1], batch["labels"][r, 1:], ignore_index=IGNORE, reduction="none")
        row = {k: batch[k][r].tolist() for k in ("input_ids", "labels", "position_ids")}
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            n = sum(l != IGNORE for l in row["labels"][a:b])
            if n:  # padding segments have nothing trained
                # Token t is predicted at position t-1; the example's first token never is.
                out.append((token_loss[a:b - 1].sum().item(), n))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_packed_loss_equals_each_example_alone(setup, attn, train_on):
    path, tok, data = setup
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).train()
    rows = [data[train_on].train[i] for i in range(4)]
    batch = collate(rows, tok.pad_token_id)
    assert "attention_mask" not in batch  # packed: isolation comes from position_ids alone
    with torch.no_grad():
        packed = example_losses(model, batch)
        alone = [example_losses(model, collate([{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}],
                                                tok.pad_token_id))[0]
                 for row in rows for ids, labels in segments(row, tok.pad_token_id)]
        # The padded (non-packed) layout of the same examples agrees as well.
        padded = example_losses(model, collate(
            [{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}
             for row in rows for ids, labels in segments(row, tok.pad_token_id)], tok.pad_token_id))
    assert len(packed) == len(alone) == len(padded) > 4
    for (p, n), (a, m), (q, k) in zip(packed, alone, padded):
        assert n == m == k
        assert abs(p / n - a / m) < TOL and abs(q / k - a / m) < TOL


def test_without_use_cache_false_examples_leak(setup):
    """Why the trainer passes use_cache=False: with the default cache, position_ids alone do not isolate."""
    path, tok, data = setup
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    row = data["all"].train[0]
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    with torch.no_grad():
        isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        cached = model(input_ids=ids, position_ids=pos).logits
    second = [i for i, p in enumerate(row["position_ids"]) if p == 0][1]
    assert torch.allclose(isolated[0, :second], cached[0, :second], atol=1e-5)  # the first example is fine
    assert (isolated[0, second:] - cached[0, second:]).abs().max() > 1e-2  # later ones see earlier ones
