"""Exact loss masking at template boundaries: chatml and llama3, multi-turn, with and without system, all train_on modes."""

import copy
import json
import re

import pytest
from transformers import AutoTokenizer

from launcher.bundled import resolve
from launcher.data.errors import DataError
from launcher.data.examples import ExampleBuilder
from launcher.data.masking import IGNORE, span_labels
from launcher.data.templates import CHATML, LLAMA3, TEMPLATES, resolve_template

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
SYSTEM = {"role": "system", "content": "Reply briefly."}
TURNS = [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "Reverse the letters: a b c"}, {"role": "assistant", "content": "c b a"}]
CONVERSATIONS = {"single": TURNS[:2], "multi": TURNS, "system_multi": [SYSTEM, *TURNS], "system_single": [SYSTEM, *TURNS[:2]]}


@pytest.fixture(scope="module")
def tokenizers():
    tiny = AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))
    llama = copy.deepcopy(tiny)
    llama.add_tokens(LLAMA3_TOKENS, special_tokens=True)  # so llama3 markers are single tokens
    return {"chatml": tiny, "llama3": llama}


def build(tokenizer, messages, template, train_on="assistant", seq_len=512):
    builder = ExampleBuilder(tokenizer, template, "auto", train_on, seq_len, "truncate")
    out = builder({"_jsonl": [json.dumps({"messages": messages})]})
    assert out["status"] == [""], out["detail"]
    return out["input_ids"][0], out["labels"][0]


def trained_runs(ids, labels):
    """Maximal runs of trained token ids."""
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
def test_trained_tokens_are_exactly_the_answers_and_end_of_turn(tokenizers, name, conv, train_on):
    tok, messages = tokenizers[name], CONVERSATIONS[conv]
    ids, labels = build(tok, messages, TEMPLATES[name], train_on)
    assert len(ids) == len(labels)
    assert labels[0] == IGNORE  # nothing predicts the first token
    if train_on == "all":
        assert labels[1:] == ids[1:]
        return
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if train_on == "last_assistant":
        answers = answers[-1:]
    eot = tok.convert_tokens_to_ids(EOT[name])
    expected = [tok.encode(a, add_special_tokens=False) + [eot] for a in answers]
    assert trained_runs(ids, labels) == expected
    # The header before each answer and the newline after its end-of-turn stay masked.
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATES[name])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_templates_without_generation_markers_mask_the_same(tokenizers, name, train_on):
    """Spans found by rendering prefix by prefix match the {% generation %} markers exactly."""
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", TEMPLATES[name])
    assert "endgeneration" not in plain
    tok = tokenizers[name]
    for messages in CONVERSATIONS.values():
        assert build(tok, messages, plain, train_on) == build(tok, messages, TEMPLATES[name], train_on)


def test_tokenizer_template_is_the_default_and_masks_like_chatml(tokenizers):
    tok = tokenizers["chatml"]
    label, template = resolve_template(None, tok)
    assert (label, template) == ("tokenizer", tok.chat_template)
    for messages in CONVERSATIONS.values():
        assert build(tok, messages, template) == build(tok, messages, CHATML)


def test_template_choices(tokenizers, tmp_path):
    tok = tokenizers["chatml"]
    assert resolve_template("llama3", tok) == ("llama3", LLAMA3)
    assert resolve_template("{{ messages[0]['content'] }}", tok)[0] == "jinja"
    path = tmp_path / "t.jinja"
    path.write_text(CHATML)
    assert resolve_template(str(path), tok) == (f"file:{path}", CHATML)
    with pytest.raises(DataError, match="chatml, llama3"):
        resolve_template("vicuna", tok)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        resolve_template(None, bare)


def test_template_that_is_not_prefix_stable_is_a_bad_row(tokenizers):
    # Renders the last message differently, so prefixes are not prefixes of the whole.
    odd = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    builder = ExampleBuilder(tokenizers["chatml"], odd, "auto", "assistant", 512, "truncate")
    out = builder({"_jsonl": [json.dumps({"messages": TURNS})]})
    assert out["status"] == ["template_error"] and "generation" in out["detail"][0]


def test_span_labels_overlap_rule():
    ids = [10, 11, 12, 13]
    offsets = [(0, 2), (2, 5), (5, 7), (7, 7)]  # the last is zero-width, like some special tokens
    assert span_labels(ids, offsets, [(3, 6)]) == ([IGNORE, 11, 12, IGNORE], 2)
    assert span_labels(ids, offsets, [(0, 7)]) == ([IGNORE, 11, 12, IGNORE], 2)
    assert span_labels(ids, offsets, [(6, 8)]) == ([IGNORE, IGNORE, 12, 13], 2)
    assert span_labels(ids, offsets, [(0, 1), (4, 5)]) == ([IGNORE, 11, IGNORE, IGNORE], 1)
    assert span_labels(ids, offsets, []) == ([IGNORE] * 4, 0)


def test_text_rows_train_every_token_and_end_with_eos(tokenizers):
    tok = tokenizers["chatml"]
    out = ExampleBuilder(tok, None, "text", "assistant", 512, "truncate")({"text": ["plain words here"]})
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids == tok.encode("plain words here", add_special_tokens=False) + [tok.eos_token_id]
    assert labels == [IGNORE] + ids[1:]


def test_length_policy(tokenizers):
    tok = tokenizers["chatml"]
    row = {"_jsonl": [json.dumps({"messages": TURNS})]}
    full = ExampleBuilder(tok, CHATML, "auto", "assistant", 512, "truncate")(row)["length"][0]
    cut = ExampleBuilder(tok, CHATML, "auto", "assistant", full - 3, "truncate")(row)
    assert (cut["status"], cut["truncated"], cut["length"]) == ([""], [True], [full - 3])
    dropped = ExampleBuilder(tok, CHATML, "auto", "assistant", full - 3, "drop")(row)
    assert dropped["status"] == ["too_long"] and dropped["input_ids"] == [[]]
    # Truncated before the first answer: nothing left to learn, so it is dropped, not trained on.
    early = ExampleBuilder(tok, CHATML, "auto", "assistant", 6, "truncate")(row)
    assert early["status"] == ["untrained_after_truncation"]
