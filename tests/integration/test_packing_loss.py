"""A packed micro-batch gives every example the loss and the gradients it has alone (fp32, tiny model).

Isolation comes from position_ids restarting per example with use_cache=False: for sdpa and eager
transformers builds a block-diagonal causal mask per row; flash_attention_2 and flex_attention get
the whole micro-batch as one row with its sequence boundaries (launcher.data.collate). Both
layouts are checked with every kernel that runs on CPU, at micro batch 4. flash_attention_2 needs
CUDA and flex_attention has no CPU backward: flex is checked for the loss only, flash by
tests/gpu/gpu_check.py on a GPU (and its boundaries against transformers' own in the unit tests).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.bundled import resolve
from launcher.data import collate, prepare_data
from launcher.data.masking import IGNORE
from launcher.data.preview import segments

TOL = 1e-5
MICRO_BATCH = 4
EXAMPLES_WITH_GRADIENTS = 6  # each costs two backward passes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = resolve("bundled://tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    root = tmp_path_factory.mktemp("data")
    data = {}
    for train_on in ("assistant", "all"):
        cfg = dict(train_files="bundled://tiny-tasks/eval.jsonl", format="auto", seq_len=128, packing=True,
                   train_on=train_on, truncation="truncate", on_bad_row="error")
        data[train_on] = prepare_data(cfg, tok, cache_root=str(root), log=lambda m: None)
    return path, tok, data


def example_losses(model, batch):
    """Per example (split where position_ids restart): its summed token loss (a graph) and trained-token count."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k",
                                    "max_length_q", "max_length_k") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    out = []
    for r in range(len(batch["input_ids"])):
        token_loss = F.cross_entropy(logits[r, :-1], batch["labels"][r, 1:], ignore_index=IGNORE, reduction="none")
        labels, positions = batch["labels"][r].tolist(), batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for a, b in zip(starts, starts[1:]):
            n = sum(l != IGNORE for l in labels[a + 1:b])
            if n:  # padding segments have nothing trained
                # Token t is predicted at position t-1; the example's first token never is.
                out.append((token_loss[a:b - 1].sum(), n))
    return out


def alone(row_ids, row_labels):
    return {"input_ids": row_ids, "labels": row_labels, "position_ids": list(range(len(row_ids)))}


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attn, layout, train_on", [
    (attn, layout, "assistant") for attn in ("sdpa", "eager") for layout in ("packed rows", "one row", "padded rows")
] + [("sdpa", "packed rows", "all"), ("sdpa", "one row", "all")])  # what is trained changes the targets, not the layout
def test_packed_loss_and_gradients_equal_each_example_alone(setup, attn, layout, train_on):
    """packed rows: data.packing=true with sdpa/eager; one row: the layout flash_attention_2 and
    flex_attention get; padded rows: data.packing=false with sdpa/eager (an attention_mask)."""
    path, tok, data = setup
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).train()
    check_packed_equals_alone(model, tok, data[train_on], layout)


@pytest.mark.parametrize("layout", ["packed rows", "one row"])
def test_a_mixture_of_experts_packed_loss_equals_each_example_alone(setup, layout):
    """The tiny MoE (same tokenizer): routing is per token, so packing changes no example's language-model loss."""
    _, tok, data = setup
    model = AutoModelForCausalLM.from_pretrained(resolve("bundled://tiny-moe"), attn_implementation="sdpa", dtype=torch.float32).train()
    check_packed_equals_alone(model, tok, data["assistant"], layout)


def check_packed_equals_alone(model, tok, data, layout):
    rows = [data.train[i] for i in range(MICRO_BATCH)]
    examples = [alone(ids, labels) for row in rows for ids, labels in segments(row, tok.pad_token_id)]
    if layout == "padded rows":
        batch = collate(examples, tok.pad_token_id)
        assert "attention_mask" in batch
    else:
        batch = collate(rows, tok.pad_token_id, one_row=layout == "one row")
        assert "attention_mask" not in batch  # isolation comes from position_ids (and boundaries) alone
        assert len(batch["input_ids"]) == (1 if layout == "one row" else MICRO_BATCH)
    packed = example_losses(model, batch)
    single = [example_losses(model, collate([e], tok.pad_token_id))[0] for e in examples]
    assert len(packed) == len(single) > MICRO_BATCH
    assert sum(n for _, n in packed) == batch["trained"]  # the trainer's count, from the CPU
    for (p, n), (a, m) in zip(packed, single):
        assert n == m and abs(p.item() / n - a.item() / m) < TOL
    for (p, _), (a, _) in list(zip(packed, single))[:EXAMPLES_WITH_GRADIENTS]:
        g_packed, g_alone = gradients(model, p), gradients(model, a)
        assert ((g_packed - g_alone).norm() / g_alone.norm()).item() < TOL


def test_flex_attention_packed_loss_equals_each_example_alone(setup):
    """flex_attention (torch's block-sparse kernel, compiled) gets one row; forward only: no CPU backward."""
    path, tok, data = setup
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_attention", dtype=torch.float32).eval()
    rows = [data["assistant"].train[i] for i in range(MICRO_BATCH)]
    with torch.no_grad():
        packed = example_losses(model, collate(rows, tok.pad_token_id, one_row=True, pad_to=MICRO_BATCH * 128))
        single = [example_losses(model, collate([alone(ids, labels)], tok.pad_token_id, one_row=True))[0]
                  for row in rows for ids, labels in segments(row, tok.pad_token_id)]
    assert len(packed) == len(single) > MICRO_BATCH
    for (p, n), (a, m) in zip(packed, single):
        assert n == m and abs(p.item() / n - a.item() / m) < TOL


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
